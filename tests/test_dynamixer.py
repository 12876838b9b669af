"""DynaMixer dynamic mixing: every backend against the dense reference, modules, dispatch, bad input."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vitattn
from vitattn import dynamixer
from vitattn.nn import DynaMixerBlock, DynaMixerOp
from vitattn.reference import dynamixer as reference

from _util import HAS_CUDA, TRITON_DEVICE, assert_close, backends_for, noncontiguous

# the module, not the function (vitattn may export the function under the same name)
dm_mod = importlib.import_module("vitattn.ops.dynamixer.op")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
ALL_BACKENDS = [(dev, be) for dev in DEVICES for be in backends_for(dev)]
TRITON_ONLY = [(TRITON_DEVICE, "triton")] if TRITON_DEVICE else []


def make(lead, L, C, S, d, dtype, device, bias=True, seed=0):
    """Fresh random inputs (scaled like trained weights so softmax stays informative)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    x = rnd(*lead, L, C)
    wc = rnd(S * d, C, scale=C ** -0.5)
    bc = rnd(S * d, scale=0.5) if bias else None
    wg = rnd(L * L, L * d, scale=(L * d) ** -0.5 * 2)
    bg = rnd(L * L, scale=0.5) if bias else None
    return x, wc, bc, wg, bg


def leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(True)


def check_against_reference(args, S, backend, dtype, dy=None, what=""):
    """Values and gradients of every input of dynamixer(backend) vs the fp64 reference."""
    args = [leaf(a) for a in args]
    y = dynamixer(*args, S, backend=backend)
    ref_args = [leaf(None if a is None else a.detach().to(torch.float64)) for a in args]
    y_ref = reference(*ref_args, S)
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert torch.isfinite(y).all()
    assert_close(y, y_ref, dtype, f"{what} y")
    if dy is None:
        dy = torch.randn_like(y_ref).to(dtype)
    ins = [a for a in args if a is not None]
    ref_ins = [a for a in ref_args if a is not None]
    grads = torch.autograd.grad(y, ins, dy)
    ref_grads = torch.autograd.grad(y_ref, ref_ins, dy.to(torch.float64))
    names = [n for n, a in zip(("x", "compress_weight", "compress_bias", "generate_weight", "generate_bias"), args)
             if a is not None]
    for n, g, gr in zip(names, grads, ref_grads):
        assert g.dtype == dtype and g.shape == gr.shape
        # weight gradients sum over every row: compare relative to their magnitude
        scale = max(1.0, gr.abs().max().item()) if n != "x" else 1.0
        assert_close(g / scale, gr / scale, dtype, f"{what} d{n}")
    return y, grads


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients(device, backend, dtype, bias):
    # odd sizes: L=7 (padded to 16 in the kernels), C/S=4, rows=6
    args = make((2, 3), 7, 12, 3, 2, dtype, device, bias=bias)
    check_against_reference(args, 3, backend, dtype, what=f"{backend} {dtype}")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_several_blocks(device, backend):
    # L=21: two column blocks and a 32-wide i tile; L*d=84: two reduction chunks in the kernels;
    # C/S=20 (not a power of two); 40 problems: three problem blocks shared by two groups
    args = make((5, 4), 21, 40, 2, 4, torch.float32, device, seed=1)
    check_against_reference(args, 2, backend, torch.float32, what=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_dynamixer_s_segments(device, backend):
    # the DynaMixer-S segmenting (S=8, d=2) on a short sequence
    args = make((3,), 8, 48, 8, 2, torch.float32, device, seed=2)
    check_against_reference(args, 8, backend, torch.float32, what=backend)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(L=st.integers(1, 20), S=st.integers(1, 4), cs=st.integers(1, 9), d=st.integers(1, 3),
       lead=st.lists(st.integers(1, 3), max_size=3), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(L, S, cs, d, lead, bias, seed):
    # sizes 1 and odd sizes everywhere: L, channels per segment, d, leading dims (0 to 3)
    for device, backend in ALL_BACKENDS:
        args = make(tuple(lead), L, S * cs, S, d, torch.float64, device, bias=bias, seed=seed)
        check_against_reference(args, S, backend, torch.float64, what=f"{backend} L={L} S={S} cs={cs} d={d}")


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 arithmetic is wrong under the Triton interpreter; tested on GPU only")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_cuda(backend):
    args = make((2, 3), 7, 12, 3, 2, torch.bfloat16, "cuda")
    check_against_reference(args, 3, backend, torch.bfloat16, what=backend)


# ---------------------------------------------------------------- strides and layouts


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_transposed_grid_view(device, backend):
    # mixing along H of a (B, H, W, C) grid: x.transpose(1, 2) is read in place
    B, H, W, C, S, d = 2, 6, 5, 8, 2, 2
    _, wc, bc, wg, bg = make((1,), H, C, S, d, torch.float32, device, seed=3)
    grid = torch.randn(B, H, W, C, device=device)
    x = grid.transpose(1, 2)  # (B, W, H, C), non-contiguous
    assert not x.is_contiguous()
    dy = torch.randn(B, W, H, C, device=device).transpose(1, 2).contiguous().transpose(1, 2)
    y, grads = check_against_reference((x, wc, bc, wg, bg), S, backend, torch.float32, dy=dy, what=backend)
    # outputs keep the grid's storage order: transposing back gives a contiguous (B, H, W, C)
    assert y.transpose(1, 2).is_contiguous()
    assert grads[0].shape == x.shape


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_noncontiguous_everything(device, backend):
    # channel stride 2 in x, strided weights and a strided upstream gradient
    x, wc, bc, wg, bg = make((3,), 6, 8, 2, 3, torch.float32, device, seed=4)
    args = (noncontiguous(x), noncontiguous(wc), bc, noncontiguous(wg), noncontiguous(bg))
    assert not args[0].is_contiguous() and not args[3].is_contiguous()
    dy = noncontiguous(torch.randn(3, 6, 8, device=device))
    check_against_reference(args, 2, backend, torch.float32, dy=dy, what=backend)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
@pytest.mark.parametrize("lead", [(), (2, 1, 3, 2)], ids=["2d", "6d"])
def test_leading_dims(device, backend, lead):
    args = make(lead, 5, 6, 3, 1, torch.float32, device, seed=5)
    check_against_reference(args, 3, backend, torch.float32, what=f"{backend} lead={lead}")


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_outputs_freshly_written(device, backend):
    # the op allocates its outputs with torch.empty: recycle NaN-filled blocks of the same
    # sizes first so any element the kernels forget to write shows up as NaN
    args = make((4, 3), 9, 10, 2, 2, torch.float32, device, seed=6)
    for _ in range(3):
        junk = [torch.full((4, 3, 9, 10), float("nan"), device=device) for _ in range(4)]
        del junk
        check_against_reference(args, 2, backend, torch.float32, what=backend)


@pytest.mark.parametrize("device,backend", TRITON_ONLY)
def test_triton_backward_deterministic(device, backend):
    args = [leaf(a) for a in make((5, 4), 9, 8, 2, 2, torch.float32, device, seed=7)]
    dy = torch.randn(5, 4, 9, 8, device=device)
    run = lambda: torch.autograd.grad(dynamixer(*args, 2, backend=backend), args, dy)
    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- gradcheck, compile, export


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_gradcheck_fp64(device, backend):
    # fast mode (random projections of the Jacobian) keeps the interpreter's runtime in check
    args = tuple(leaf(a) for a in make((2,), 5, 6, 2, 2, torch.float64, device, seed=8))
    fn = lambda *a: dynamixer(*a, 2, backend=backend)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, fast_mode=True)
    # full Jacobian on a smaller problem
    args = tuple(leaf(a) for a in make((1,), 3, 2, 1, 1, torch.float64, device, seed=8))
    assert torch.autograd.gradcheck(lambda *a: dynamixer(*a, 1, backend=backend), args, eps=1e-6, atol=1e-7)


def test_opcheck_custom_ops():
    # schema, fake (meta) functions incl. strides, and autograd registration
    x, wc, bc, wg, bg = make((2, 3), 5, 6, 2, 2, torch.float32, "cpu", seed=9)
    x5 = x.reshape(1, 2, 3, 5, 6).transpose(1, 2)
    for b_c, b_g in ((bc, bg), (None, None)):
        ins = [leaf(x5), leaf(wc), leaf(b_c), leaf(wg), leaf(b_g)]
        torch.library.opcheck(torch.ops.vitattn.dynamixer_fwd.default, (*ins, 2, "torch"))
        y, r, lse = torch.ops.vitattn.dynamixer_fwd(*[t.detach() if t is not None else None for t in ins], 2, "torch")
        dy = torch.randn_like(y)
        torch.library.opcheck(torch.ops.vitattn.dynamixer_bwd.default,
                              (dy, x5, wc, wg, b_g, r, lse, 2, b_c is not None, "torch"))


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_torch_compile_fullgraph(device, backend):
    args = [leaf(a) for a in make((2, 3), 5, 6, 2, 2, torch.float32, device, seed=10)]
    fn = torch.compile(lambda *a: dynamixer(*a, 2, backend=backend), fullgraph=True, backend="aot_eager")
    y = fn(*args)
    grads = torch.autograd.grad(y.square().sum(), args)
    y_ref = reference(*args, 2)
    ref_grads = torch.autograd.grad(y_ref.square().sum(), args)
    assert_close(y, y_ref, torch.float32, "compiled y")
    for g, gr in zip(grads, ref_grads):
        assert_close(g, gr, torch.float32, "compiled grad")


def test_export_module():
    torch.manual_seed(0)
    m = DynaMixerOp(8, 5, 2, backend="torch").eval()
    x = torch.randn(3, 5, 8)
    ep = torch.export.export(m, (x,))
    torch.testing.assert_close(ep.module()(x), m(x))


# ---------------------------------------------------------------- modules


def official_op(m: DynaMixerOp, x):
    """The official DynaMixerOp.forward semantics on (B, L, C), written out with m's weights."""
    B, L, C = x.shape
    w = m.compress(x).reshape(B, L, m.num_head, m.reduced_dim).permute(0, 2, 1, 3).reshape(B, m.num_head, -1)
    w = torch.softmax(m.generate(w).reshape(B, m.num_head, L, L), dim=-2)
    x = x.reshape(B, L, m.num_head, C // m.num_head).permute(0, 2, 3, 1)
    return m.out(torch.matmul(x, w).permute(0, 3, 1, 2).reshape(B, L, C))


def official_block(b: DynaMixerBlock, x):
    B, H, W, C = x.shape
    h = official_op(b.mix_h, x.permute(0, 2, 1, 3).reshape(-1, H, C)).reshape(B, W, H, C).permute(0, 2, 1, 3)
    w = official_op(b.mix_w, x.reshape(-1, W, C)).reshape(B, H, W, C)
    c = b.mlp_c(x)
    a = (h + w + c).permute(0, 3, 1, 2).flatten(2).mean(2)
    a = b.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0).unsqueeze(2).unsqueeze(2)
    return b.proj(h * a[0] + w * a[1] + c * a[2])


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_block_matches_official(device, backend):
    torch.manual_seed(11)
    blk = DynaMixerBlock(16, resolution=6, num_head=4, backend=backend).to(device=device, dtype=torch.float64)
    x = torch.randn(2, 6, 6, 16, device=device, dtype=torch.float64, requires_grad=True)
    y = blk(x)
    x2 = x.detach().clone().requires_grad_(True)
    y_off = official_block(blk, x2)
    assert_close(y, y_off, torch.float64, "block")
    dy = torch.randn_like(y)
    params = list(blk.parameters())
    g = torch.autograd.grad(y, [x] + params, dy)
    g_off = torch.autograd.grad(y_off, [x2] + params, dy)
    for a, b in zip(g, g_off):
        assert_close(a, b, torch.float64, "block grad")


def test_official_state_dict_names():
    # keywords as the official VisionBlock passes them
    blk = DynaMixerBlock(32, resolution=8, num_head=8, reduced_dim=4, qkv_bias=False, qk_scale=None, attn_drop=0.0)
    shapes = {k: tuple(v.shape) for k, v in blk.state_dict().items()}
    want = {}
    for m in ("mix_h", "mix_w"):
        want.update({f"{m}.out.weight": (32, 32), f"{m}.out.bias": (32,),
                     f"{m}.compress.weight": (32, 32), f"{m}.compress.bias": (32,),
                     f"{m}.generate.weight": (64, 32), f"{m}.generate.bias": (64,)})
    want.update({"mlp_c.weight": (32, 32), "reweight.fc1.weight": (8, 32), "reweight.fc1.bias": (8,),
                 "reweight.fc2.weight": (96, 8), "reweight.fc2.bias": (96,),
                 "proj.weight": (32, 32), "proj.bias": (32,)})
    assert shapes == want
    # a state_dict saved from another instance loads strictly and reproduces the outputs
    other = DynaMixerBlock(32, 8, 8, 4)  # positional order of the official signature
    other.load_state_dict(blk.state_dict(), strict=True)
    x = torch.randn(1, 8, 8, 32)
    torch.testing.assert_close(other(x), blk(x))


def test_op_module_mix_and_reduced_dim():
    torch.manual_seed(12)
    m = DynaMixerOp(12, 7, 3, reduced_dim=4, backend="torch").double()
    x = torch.randn(4, 7, 12, dtype=torch.float64)
    assert_close(m(x), official_op(m, x), torch.float64, "op module")
    assert_close(m.mix(x), reference(x, m.compress.weight, m.compress.bias, m.generate.weight,
                                     m.generate.bias, 3), torch.float64, "mix")


def test_autocast_cpu_fp16():
    args = make((2,), 5, 6, 2, 2, torch.float32, "cpu", seed=13)
    with torch.autocast("cpu", dtype=torch.float16):
        y = dynamixer(*args, 2, backend="torch")
    assert y.dtype == torch.float16
    half = [None if a is None else a.half().double() for a in args]
    assert_close(y, reference(*half, 2), torch.float16, "autocast")
    # x already in the autocast dtype (the output of an autocast linear), fp32 weights
    x16 = args[0].half().requires_grad_(True)
    w = [leaf(a) for a in args[1:]]
    with torch.autocast("cpu", dtype=torch.float16):
        y = dynamixer(x16, *w, 2, backend="torch")
    assert y.dtype == torch.float16
    assert_close(y, reference(*half, 2), torch.float16, "autocast fp16 x")
    y.float().sum().backward()
    assert x16.grad.dtype == torch.float16 and w[0].grad.dtype == torch.float32
    # outside autocast the mismatch is an error naming the argument
    with pytest.raises(TypeError, match="compress_weight"):
        dynamixer(x16, *w, 2)


# ---------------------------------------------------------------- dispatch


def test_dispatch():
    args = make((2,), 5, 6, 2, 2, torch.float32, "cpu")
    # the interpreter is never chosen automatically; the torch backend serves CPU tensors
    expl = vitattn.explain("dynamixer", *args, 2).reasons()
    assert expl["torch"] is None
    with pytest.raises(ValueError, match="unknown backend"):
        dynamixer(*args, 2, backend="nope")
    with pytest.raises(TypeError, match="backend"):
        dynamixer(*args, 2, backend=3)
    if TRITON_DEVICE == "cpu":
        assert "interpreter" in expl["triton"]


@pytest.mark.skipif(TRITON_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_limits_give_reasons():
    args = make((1,), 65, 4, 2, 1, torch.float32, TRITON_DEVICE)
    with pytest.raises(vitattn.BackendUnavailableError, match="L=65"):
        dynamixer(*args, 2, backend="triton")
    args = make((1,), 32, 2, 2, 17, torch.float32, TRITON_DEVICE)
    with pytest.raises(vitattn.BackendUnavailableError, match="L\\*d=544"):
        dynamixer(*args, 2, backend="triton")
    # channels per segment are bounded by a GPU's shared memory and registers only (the
    # interpreter has neither): tests/test_gpu_compile.py checks those limits per dtype


# ---------------------------------------------------------------- bad input


def _bad_cases():
    x, wc, bc, wg, bg = make((2,), 5, 6, 2, 2, torch.float32, "cpu")
    good = dict(x=x, compress_weight=wc, compress_bias=bc, generate_weight=wg, generate_bias=bg, segments=2)
    cases = [
        ("x", TypeError, dict(x=x.numpy())),
        ("x", TypeError, dict(x=x.to(torch.int64))),
        ("x", ValueError, dict(x=x[0, 0])),
        ("x", ValueError, dict(x=x[:, :0])),
        ("segments", TypeError, dict(segments=2.0)),
        ("segments", ValueError, dict(segments=0)),
        ("segments", ValueError, dict(segments=4)),  # C=6 not divisible by 4
        ("compress_weight", ValueError, dict(compress_weight=wc[:, :5])),
        ("compress_weight", ValueError, dict(compress_weight=wc[:3])),
        ("compress_weight", ValueError, dict(compress_weight=wc[None])),
        ("compress_weight", TypeError, dict(compress_weight=wc.double())),
        ("compress_bias", ValueError, dict(compress_bias=bc[:3])),
        ("compress_bias", TypeError, dict(compress_bias=bc.tolist())),
        ("generate_weight", ValueError, dict(generate_weight=wg[:, :8])),
        ("generate_weight", ValueError, dict(generate_weight=wg[:24])),
        ("generate_weight", TypeError, dict(generate_weight=wg.half())),
        ("generate_bias", ValueError, dict(generate_bias=bg[:24])),
        ("generate_bias", ValueError, dict(generate_bias=bg[None])),
    ]
    return good, cases


@pytest.mark.parametrize("idx", range(len(_bad_cases()[1])))
def test_bad_input(idx):
    good, cases = _bad_cases()
    name, exc, change = cases[idx]
    kw = {**good, **change}
    with pytest.raises(exc, match=name):
        dynamixer(kw["x"], kw["compress_weight"], kw["compress_bias"], kw["generate_weight"], kw["generate_bias"],
                  kw["segments"])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a second device")
def test_bad_device():
    x, wc, bc, wg, bg = make((2,), 5, 6, 2, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="generate_weight"):
        dynamixer(x, wc, bc, wg.cuda(), bg, 2)


def test_block_bad_input():
    with pytest.raises(ValueError, match="num_head"):
        DynaMixerOp(10, 4, 3)
    with pytest.raises(ValueError, match="x must be"):
        DynaMixerBlock(8, resolution=4, num_head=2)(torch.randn(4, 4, 8))
