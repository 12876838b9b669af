"""DynaMixer's C++ CPU backend ("cpu": torch.ops.vitattn_C.dynamixer_cpu_fwd/_bwd, the whole op
with the compress GEMM fused): values and every gradient against the dense reference on fresh
random inputs, fp64 gradcheck, half-precision inputs, odd shapes, strided and transposed x,
poisoned outputs, large logits, thread-count independence, the baseline (DEFAULT)
instruction-set build, dispatch, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vitattn
from vitattn import dynamixer
from vitattn.reference import dynamixer as reference

from _util import noncontiguous

try:
    import vitattn._C  # noqa: F401  (registers torch.ops.vitattn_C)

    HAVE_EXT = hasattr(torch.ops.vitattn_C, "dynamixer_cpu_fwd")
    WHY = "vitattn._C has no dynamixer_cpu_fwd (rebuild the extension)"
except ImportError as exc:
    HAVE_EXT, WHY = False, f"vitattn._C is not built: {exc}"

pytestmark = pytest.mark.skipif(not HAVE_EXT, reason=WHY)

NAMES = ("x", "compress_weight", "compress_bias", "generate_weight", "generate_bias")
# (atol, rtol) against the fp64 reference computed from the same (rounded) inputs; weight
# gradients sum over every row, so they are compared relative to their largest entry
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (5e-5, 2e-4), torch.float16: (1e-2, 1e-2),
       torch.bfloat16: (5e-2, 5e-2)}


def ops():
    return torch.ops.vitattn_C


def make(lead, L, C, S, d, dtype, bias=True, seed=0, logit_scale=2.0):
    """Fresh random inputs, scaled like trained weights so the softmax stays informative."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).to(dtype)
    x = rnd(*lead, L, C)
    wc = rnd(S * d, C, scale=C ** -0.5)
    bc = rnd(S * d, scale=0.5) if bias else None
    wg = rnd(L * L, L * d, scale=(L * d) ** -0.5 * logit_scale)
    bg = rnd(L * L, scale=0.5) if bias else None
    return [x, wc, bc, wg, bg]


def leaves(args, dtype=None):
    return [None if a is None else a.detach().to(dtype or a.dtype).requires_grad_(True) for a in args]


def run(args, S, dy, backend="cpu"):
    ins = leaves(args)
    y = dynamixer(*ins, S, backend=backend)
    grads = torch.autograd.grad(y, [a for a in ins if a is not None], dy)
    return y.detach(), grads


def check(args, S, dtype, dy=None, what=""):
    """y and the gradients of every input of the cpu backend against the fp64 reference."""
    ref_in = leaves(args, torch.float64)
    want = reference(*ref_in, S)
    if dy is None:
        dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64).to(dtype)
    y, grads = run(args, S, dy)
    want_grads = torch.autograd.grad(want, [a for a in ref_in if a is not None], dy.double())
    atol, rtol = TOL[dtype]
    assert y.dtype == dtype and y.shape == want.shape
    torch.testing.assert_close(y.double(), want, atol=atol, rtol=rtol, msg=lambda m: f"{what} y: {m}")
    names = [n for n, a in zip(NAMES, args) if a is not None]
    for name, g, w in zip(names, grads, want_grads):
        assert g.dtype == dtype and g.shape == w.shape, name
        scale = 1.0 if name == "x" else max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g.double() / scale, w / scale, atol=atol, rtol=rtol,
                                   msg=lambda m: f"{what} d{name}: {m}")
    return y, grads


# ---------------------------------------------------------------- values and gradients

SHAPES = [
    # lead, L, C, S, d
    ((2, 3), 7, 12, 3, 2),     # odd L, C/S = 4 (half a vector)
    ((5, 4), 21, 40, 2, 4),    # L*d = 84, C/S = 20, several row blocks
    ((3,), 8, 48, 8, 2),       # DynaMixer-S segmenting on a short row
    ((2,), 1, 6, 2, 1),        # L = 1, d = 1
    ((3,), 5, 15, 5, 1),       # C/S = 3 (odd), d = 1
    ((1, 2), 3, 2, 1, 1),      # tiny everything
    ((2,), 16, 96, 4, 8),      # DynaMixer-L's d = 8
    ((9,), 32, 72, 3, 2),      # L = 32 (logit rows of 4 KiB), C/S = 24
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, (*s[0], *s[1:]))))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_values_and_gradients(shape, dtype, bias):
    lead, L, C, S, d = shape
    check(make(lead, L, C, S, d, dtype, bias=bias, seed=L + C), S, dtype, what=f"{shape} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [((2, 3), 7, 12, 3, 2), ((4,), 16, 64, 4, 2)], ids=["odd", "even"])
def test_half_precision_inputs(dtype, shape):
    # accumulated in fp32; the reference runs in fp64 on the same rounded inputs
    lead, L, C, S, d = shape
    check(make(lead, L, C, S, d, dtype, seed=3), S, dtype, what=str(dtype))


def test_same_as_torch_backend_float64():
    args = make((2, 5), 9, 20, 4, 3, torch.float64, seed=4)
    dy = torch.randn(2, 5, 9, 20, dtype=torch.float64)
    y, g = run(args, 4, dy, "cpu")
    y_t, g_t = run(args, 4, dy, "torch")
    torch.testing.assert_close(y, y_t, atol=1e-12, rtol=1e-10)
    for a, b in zip(g, g_t):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_fp64(bias):
    ins = tuple(leaves(make((2,), 5, 6, 2, 2, torch.float64, bias=bias, seed=5)))
    ins = tuple(a for a in ins if a is not None)
    if bias:
        fn = lambda x, wc, bc, wg, bg: dynamixer(x, wc, bc, wg, bg, 2, backend="cpu")
    else:
        fn = lambda x, wc, wg: dynamixer(x, wc, None, wg, None, 2, backend="cpu")
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-7)
    # a single token and single channel per segment, full Jacobian
    ins = tuple(a for a in leaves(make((3,), 1, 3, 3, 1, torch.float64, seed=6)) if a is not None)
    assert torch.autograd.gradcheck(lambda *a: dynamixer(*a, 3, backend="cpu"), ins, eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- layouts and strides


def test_transposed_grid_view():
    # mixing along H of a (B, H, W, C) grid: x.transpose(1, 2) is read and written in place
    B, H, W, C, S, d = 2, 7, 5, 16, 2, 2
    _, wc, bc, wg, bg = make((1,), H, C, S, d, torch.float32, seed=7)
    grid = torch.randn(B, H, W, C, generator=torch.Generator().manual_seed(8))
    x = grid.transpose(1, 2)
    assert not x.is_contiguous()
    dy = torch.randn(B, H, W, C, generator=torch.Generator().manual_seed(9)).transpose(1, 2)
    y, grads = check([x, wc, bc, wg, bg], S, torch.float32, dy=dy, what="transposed")
    assert y.transpose(1, 2).is_contiguous() and grads[0].transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_inputs_give_identical_results(dtype):
    # channel stride 2 in x and dy, strided weights and biases: the same bits as contiguous copies
    args = make((3, 2), 6, 24, 3, 2, dtype, seed=10)
    dy = torch.randn(3, 2, 6, 24, generator=torch.Generator().manual_seed(11)).to(dtype)
    strided = [None if a is None else noncontiguous(a) for a in args]
    assert not strided[0].is_contiguous() and not strided[3].is_contiguous()
    y, g = run(args, 3, dy)
    y_s, g_s = run(strided, 3, noncontiguous(dy))
    assert torch.equal(y, y_s)
    for a, b in zip(g, g_s):
        assert torch.equal(a, b)
    check(strided, 3, dtype, dy=noncontiguous(dy), what="strided")


def test_expanded_upstream_gradient():
    # y.sum().backward() hands the kernels a dy with zero strides
    args = leaves(make((4,), 6, 8, 2, 2, torch.float64, seed=12))
    dynamixer(*args, 2, backend="cpu").sum().backward()
    ref = leaves(make((4,), 6, 8, 2, 2, torch.float64, seed=12))
    reference(*ref, 2).sum().backward()
    for a, b in zip(args, ref):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-8)


def test_outputs_fully_written():
    # every output is allocated with torch.empty: recycle NaN-filled blocks of the sizes the
    # op allocates first, so an element the kernels forget to write shows up as NaN
    args = make((4, 3), 9, 20, 2, 2, torch.float32, seed=13)
    for _ in range(3):
        junk = [torch.full((4, 3, 9, 20), float("nan")) for _ in range(4)]
        junk += [torch.full((4, 3, 9, 4), float("nan")), torch.full((81, 18), float("nan")),
                 torch.full((81,), float("nan")), torch.full((4, 20), float("nan"))]
        del junk
        y, grads = check(args, 2, torch.float32, what="poisoned")
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)


def test_raw_entry_points_write_r_and_lse():
    # r is the compressed x (saved for the backward), lse the log-sum-exp over i per column j
    x, wc, bc, wg, bg = make((1, 2, 3), 7, 12, 3, 2, torch.float64, seed=14)
    y, r = torch.full_like(x, float("nan")), torch.full((1, 2, 3, 7, 6), float("nan"), dtype=torch.float64)
    lse = ops().dynamixer_cpu_fwd(x, wc, bc, wg, bg, 3, y, r)
    torch.testing.assert_close(r, torch.nn.functional.linear(x, wc, bc), atol=1e-12, rtol=1e-12)
    z = torch.nn.functional.linear(r.reshape(6, 7, 3, 2).transpose(1, 2).reshape(6, 3, 14), wg, bg)
    want = torch.logsumexp(z.reshape(6, 3, 7, 7), dim=2).reshape(1, 2, 3, 3, 7)
    torch.testing.assert_close(lse, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, reference(x, wc, bc, wg, bg, 3), atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- numerics and determinism


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_logits(dtype):
    # logits of several thousand: the softmax is nearly one-hot; the backward recomputes its
    # max and sum bitwise (no fp32 log-sum-exp with an absolute error of ~1e-4 in the way)
    args = make((2,), 6, 8, 2, 2, dtype, seed=15, logit_scale=1500.0)
    x, wc, bc, wg, bg = (None if a is None else a.double() for a in args)
    with torch.no_grad():
        r = torch.nn.functional.linear(x, wc, bc).reshape(2, 6, 2, 2).transpose(1, 2).reshape(2, 2, 12)
        assert float(torch.nn.functional.linear(r, wg, bg).abs().max()) > 2e3
    check(args, 2, dtype, what="large logits")


def test_all_equal_logits_average():
    # zero generate weight and a constant bias: y is the mean of x over the tokens
    x, wc, _, _, _ = make((3,), 7, 6, 3, 2, torch.float32, seed=16)
    wg, bg = torch.zeros(49, 14), torch.full((49,), 0.4)
    y = dynamixer(x, wc, None, wg, bg, 3, backend="cpu")
    torch.testing.assert_close(y, x.mean(dim=1, keepdim=True).expand_as(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [((6, 5), 32, 48, 2, 2), ((3, 40), 16, 32, 4, 8)], ids=["L32", "L16d8"])
def test_bitwise_identical_1_and_2_threads(shape):
    # several row blocks and weight-gradient groups: tasks may land on either thread
    lead, L, C, S, d = shape
    args = make(lead, L, C, S, d, torch.float32, seed=17)
    dy = torch.randn(*lead, L, C, generator=torch.Generator().manual_seed(18))
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 2, 1):
            torch.set_num_threads(threads)
            runs.append(run(args, S, dy))
    finally:
        torch.set_num_threads(before)
    y0, g0 = runs[0]
    for y, g in runs[1:]:
        assert torch.equal(y, y0)
        for a, b in zip(g, g0):
            assert torch.equal(a, b)


DEFAULT_ISA_SCRIPT = textwrap.dedent("""
    import torch, vitattn._C
    from vitattn import dynamixer
    from vitattn.reference import dynamixer as reference
    isa = vitattn._C.cpu_isa()
    assert isa.startswith("default"), isa
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4), (torch.bfloat16, 5e-2)):
        for L, C, S, d in ((7, 12, 3, 2), (16, 64, 4, 8)):
            x = torch.randn(2, 3, L, C, generator=g, dtype=torch.float64)
            wc = torch.randn(S * d, C, generator=g, dtype=torch.float64) * C ** -0.5
            bc = torch.randn(S * d, generator=g, dtype=torch.float64) * 0.5
            wg = torch.randn(L * L, L * d, generator=g, dtype=torch.float64) * (L * d) ** -0.5 * 2
            bg = torch.randn(L * L, generator=g, dtype=torch.float64) * 0.5
            ins = [t.to(dtype).requires_grad_() for t in (x, wc, bc, wg, bg)]
            ref = [t.detach().double().requires_grad_() for t in ins]
            y = dynamixer(*ins, S, backend="cpu")
            want = reference(*ref, S)
            torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)
            dy = torch.randn(want.shape, generator=g, dtype=torch.float64)
            got = torch.autograd.grad(y, ins, dy.to(dtype))
            exp = torch.autograd.grad(want, ref, dy)
            for a, b in zip(got, exp):
                s = max(1.0, float(b.abs().max()))
                torch.testing.assert_close(a.double() / s, b / s, atol=tol, rtol=tol)
    print("ok", isa)
""")


def test_default_isa_build_in_subprocess():
    # the baseline copy of the kernels (no AVX), chosen by PyTorch's ATEN_CPU_CAPABILITY
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", DEFAULT_ISA_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok default"), res.stdout


# ---------------------------------------------------------------- dispatch


def test_auto_chooses_cpu_and_explain_lists_it():
    args = make((2,), 5, 6, 2, 2, torch.float32, seed=19)
    expl = vitattn.explain("dynamixer", *args, 2)
    assert expl.reasons()["cpu"] is None
    assert expl.chosen == "cpu"
    y = dynamixer(*args, 2)
    torch.testing.assert_close(y, dynamixer(*args, 2, backend="cpu"), atol=0, rtol=0)


def test_cpu_backend_rejects_other_dtypes_with_a_reason():
    from vitattn.ops.dynamixer.backends import dispatcher

    why = dispatcher.reason("cpu", dict(device=torch.device("cpu"), dtype=torch.float8_e4m3fn, L=4, C=4, S=1, d=1))
    assert why is not None and "float8" in why


def test_empty_batch():
    args = leaves(make((0, 3), 5, 6, 2, 2, torch.float32, seed=20))
    y = dynamixer(*args, 2, backend="cpu")
    assert y.shape == (0, 3, 5, 6)
    grads = torch.autograd.grad(y.sum(), args)
    assert all(g.shape == a.shape and not g.any() for g, a in zip(grads, args))


# ---------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    f, b = ops().dynamixer_cpu_fwd, ops().dynamixer_cpu_bwd
    x, wc, bc, wg, bg = make((1, 1, 2), 5, 6, 2, 2, torch.float32, seed=21)
    y, r = torch.empty_like(x), torch.empty(1, 1, 2, 5, 4)
    f(x, wc, bc, wg, bg, 2, y, r)
    dy, dx = torch.randn_like(x), torch.empty_like(x)
    b(dy, x, r, wc, wg, bg, 2, True, dx)
    cases = [
        (TypeError, "x must be float32, float64, float16 or bfloat16", lambda: f(x.long(), wc, bc, wg, bg, 2, y, r)),
        (ValueError, "x must have 5 dims", lambda: f(x[0], wc, bc, wg, bg, 2, y, r)),
        (ValueError, "segments must be positive", lambda: f(x, wc, bc, wg, bg, 0, y, r)),
        (ValueError, "divisible by segments=4", lambda: f(x, wc, bc, wg, bg, 4, y, r)),
        (TypeError, "compress_weight must have dtype", lambda: f(x, wc.double(), bc, wg, bg, 2, y, r)),
        (ValueError, "compress_weight must have shape", lambda: f(x, wc[:3], bc, wg, bg, 2, y, r)),
        (ValueError, "compress_weight must have shape", lambda: f(x, wc[:, :5], bc, wg, bg, 2, y, r)),
        (ValueError, "compress_bias must have shape", lambda: f(x, wc, bc[:3], wg, bg, 2, y, r)),
        (ValueError, "generate_weight must have shape", lambda: f(x, wc, bc, wg[:24], bg, 2, y, r)),
        (TypeError, "generate_weight must have dtype", lambda: f(x, wc, bc, wg.half(), bg, 2, y, r)),
        (ValueError, "generate_bias must have 1 dims", lambda: f(x, wc, bc, wg, bg[None], 2, y, r)),
        (ValueError, "generate_bias must have shape", lambda: f(x, wc, bc, wg, bg[:24], 2, y, r)),
        (ValueError, "y must have shape", lambda: f(x, wc, bc, wg, bg, 2, y[..., :4], r)),
        (TypeError, "y must have dtype", lambda: f(x, wc, bc, wg, bg, 2, y.double(), r)),
        (ValueError, "y must not overlap itself", lambda: f(x, wc, bc, wg, bg, 2, y[..., :1].expand_as(y), r)),
        (ValueError, "r must have shape", lambda: f(x, wc, bc, wg, bg, 2, y, r[..., :2])),
        (ValueError, "dy must have shape", lambda: b(dy[..., :4], x, r, wc, wg, bg, 2, True, dx)),
        (TypeError, "dy must have dtype", lambda: b(dy.double(), x, r, wc, wg, bg, 2, True, dx)),
        (ValueError, "r must have shape", lambda: b(dy, x, r[:, :, :1], wc, wg, bg, 2, True, dx)),
        (TypeError, "r must have dtype", lambda: b(dy, x, r.half(), wc, wg, bg, 2, True, dx)),
        (ValueError, "dx must have shape", lambda: b(dy, x, r, wc, wg, bg, 2, True, dx[:, :, :1])),
        (ValueError, "generate_weight must have shape", lambda: b(dy, x, r, wc, wg[:, :8], bg, 2, True, dx)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="x must be a CPU tensor"):
            f(x.cuda(), wc, bc, wg, bg, 2, y, r)
