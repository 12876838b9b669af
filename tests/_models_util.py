"""Helpers shared by the model tests (tests/test_models_*.py).

Only logic that was identical across the model test files lives here; each check keeps the
exact assertions and tolerances the files had. Random draws happen in the same order as
before, so every test sees the same inputs and weights.
"""

from __future__ import annotations

import json

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the 2 CPU cores are shared by several test runs, and oversubscribed
    OpenMP threads make these small-tensor tests several times slower (measured 5x).

    Autouse in every module that imports it (``from _models_util import one_thread``)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---------------------------------------------------------------- inputs and weights


def images(B, H, W, dtype=torch.float32, seed=0):
    """A fixed random (B, 3, H, W) batch on DEV (drawn in fp64 on the CPU, then cast)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, H, W, generator=g, dtype=torch.float64).to(device=DEV, dtype=dtype)


def image(b, size, seed=1):
    """A fixed random (b, 3, size, size) fp32 batch on the CPU."""
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_batchnorm(m, g):
    """Non-trivial running statistics for a BatchNorm2d ``m`` (other modules are left alone),
    so eval-mode checks see the normalisation."""
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def jitter_parameters(model, g, vector_scale, matrix_scale):
    """Add seeded noise to every parameter (biases and norms included), away from the init values."""
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (vector_scale if p.dim() < 2 else matrix_scale))


# ---------------------------------------------------------------- official layout and registry


def assert_official_layout(model, data_path, name, params):
    """Parameter count and state_dict names/shapes/order equal the official ones in tests/data."""
    # shared blocks appear twice in the module tree; parameters() counts them once, as officially
    assert sum(p.numel() for p in model.parameters()) == params
    with open(data_path) as f:
        want = json.load(f)["models"][name]
    assert want["params"] == params
    got = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert got == [(k, v) for k, v in want["state_dict"].items()]


def assert_registered(module, names):
    """Every name is registered with its builder in ``module``."""
    from vitattn.models._registry import _MODELS

    for n in names:
        assert _MODELS[n] is getattr(module, n)


# ---------------------------------------------------------------- whole-model checks


def assert_every_param_has_finite_nonzero_grad(model):
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().max() > 0, n  # every parameter takes part


def check_eval_determinism_and_batch_independence(model, x):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        a, b = model(x), model(x)
        single = model(x[1:2])
    assert torch.equal(a, b)
    torch.testing.assert_close(single, a[1:2], atol=1e-5, rtol=1e-5)
    # eval mode leaves every buffer (BatchNorm statistics included) alone
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def check_drop_path_in_training_only(model, x):
    """Two training forwards with different seeds differ (stochastic depth); eval is deterministic."""
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    b = model(x)
    assert not torch.allclose(a, b)  # stochastic depth draws differ
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def check_channels_last_and_strided_inputs(model):
    """Channels-last input, a strided view and a channels-last model give the contiguous result.
    ``model`` (eval mode, on DEV) is converted to channels_last in place."""
    x = images(2, 32, 64)
    with torch.no_grad():
        want = model(x)
        got_cl = model(x.to(memory_format=torch.channels_last))
        big = images(2, 64, 64, seed=1)
        big[:, :, ::2] = x
        got_strided = model(big[:, :, ::2])
        got_model_cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got_cl, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_strided, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_model_cl, want, atol=1e-5, rtol=1e-5)


def _first_inputs_seen(model, x, module_type, probe):
    """probe(first input) for every call of a ``module_type`` submodule during one no-grad
    forward of x, in call order."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(probe(args[0])))
             for m in model.modules() if isinstance(m, module_type)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def check_layer_norms_get_contiguous_tokens(model, x):
    """Every LayerNorm of a forward receives contiguous tokens: a permuted or transposed view
    entering a stage's residual stream would stay in it (element-wise ops keep their inputs'
    layout) and make each LayerNorm copy its input (measured: 5-7% of DynaMixer-S and ~3% of
    SReT-T inference at 224 b8)."""
    seen = _first_inputs_seen(model, x, torch.nn.LayerNorm, lambda t: t.is_contiguous())
    assert seen, "no LayerNorm ran"
    assert all(seen), f"{sum(not ok for ok in seen)} of {len(seen)} LayerNorm inputs not contiguous"


def check_convolutions_get_channels_last_inputs(model, x):
    """Every nn.Conv2d a forward of (contiguous NCHW) images runs receives channels-last data:
    oneDNN convolves NHWC in place but reorders NCHW into its blocked layout and back at every
    convolution (see models._common.channels_last_images; measured with a channels-last stem,
    224 b8 inference, one thread: RMT-T 1.08x, SReT-T 1.04-1.05x, DynaMixer-S 1.02x faster)."""
    assert x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    seen = _first_inputs_seen(model, x, torch.nn.Conv2d,
                              lambda t: t.is_contiguous(memory_format=torch.channels_last))
    assert seen, "no Conv2d ran"
    assert all(seen), f"{sum(not ok for ok in seen)} of {len(seen)} Conv2d inputs not channels-last: {seen}"


def check_noncontiguous_and_channels_last_inputs(model, make_model, x):
    """A strided view and a channels-last input give the contiguous result, and so does a fresh
    channels-last model (``make_model()``) loaded with ``model``'s weights."""
    with torch.no_grad():
        want = model(x)
        B, C, H, W = x.shape
        strided = torch.randn(B, C, H, 2 * W)[..., ::2]  # a non-contiguous view
        strided.copy_(x)
        torch.testing.assert_close(model(strided), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), want, atol=1e-5, rtol=1e-5)
        cl = make_model().to(memory_format=torch.channels_last).eval()
        cl.load_state_dict(model.state_dict())
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), want, atol=1e-5, rtol=1e-5)


def bf16_autocast_error(model, x):
    """Max abs error of a CPU bf16-autocast forward relative to the fp32 output's max abs
    (the output must be bf16); each test states its own bound."""
    with torch.no_grad():
        want = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    assert got.dtype == torch.bfloat16
    return (got.float() - want).abs().max() / want.abs().max()


def check_checkpointing_same_grads(model, x, stages):
    """use_checkpoint on every one of ``stages`` leaves the fp64 parameter gradients unchanged."""
    model(x).sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for s in stages:
        s.use_checkpoint = True
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], atol=1e-10, rtol=1e-9, msg=lambda m: f"{n}: {m}")


def check_fused_matches_reference_model(model, fused, x):
    """``fused`` (same weights) matches ``model`` in outputs, input and parameter gradients."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = model(x1), fused(x2)
    torch.testing.assert_close(y2, y1, atol=2e-4, rtol=2e-4)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=2e-4, rtol=2e-3)
    p1 = dict(model.named_parameters())
    for n, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, p1[n].grad, atol=2e-4, rtol=2e-3, msg=lambda m: f"{n}: {m}")


def check_strict_round_trip(src, make_loaded, x):
    """``make_loaded()`` (a model built with pretrained= a file of ``src``'s state_dict) holds
    exactly ``src``'s tensors and gives exactly its output on ``x``."""
    sd = src.state_dict()
    dst = make_loaded().eval()
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


def check_loads_exactly(make_loaded, paths, x, want):
    """Every checkpoint file in ``paths`` loads through pretrained= into the same outputs."""
    for path in paths:
        loaded = make_loaded(path).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want, atol=0, rtol=0)


def check_compiled_block(blk, x, *args):
    """torch.compile(fullgraph=True) of a block gives the eager values and input gradients."""
    want = blk(x, *args)
    gx_want, = torch.autograd.grad(want.sum(), x)
    torch._dynamo.reset()
    compiled = torch.compile(blk, fullgraph=True, backend="aot_eager")
    got = compiled(x, *args)
    gx, = torch.autograd.grad(got.sum(), x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_want, atol=1e-5, rtol=1e-5)


def check_compiled_training_grads(compiled, blk, x, *args):
    """Training gradients through ``compiled`` (of ``blk``) equal the eager ones (input and params)."""
    blk.train()
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled(xc, *args).square().sum().backward()
    gc = {n: p.grad.clone() for n, p in blk.named_parameters()}
    blk.zero_grad()
    blk(xe, *args).square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad, atol=1e-4, rtol=1e-4)
    for n, p in blk.named_parameters():
        torch.testing.assert_close(gc[n], p.grad, atol=1e-4, rtol=1e-4)


def check_export(model, x):
    """torch.export of the whole (eval) model runs and matches eager."""
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), atol=1e-5, rtol=1e-5)


def cpu_alloc_peak_mib(fn) -> float:
    """Peak of the CPU allocator's running total during fn() (MiB), from the profiler's memory
    events: what the tensors need, independent of the process's earlier pages and of imports."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


# ---------------------------------------------------------------- RMT


def official_retention(layer, x, init, rng, decomposed):
    """The official VisionRetentionChunk/All computation written out densely (fp64, (heads, N, N) masks)."""
    B, H, W, C = x.shape
    n, d = layer.num_heads, layer.key_dim
    # the official buffers are computed in float32 (then cast with the module)
    angle = (1.0 / 10000 ** torch.linspace(0, 1, d // 2)).repeat_interleave(2).double()
    decay = torch.log(1 - 2 ** (-init - rng * torch.arange(n, dtype=torch.float) / n)).double()
    idx = torch.arange(H * W, dtype=torch.float64)
    sin = torch.sin(idx[:, None] * angle).reshape(H, W, d)
    cos = torch.cos(idx[:, None] * angle).reshape(H, W, d)

    def shift(t):  # rotate every two channels: (x0, x1) -> (-x1, x0)
        rot = torch.stack([-t[..., 1::2], t[..., 0::2]], dim=-1).flatten(-2)
        return t * cos + rot * sin

    q = layer.q_proj(x)
    k = layer.k_proj(x) * d ** -0.5
    v = layer.v_proj(x)
    lepe = layer.lepe.conv(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    q = shift(q.view(B, H, W, n, d).permute(0, 3, 1, 2, 4))
    k = shift(k.view(B, H, W, n, d).permute(0, 3, 1, 2, 4))
    v = v.view(B, H, W, n, -1).permute(0, 3, 1, 2, 4)  # (B, n, H, W, dv)
    if decomposed:
        dw = (torch.arange(W)[:, None] - torch.arange(W)[None]).abs().double()
        dh = (torch.arange(H)[:, None] - torch.arange(H)[None]).abs().double()
        a = torch.softmax(q @ k.transpose(-1, -2) + decay[:, None, None, None] * dw, -1)
        v = a @ v  # along W inside rows
        qh, kh, vh = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)
        a = torch.softmax(qh @ kh.transpose(-1, -2) + decay[:, None, None, None] * dh, -1)
        o = (a @ vh).transpose(2, 3)
    else:
        rr = torch.arange(H).repeat_interleave(W)
        cc = torch.arange(W).repeat(H)
        dist = ((rr[:, None] - rr[None]).abs() + (cc[:, None] - cc[None]).abs()).double()
        a = torch.softmax(q.flatten(2, 3) @ k.flatten(2, 3).transpose(-1, -2) + decay[:, None, None] * dist, -1)
        o = (a @ v.flatten(2, 3)).reshape(B, n, H, W, -1)
    o = o.permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return layer.out_proj(o + lepe)
