"""RMT models: official names/shapes/counts, the attention layer against the official math,
every backend against the dense reference, autograd, checkpoints, determinism, compile, bad input."""

import importlib
import json
import os

import pytest
import torch

import vitattn
import vitattn.models._common
import vitattn.models.rmt as rmt

from _models_util import (DEV, assert_every_param_has_finite_nonzero_grad, bf16_autocast_error,
                          check_channels_last_and_strided_inputs, check_checkpointing_same_grads,
                          check_convolutions_get_channels_last_inputs,
                          check_compiled_block, check_drop_path_in_training_only,
                          check_eval_determinism_and_batch_independence, check_export, check_strict_round_trip,
                          images, official_retention, one_thread, randomize_batchnorm)  # noqa: F401 (one_thread: autouse fixture)

try:  # registers the compiled "cpu"/"cuda" MaSA backends where the extension is built
    import vitattn._extension  # noqa: F401
except ImportError:
    pass
_MASA = importlib.import_module("vitattn.ops.masa.op")  # the module (vitattn.masa is the function)
ref_masa = importlib.import_module("vitattn.ops.masa.reference")


def _runnable(name):
    ctx = dict(device=torch.device(DEV), dtype=torch.float64, d=16, dv=16, H=4, W=4, B=1, heads=2,
               decomposed=False)
    return _MASA.dispatcher.reason(name, ctx, auto=False) is None


# every MaSA backend that can run fp64 here by name: "torch", the compiled kernels, Triton
BACKENDS = [b for b in ("torch", "cpu", "cuda", "triton") if _runnable(b)]
DATA = os.path.join(os.path.dirname(__file__), "data", "rmt_official_state_dict.json")

# exact counts of the official RMT_T3 / RMT_S / RMT_M2 / RMT_L6
COUNTS = {"rmt_t": 14_334_216, "rmt_s": 26_967_240, "rmt_b": 54_154_896, "rmt_l": 95_464_864}


def tiny_cfg():
    return dict(embed_dims=[16, 32, 32, 32], depths=[1, 1, 2, 1], num_heads=[2, 2, 2, 2],
               init_values=[2, 2, 2, 2], heads_ranges=[4, 4, 6, 6], mlp_ratios=[2, 2, 2, 2],
               chunkwise_recurrents=[True, False, True, False], layerscales=[False, True, False, True],
               projection=24, num_classes=7, drop_path_rate=0.0)


def tiny(**kw):
    """A small VisRetNet exercising every feature: both attention forms, layer scale, downsampling."""
    return rmt.VisRetNet(**{**tiny_cfg(), **kw})


def randomize_norms(model, seed=0):
    """Non-trivial BatchNorm statistics and layer scales, so eval-mode checks see every branch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            randomize_batchnorm(m, g)
        for name, p in model.named_parameters():
            if "gamma_" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.5)
    return model


# ---------------------------------------------------------------- official layout


@pytest.mark.parametrize("name", list(COUNTS))
def test_param_count_and_state_dict_layout(name):
    with open(DATA) as f:
        official = json.load(f)[name]
    # the big ones on the meta device: layout only, no memory and no init cost
    with torch.device("cpu" if name == "rmt_t" else "meta"):
        model = getattr(rmt, name)()
    assert sum(p.numel() for p in model.parameters()) == COUNTS[name]
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == official  # same names, shapes and order as the official state_dict
    cfg = rmt._CFGS[name]
    for i, layer in enumerate(model.layers):
        heads, dim = cfg["num_heads"][i], cfg["embed_dims"][i]
        assert (layer.Relpos.num_heads, layer.Relpos.initial_value, layer.Relpos.heads_range) == (
            heads, cfg["init_values"][i], cfg["heads_ranges"][i])
        assert layer.chunkwise_recurrent == cfg["chunkwise_recurrents"][i]
        assert all(b.retention.decomposed == cfg["chunkwise_recurrents"][i] for b in layer.blocks)
        assert all(b.layerscale == cfg["layerscales"][i] for b in layer.blocks)
        # the buffers follow the official formulas (written out here independently of the module)
        relpos = layer.Relpos if name == "rmt_t" else rmt.RetNetRelPos2d(
            dim, heads, cfg["init_values"][i], cfg["heads_ranges"][i])
        h = torch.arange(heads, dtype=torch.float64)
        want = torch.log(1 - 2 ** (-cfg["init_values"][i] - cfg["heads_ranges"][i] * h / heads))
        torch.testing.assert_close(relpos.decay.double(), want, atol=1e-6, rtol=1e-6)
        kd = dim // heads
        freq = 1.0 / 10000 ** (torch.arange(kd // 2, dtype=torch.float64) / (kd // 2 - 1))
        torch.testing.assert_close(relpos.angle.double(), freq.repeat_interleave(2), atol=1e-7, rtol=1e-6)
    if "layer_init_values" in cfg:
        blk = model.layers[2].blocks[0]
        assert blk.gamma_1.shape == (1, 1, 1, cfg["embed_dims"][2])


# ---------------------------------------------------------------- the attention layer vs the official math


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decomposed", [False, True])
def test_retention_layer_matches_official_math(backend, decomposed):
    torch.manual_seed(1)
    # key dim 16, odd grid; the Triton interpreter is slow, so the fused path gets the smaller case
    dim, heads, H, W, B = (32, 2, 3, 5, 1) if backend == "triton" and DEV == "cpu" else (48, 3, 5, 7, 2)
    layer = rmt.VisionRetention(dim, heads, decomposed=decomposed, attn_backend=backend).to(DEV, torch.float64)
    with torch.no_grad():  # biases non-zero so that every term matters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    relpos = rmt.RetNetRelPos2d(dim, heads, 2, 4).to(DEV, torch.float64)
    # a non-contiguous input (channels strided), as the layer norm output can be
    x = torch.randn(B, H, W, 2 * dim, dtype=torch.float64, device=DEV)[..., ::2].requires_grad_(True)
    out = layer(x, relpos(H, W))
    xr = x.detach().clone().requires_grad_(True)
    want = official_retention(layer, xr, 2, 4, decomposed)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-9)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x] + list(layer.parameters()), dout)
    grads_ref = torch.autograd.grad(want, [xr] + list(layer.parameters()), dout)
    for (name, _), g, gr in zip([("x", None)] + list(layer.named_parameters()), grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-9, rtol=1e-8, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("decomposed", [False, True])
def test_retention_layer_gradcheck(decomposed):
    torch.manual_seed(2)
    layer = rmt.VisionRetention(8, 2, decomposed=decomposed, attn_backend="torch").double()
    relpos = rmt.RetNetRelPos2d(8, 2, 2, 4).double()
    x = torch.randn(1, 3, 4, 8, dtype=torch.float64, requires_grad=True)
    # fast mode (random projections of the Jacobian) keeps this to a few dozen evaluations
    assert torch.autograd.gradcheck(lambda t: layer(t, relpos(3, 4)), (x,), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotation_to_heads_matches_the_elementwise_form(dtype):
    # the complex-multiply rotation into head-major q, k (eager fp32/fp64) against rotate_pairs,
    # the official x * cos + rotate_every_two(x) * sin; odd grid, poisoned-looking inputs
    torch.manual_seed(5)
    B, H, W, n, d = 2, 5, 7, 3, 8
    relpos = rmt.RetNetRelPos2d(n * d, n, 2, 4).to(dtype)
    sin, cos, _ = relpos(H, W)
    qk = (torch.randn(B, H, W, 2, n, d, dtype=dtype) * 3).requires_grad_()
    q, k = rmt.rotate_qk_to_heads(qk, sin, cos)
    assert q.shape == k.shape == (B, n, H, W, d) and q.is_contiguous() and k.is_contiguous()
    assert "RotateToHeads" in type(q.grad_fn.next_functions[0][0]).__name__  # (through the select)
    want = rmt.rotate_pairs(qk.detach(), sin.unsqueeze(-2), cos.unsqueeze(-2))
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(q, want[:, :, :, 0].permute(0, 3, 1, 2, 4), **tol)
    torch.testing.assert_close(k, want[:, :, :, 1].permute(0, 3, 1, 2, 4), **tol)
    # gradients: the inverse rotation, through a non-contiguous upstream gradient
    gq, gk = torch.randn(2, B, n, H, W, d, dtype=dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
    (gx,) = torch.autograd.grad((q, k), qk, (gq, gk))
    qk2 = qk.detach().requires_grad_()
    r = rmt.rotate_pairs(qk2, sin.unsqueeze(-2), cos.unsqueeze(-2))
    (gx_want,) = torch.autograd.grad((r[:, :, :, 0].permute(0, 3, 1, 2, 4), r[:, :, :, 1].permute(0, 3, 1, 2, 4)),
                                     qk2, (gq, gk))
    torch.testing.assert_close(gx, gx_want, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda t: rmt.rotate_qk_to_heads(t, sin, cos), (qk.detach().requires_grad_(),))


def test_rotation_to_heads_outside_plain_eager_is_the_elementwise_form():
    # traced graphs (compile, export, ONNX) and low-precision inputs keep the element-wise form
    torch.manual_seed(6)
    sin, cos, _ = rmt.RetNetRelPos2d(16, 2, 2, 4)(3, 4)
    qk = torch.randn(1, 3, 4, 2, 2, 8)
    gm = torch.fx.experimental.proxy_tensor.make_fx(lambda t: rmt.rotate_qk_to_heads(t, sin, cos))(qk)
    assert "view_as_complex" not in str(gm.graph) and "flip" in str(gm.graph)
    torch.testing.assert_close(gm(qk)[0], rmt.rotate_qk_to_heads(qk, sin, cos)[0], atol=1e-6, rtol=1e-6)
    q16, _ = rmt.rotate_qk_to_heads(qk.half(), sin.half(), cos.half())
    assert q16.dtype == torch.float16 and not q16.is_contiguous()


def test_retention_fp32_close_to_fp64():
    torch.manual_seed(3)
    layer = rmt.VisionRetention(32, 2, decomposed=True, attn_backend="torch")
    relpos = rmt.RetNetRelPos2d(32, 2, 2, 4)
    x = torch.randn(2, 6, 9, 32)
    out = layer(x, relpos(6, 9))
    want = official_retention(layer.double(), x.double(), 2, 4, True)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-4)


# ---------------------------------------------------------------- whole model: backends vs the reference


def _reference_masa(q, k, v, gamma, *, decomposed, scale, backend):
    return ref_masa.masa(q, k, v, gamma, decomposed=decomposed, scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_backend_matches_reference(backend, monkeypatch):
    torch.manual_seed(4)
    # the interpreter is slow: one image of 32x48 (8x12 tokens in stage 1) for the fused path
    small = backend == "triton" and DEV == "cpu"
    model = randomize_norms(tiny(attn_backend=backend, depths=[1, 1, 1, 1] if small else [1, 1, 2, 1]))
    model = model.to(DEV, torch.float64).eval()
    x = images(1, 32, 48, torch.float64) if small else images(2, 64, 96, torch.float64)  # non-square grids
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    monkeypatch.setattr(rmt, "masa", _reference_masa)
    want = model(x)
    grads_ref = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-9)
    for (name, _), g, gr in zip(model.named_parameters(), grads, grads_ref):
        torch.testing.assert_close(g, gr, atol=1e-9, rtol=1e-8, msg=lambda m: f"grad {name}: {m}")


def test_rmt_t_forward_backward_224():
    torch.manual_seed(5)
    model = rmt.rmt_t(attn_backend="torch").to(DEV).train()
    x = images(2, 224, 224)
    out = model(x)
    assert out.shape == (2, 1000) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.float().logsumexp(-1).sum().backward()
    assert_every_param_has_finite_nonzero_grad(model)


def test_eval_determinism_and_batch_independence():
    torch.manual_seed(6)
    model = randomize_norms(tiny()).to(DEV).eval()
    check_eval_determinism_and_batch_independence(model, images(3, 32, 64))


def test_drop_path_active_in_training_only():
    torch.manual_seed(7)
    model = tiny(drop_path_rate=0.5).to(DEV)
    check_drop_path_in_training_only(model, images(4, 32, 32))


def test_channels_last_and_strided_inputs():
    torch.manual_seed(8)
    check_channels_last_and_strided_inputs(randomize_norms(tiny()).to(DEV).eval())


def test_convolutions_get_channels_last_inputs():
    # the stem's four convolutions and the downsampling between stages
    torch.manual_seed(8)
    check_convolutions_get_channels_last_inputs(randomize_norms(tiny()).to(DEV).eval(), images(2, 32, 64))


def test_autocast_bf16_cpu():
    torch.manual_seed(9)
    model = randomize_norms(tiny(attn_backend="torch")).eval()
    err = bf16_autocast_error(model, images(2, 32, 64).cpu())
    assert err < 5e-2, err  # bf16 has 8 mantissa bits; a wiring error gives O(1)


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(10)
    model = tiny().to(DEV).double()
    check_checkpointing_same_grads(model, images(1, 32, 64, torch.float64), model.layers)


# ---------------------------------------------------------------- checkpoints


def test_strict_load_of_saved_state_dict(tmp_path):
    torch.manual_seed(11)
    src = randomize_norms(rmt.rmt_t(num_classes=10)).eval()
    torch.save({"model": src.state_dict(), "epoch": 3}, tmp_path / "rmt_t.pth")  # official training-script layout
    torch.manual_seed(12)
    check_strict_round_trip(src, lambda: rmt.rmt_t(num_classes=10, pretrained=str(tmp_path / "rmt_t.pth")),
                            images(1, 64, 64).cpu())


def test_checkpoint_variants_and_strictness(tmp_path):
    torch.manual_seed(13)
    src = randomize_norms(tiny()).eval()
    sd = src.state_dict()
    x = images(1, 64, 64).cpu()
    with torch.no_grad():
        want = src(x)
    variants = {
        "plain.pth": sd,
        "ddp.pth": {"state_dict": {"module." + k: v for k, v in sd.items()}},  # DistributedDataParallel
    }
    for fname, obj in variants.items():
        torch.save(obj, tmp_path / fname)
        dst = tiny()
        vitattn.models._common.load_pretrained(dst, tmp_path / fname)
        with torch.no_grad():
            assert torch.equal(dst.eval()(x), want), fname
    # strict: a missing key or a wrong shape is an error
    bad = dict(sd)
    bad.pop("layers.0.Relpos.decay")
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="Relpos.decay"):
        vitattn.models._common.load_pretrained(tiny(), tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="size mismatch"):
        vitattn.models._common.load_pretrained(tiny(num_classes=5), tmp_path / "plain.pth")


# ---------------------------------------------------------------- torch.compile


def test_block_under_torch_compile():
    torch.manual_seed(13)
    blk = rmt.RetBlock("chunk", 32, 2, 64, layerscale=True, layer_init_values=0.5, attn_backend="torch").to(DEV)
    relpos = rmt.RetNetRelPos2d(32, 2, 2, 4).to(DEV)
    x = torch.randn(2, 6, 10, 32, device=DEV, requires_grad=True)
    check_compiled_block(blk, x, relpos(6, 10))


def test_whole_model_export():
    torch.manual_seed(14)
    model = tiny(attn_backend="torch").eval()
    x = images(1, 64, 64).cpu()
    check_export(model, x)


# ---------------------------------------------------------------- bad input


def test_bad_arguments():
    with pytest.raises(ValueError, match="attn_backend"):
        rmt.rmt_t(attn_backend="fast")
    with pytest.raises(TypeError, match="attn_backend"):
        rmt.VisionRetention(32, 2, attn_backend=None)
    with pytest.raises(ValueError, match="pretrained"):
        rmt.rmt_t(pretrained=True)
    with pytest.raises(TypeError, match="pretrained"):
        rmt.rmt_t(pretrained=3)
    with pytest.raises(ValueError, match="path"):
        rmt.rmt_t(pretrained="/nonexistent/rmt_t.pth")
    with pytest.raises(ValueError, match="num_heads"):
        tiny(num_heads=[2, 2, 2])
    with pytest.raises(ValueError, match="embed_dims"):
        tiny(embed_dims=[16, 32, 30, 32], num_heads=[2, 2, 4, 2])
    with pytest.raises(ValueError, match="key dim"):
        tiny(embed_dims=[18, 32, 32, 32], num_heads=[2, 2, 2, 2])
    with pytest.raises(ValueError, match="num_classes"):
        tiny(num_classes=-1)
    model = tiny()
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 4, 64, 64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        model([1.0])


# ---------------------------------------------------------------- depthwise convolutions


@pytest.mark.parametrize("k,dtype", [(3, torch.float32), (5, torch.float64), (3, torch.float64)])
def test_dwconv_residual_is_x_plus_conv(k, dtype):
    """DWConv2d(x, residual=True) folds the residual into the centre tap: values and every
    gradient equal x + conv(x) computed the official way (nn.Conv2d on the channels-last view)."""
    torch.manual_seed(k)
    layer = rmt.DWConv2d(13, k, 1, k // 2).to(dtype)
    x = torch.randn(2, 7, 9, 13, dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 7, 9, 13, dtype=dtype)
    got = layer(x, residual=True)
    g_got = torch.autograd.grad(got, [x, layer.conv.weight, layer.conv.bias], dy)
    want = x + layer.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    g_want = torch.autograd.grad(want, [x, layer.conv.weight, layer.conv.bias], dy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **tol)
    torch.testing.assert_close(layer(x), want - x, **tol)  # residual off: the convolution alone


def test_dwconv_residual_is_not_folded_in_low_precision_or_other_strides():
    """Under autocast the centre tap + 1 would round the weight: x + conv(x) is computed as two
    terms there (a bf16 convolution added to x, as the official layer), and a stride-2 layer
    runs nn.Conv2d."""
    torch.manual_seed(0)
    layer = rmt.DWConv2d(8, 3, 1, 1)
    x = torch.randn(2, 6, 6, 8)
    seen = []
    real = rmt.depthwise_conv2d_nhwc

    def spy(x, w, *args, **kwargs):
        seen.append(w.detach().clone())
        return real(x, w, *args, **kwargs)

    rmt.depthwise_conv2d_nhwc = spy
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x, residual=True)
            official = x + layer.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        assert y.dtype == official.dtype
        assert torch.equal(seen[-1], layer.conv.weight.detach())  # not folded
        layer(x, residual=True)
        assert not torch.equal(seen[-1], layer.conv.weight.detach())  # fp32: folded
    finally:
        rmt.depthwise_conv2d_nhwc = real
    want = x + layer.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    torch.testing.assert_close(y.float(), want, atol=6e-2, rtol=6e-2)
    strided = rmt.DWConv2d(8, 3, 2, 1)
    torch.testing.assert_close(strided(x), strided.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


def test_rmt_runs_its_depthwise_convolutions_through_the_op(monkeypatch):
    """The model's depthwise convolutions (positional encoding, LePE, FFN: three per block) are
    vitattn.depthwise_conv2d_nhwc calls, and the official state_dict names are kept."""
    model = rmt.rmt_t().eval()
    assert "layers.0.blocks.0.pos.conv.weight" in model.state_dict()
    assert "layers.0.blocks.0.ffn.dwconv.conv.weight" in model.state_dict()
    calls = []
    real = rmt.depthwise_conv2d_nhwc

    def spy(x, weight, *args, **kwargs):
        calls.append(tuple(weight.shape))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(rmt, "depthwise_conv2d_nhwc", spy)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    blocks = sum(len(layer.blocks) for layer in model.layers)
    assert len(calls) == 3 * blocks and {k for _, _, k, _ in calls} == {3, 5}, calls[:6]
