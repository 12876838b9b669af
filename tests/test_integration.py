"""Integration with the PyTorch stack, for every op and for model blocks.

* torch.compile(fullgraph=True) over every op (backend="aot_eager": no graph break, the
  custom ops' fake and autograd registrations traced) and over whole RMT blocks (both
  retention forms); one inductor compile;
* autocast: the ops run in the autocast dtype and return it (CPU autocast with bf16 on the
  torch backend; fp16 on the Triton kernels, whose interpreter bf16 is wrong);
* torch.export of every op and of one small model;
* torch.utils.checkpoint over blocks of every model family: the same gradients as without.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.utils.checkpoint as ckpt

from _util import TOL, backends_for

_masa = importlib.import_module("vitattn.ops.masa.op")
_sk = importlib.import_module("vitattn.ops.sinkhorn.op")
_ga = importlib.import_module("vitattn.ops.group_attention.op")
_dm = importlib.import_module("vitattn.ops.dynamixer.op")
R = importlib.import_module("vitattn.ops.masa.reference")
R_dm = importlib.import_module("vitattn.ops.dynamixer.reference")
R_ga = importlib.import_module("vitattn.ops.group_attention.reference")
R_sk = importlib.import_module("vitattn.ops.sinkhorn.reference")
rmt = importlib.import_module("vitattn.models.rmt")
sret = importlib.import_module("vitattn.models.sret")
setformer = importlib.import_module("vitattn.models.setformer")
dmodel = importlib.import_module("vitattn.models.dynamixer")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = backends_for(DEV)
F32 = torch.float32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rand(*shape, seed=0, dtype=F32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


# ---------------------------------------------------------------- one call per op
#
# (name, make inputs, fn(backend) -> callable on the inputs, reference on the same inputs)

def _masa_case(decomposed):
    def inputs():
        return [rand(1, 2, 3, 5, 8, seed=1), rand(1, 2, 3, 5, 8, seed=2), rand(1, 2, 3, 5, 6, seed=3),
                torch.tensor([0.6, 0.9], device=DEV)]

    def fn(backend):
        return lambda q, k, v, g: _masa.masa(q, k, v, g, decomposed=decomposed, backend=backend)

    return inputs, fn, lambda q, k, v, g: R.masa(q, k, v, g, decomposed=decomposed)


def _sinkhorn_case():
    def inputs():
        return [rand(2, 6, 5, seed=4), 0.5 + torch.rand(6, generator=torch.Generator().manual_seed(5)).to(DEV)]

    def fn(backend):
        return lambda S, a: _sk.sinkhorn(S, eps=0.2, iters=4, a=a, backend=backend)

    return inputs, fn, lambda S, a: R_sk.sinkhorn(S, eps=0.2, iters=4, a=a)


def _ot_case(attention):
    op = _sk.ot_attention if attention else _sk.ot_aggregate
    rop = R_sk.ot_attention if attention else R_sk.ot_aggregate
    pf = _sk.gaussian_filter_1d(7, 4, sigma=0.5, device=DEV)

    def inputs():
        return [rand(1, 2, 7, 8, seed=6, scale=0.5), rand(2, 4, 8, seed=7, scale=0.5), rand(1, 2, 7, 5, seed=8)]

    def fn(backend):
        return lambda x, r, v: op(x, r, v, eps=0.3, iters=3, pos_filter=pf, backend=backend)

    return inputs, fn, lambda x, r, v: rop(x, r, v, eps=0.3, iters=3, pos_filter=pf)


def _group_case():
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(9)).to(DEV)

    def inputs():
        return [rand(1, 2, 12, 8, seed=10), rand(1, 2, 12, 8, seed=11), rand(1, 2, 12, 5, seed=12)]

    def fn(backend):
        return lambda q, k, v: _ga.group_attention(q, k, v, 3, perm=perm, backend=backend)

    return inputs, fn, lambda q, k, v: R_ga.group_attention(q, k, v, 3, perm=perm)


def _dynamixer_case():
    L, C, S, d = 5, 6, 2, 2

    def inputs():
        return [rand(2, L, C, seed=13), rand(S * d, C, seed=14, scale=0.5), rand(S * d, seed=15),
                rand(L * L, L * d, seed=16, scale=0.5), rand(L * L, seed=17)]

    def fn(backend):
        return lambda *a: _dm.dynamixer(*a, S, backend=backend)

    return inputs, fn, lambda *a: R_dm.dynamixer(*a, S)


CASES = {
    "masa": _masa_case(False),
    "masa_decomposed": _masa_case(True),
    "sinkhorn": _sinkhorn_case(),
    "ot_aggregate": _ot_case(False),
    "ot_attention": _ot_case(True),
    "group_attention": _group_case(),
    "dynamixer": _dynamixer_case(),
}


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _value_and_grads(f, tensors):
    leaves = _leaves(tensors)
    out = f(*leaves)
    dout = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=torch.float64).reshape(out.shape)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), grads


# ---------------------------------------------------------------- torch.compile

# every op on the torch backend; the Triton path goes through the same custom op with another
# backend string, so one Triton case (the interpreter is slow) covers its tracing
COMPILE_CASES = [(n, "torch") for n in sorted(CASES)] + [("masa", b) for b in BACKENDS if b != "torch"]


@pytest.mark.parametrize("name,backend", COMPILE_CASES)
def test_compile_fullgraph_every_op(name, backend):
    inputs, fn, _ = CASES[name]
    f = fn(backend)
    torch._dynamo.reset()
    # fullgraph=True: any graph break (logging, data-dependent checks, untraceable code) is an error
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = inputs()
    got, ggot = _value_and_grads(compiled, x)
    want, gwant = _value_and_grads(f, x)
    # aot_eager runs the same kernels: equal up to reassociation in the surrounding autograd
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    for a, b in zip(ggot, gwant):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_compile_inductor_one_op():
    # inductor generates C++ around the opaque custom op: the op stays correct in a fused graph
    inputs, fn, ref = CASES["group_attention"]
    f = fn("torch")

    def model(q, k, v):
        return torch.nn.functional.gelu(f(q * 0.5, k, v) + 1.0).sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = inputs()
    got, ggot = _value_and_grads(compiled, x)
    want, gwant = _value_and_grads(model, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(ggot, gwant):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("retention", ["chunk", "whole"])
def test_compile_fullgraph_rmt_block(retention):
    torch.manual_seed(20)
    blk = rmt.RetBlock(retention, 32, 2, 64, layerscale=True, layer_init_values=0.5, attn_backend="torch").to(DEV)
    relpos = rmt.RetNetRelPos2d(32, 2, 2, 4).to(DEV)
    x = rand(2, 5, 7, 32, seed=21)
    f = lambda x: blk(x, relpos(5, 7))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, (gx,) = _value_and_grads(compiled, [x])
    want, (gx_want,) = _value_and_grads(f, [x])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_want, atol=1e-5, rtol=1e-5)
    # parameter gradients through the compiled block equal the eager ones
    params = list(blk.parameters())
    g1 = torch.autograd.grad(compiled(x).square().sum(), params)
    g2 = torch.autograd.grad(f(x).square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- autocast

def _autocast_check(name, backend, low):
    inputs, fn, ref = CASES[name]
    x = inputs()
    leaves = _leaves(x)
    with torch.autocast(DEV, dtype=low):
        out = fn(backend)(*leaves)
    assert out.dtype == low, f"{name}: under autocast({low}) the op returned {out.dtype}"
    # the op ran in the low precision: it matches the reference on the inputs rounded to `low`
    # (marginals / decays / filters are exact data and stay fp32, as in the op)
    rounded = [t.to(low).double() if i < _n_activations(name) else t.double() for i, t in enumerate(x)]
    want = ref(*rounded)
    atol, rtol = TOL[low]
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=rtol)
    # gradients flow back to the fp32 leaves in their own dtype
    grads = torch.autograd.grad(out.float().sum(), [t for t in leaves if t.requires_grad])
    for g, t in zip(grads, [t for t in leaves if t.requires_grad]):
        assert g.dtype == t.dtype and torch.isfinite(g).all()


def _n_activations(name):
    # leading inputs cast by autocast (the others, a / gamma, stay in fp32)
    return {"masa": 3, "masa_decomposed": 3, "sinkhorn": 1, "ot_aggregate": 3, "ot_attention": 3,
            "group_attention": 3, "dynamixer": 5}[name]


@pytest.mark.parametrize("name", sorted(CASES))
def test_autocast_bf16_torch_backend(name):
    if DEV == "cpu" and not torch.amp.is_autocast_available("cpu"):
        pytest.skip("CPU autocast unavailable")
    _autocast_check(name, "torch", torch.bfloat16)


@pytest.mark.parametrize("name", sorted(CASES))
def test_autocast_fp16_triton(name):
    if "triton" not in BACKENDS:
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    # fp16 (not bf16) on the Triton kernels: the interpreter's bf16 arithmetic is wrong
    _autocast_check(name, "triton", torch.float16)


def test_autocast_rmt_block_runs_in_bf16():
    torch.manual_seed(22)
    blk = rmt.RetBlock("whole", 32, 2, 64, attn_backend="torch").to(DEV)
    relpos = rmt.RetNetRelPos2d(32, 2, 2, 4).to(DEV)
    x = rand(1, 4, 6, 32, seed=23).requires_grad_(True)
    seen = []
    h = blk.retention.out_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    try:
        with torch.autocast(DEV, dtype=torch.bfloat16):
            y = blk(x, relpos(4, 6))
    finally:
        h.remove()
    assert seen == [torch.bfloat16]  # the attention output (op + LCE) reached the projection in bf16
    with torch.no_grad():
        want = blk(x, relpos(4, 6))
    torch.testing.assert_close(y.float(), want, atol=0.1, rtol=0.05)
    gx, = torch.autograd.grad(y.float().sum(), x)
    assert gx.dtype == F32 and torch.isfinite(gx).all()


# ---------------------------------------------------------------- torch.export

class _OpModule(torch.nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, *args):
        return self.f(*args)


@pytest.mark.parametrize("name", sorted(CASES))
def test_export_every_op(name):
    inputs, fn, _ = CASES[name]
    x = inputs()
    m = _OpModule(fn("torch"))
    ep = torch.export.export(m, tuple(x))
    # the op appears as the registered custom op, not decomposed or inlined Python
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert any("vitattn." in t for t in targets), targets
    torch.testing.assert_close(ep.module()(*x), m(*x), atol=0, rtol=0)


def test_export_small_model():
    torch.manual_seed(24)
    model = setformer.SeTformer(num_classes=5, embed_dim=16, depths=(1, 1), num_heads=(2, 2), ref_sides=(2, 2),
                                attn_backend="torch").eval()
    x = rand(1, 3, 32, 32, seed=25)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(ep.module()(x), want, atol=1e-5, rtol=1e-5)
    # new input values through the exported program
    x2 = rand(1, 3, 32, 32, seed=26)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), model(x2), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- activation checkpointing

def _grads_with_and_without_checkpoint(blocks, x, *extra):
    """Gradients of the input and all parameters, blocks run plainly and under checkpoint."""
    params = [p for b in blocks for p in b.parameters()]
    results = []
    for use_ckpt in (False, True):
        torch.manual_seed(31)  # the same random draws (SReT's training permutations) in both runs
        h = x.detach().clone().requires_grad_(True)
        y = h
        for b in blocks:
            y = ckpt.checkpoint(b, y, *extra, use_reentrant=False) if use_ckpt else b(y, *extra)
        loss = (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum()
        results.append((y.detach(), torch.autograd.grad(loss, [h] + params)))
    return results


def _assert_same(results, what):
    (y0, g0), (y1, g1) = results
    # checkpointing recomputes the same deterministic forward: bitwise-equal results
    assert torch.equal(y0, y1), f"{what}: outputs differ under checkpoint"
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert torch.equal(a, b), f"{what}: gradient {i} differs under checkpoint"


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_rmt_blocks(backend):
    torch.manual_seed(30)
    blocks = [rmt.RetBlock(r, 16, 2, 32, attn_backend=backend).to(DEV) for r in ("chunk", "whole")]
    relpos = rmt.RetNetRelPos2d(16, 2, 2, 4).to(DEV)
    _assert_same(_grads_with_and_without_checkpoint(blocks, rand(1, 3, 4, 16, seed=31), relpos(3, 4)),
                 f"RMT blocks [{backend}]")


def test_checkpoint_rmt_model_flag():
    # the model's own use_checkpoints switch: same logits and parameter gradients
    torch.manual_seed(32)
    cfg = dict(embed_dims=[16, 16], depths=[1, 1], num_heads=[2, 2], init_values=[2, 2], heads_ranges=[4, 4],
               mlp_ratios=[2, 2], chunkwise_recurrents=[True, False], projection=16, num_classes=3,
               layerscales=[False, True], drop_path_rate=0.0, attn_backend="torch")
    a = rmt.VisRetNet(**cfg, use_checkpoints=[False, False]).to(DEV)
    b = rmt.VisRetNet(**cfg, use_checkpoints=[True, True]).to(DEV)
    b.load_state_dict(a.state_dict())
    x = rand(2, 3, 32, 32, seed=33)
    ga = torch.autograd.grad(a(x).square().sum(), list(a.parameters()))
    gb = torch.autograd.grad(b(x).square().sum(), list(b.parameters()))
    for u, w in zip(ga, gb):
        torch.testing.assert_close(u, w, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_sret_blocks(backend):
    torch.manual_seed(34)
    blocks = [sret.SReTBlock(16, 2, 2, 2, 2.0, attn_backend=backend, num_tokens=16).to(DEV) for _ in range(2)]
    for b in blocks:
        b.train()  # training mode: the permuted attention draws random permutations
    _assert_same(_grads_with_and_without_checkpoint(blocks, rand(2, 16, 16, seed=35)), f"SReT blocks [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_setformer_blocks(backend):
    torch.manual_seed(36)
    blocks = [setformer.SeTBlock(16, 2, 2, 2.0, layer_scale=0.5, iters=3, attn_backend=backend).to(DEV)
              for _ in range(2)]
    _assert_same(_grads_with_and_without_checkpoint(blocks, rand(1, 4, 4, 16, seed=37)),
                 f"SeTformer blocks [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_dynamixer_blocks(backend):
    torch.manual_seed(38)
    blocks = [dmodel.DynaMixerLayer(16, 4, 2, 2, 2.0, attn_backend=backend).to(DEV) for _ in range(2)]
    _assert_same(_grads_with_and_without_checkpoint(blocks, rand(2, 4, 4, 16, seed=39)),
                 f"DynaMixer blocks [{backend}]")
