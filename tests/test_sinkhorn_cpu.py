"""Sinkhorn / OT "cpu" backend (C++ kernels in vitattn._C, csrc/cpu/sinkhorn*): values and
gradients against the dense reference loop on fresh random inputs, every path of the
stabilised scaling form (absorption, exact log-domain rows and columns, the log-domain
backward), layouts, dtypes, thread-count determinism, the baseline instruction set, dispatch
and bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import vitattn
import vitattn._extension as ext
from vitattn.ops.sinkhorn import backends as BK
from vitattn.ops.sinkhorn import op as SK
from vitattn.ops.sinkhorn import reference as R

from _util import noncontiguous

_CPU_WHY = BK.dispatcher.reason("cpu", {"device": torch.device("cpu")})
pytestmark = pytest.mark.skipif(_CPU_WHY is not None, reason=f"the Sinkhorn CPU kernels are not built: {_CPU_WHY}")

# (atol relative to the largest reference entry, rtol) per dtype: tests/test_sinkhorn.py's
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (3e-5, 3e-4), torch.float16: (2e-3, 1e-2),
       torch.bfloat16: (1e-2, 5e-2)}


def close(got, want, dtype, what):
    """|got - want| <= atol * max|want| + rtol * |want| elementwise (plans are tiny numbers)."""
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    atol, rtol = TOL[dtype]
    scale = want.abs().max().clamp_min(1e-300)
    torch.testing.assert_close(got, want, atol=atol * float(scale), rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.fixture
def poisoned():
    """Fresh tensors (outputs, also the kernels' workspace) start as NaN: unwritten entries show."""
    before = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(before)
    torch.utils.deterministic.fill_uninitialized_memory = fill


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sk_case(batch, n, m, dtype, seed, scale=2.0, marginals=True):
    g = _gen(seed)
    S = (torch.randn(*batch, n, m, generator=g, dtype=torch.float64) * scale).to(dtype)
    a = b = None
    if marginals:
        a = (torch.rand(n, generator=g, dtype=torch.float64) + 0.5)                       # broadcast over the batch
        b = (torch.rand(*batch[:1], *([1] * (len(batch) - 1)), m, generator=g, dtype=torch.float64) + 0.5)
    return S, a, b


def _sk_check(S, a, b, eps, iters, dtype, tag, grad_dtype=None):
    """cpu against the fp64 reference: plan and the gradients of S, a, b."""
    S = S.detach().requires_grad_()
    ag = None if a is None else a.detach().requires_grad_()
    bg = None if b is None else b.detach().requires_grad_()
    P = vitattn.sinkhorn(S, eps=eps, iters=iters, a=ag, b=bg, backend="cpu")
    assert P.dtype == S.dtype and P.shape == S.shape
    S64 = S.detach().double().requires_grad_()
    a64 = None if a is None else a.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    Pr = R.sinkhorn(S64, eps=eps, iters=iters, a=a64, b=b64)
    close(P, Pr, dtype, f"{tag} plan")
    w = torch.randn(Pr.shape, generator=_gen(99), dtype=torch.float64)
    leaves = [t for t in (S, ag, bg) if t is not None]
    rleaves = [t for t in (S64, a64, b64) if t is not None]
    got = torch.autograd.grad((P.double() * w).sum(), leaves)
    want = torch.autograd.grad((Pr * w).sum(), rleaves)
    assert got[0].dtype == S.dtype
    for name, x, y in zip(("dS", "da", "db"), got, want):
        close(x, y, grad_dtype or dtype, f"{tag} {name}")


def _ot_case(B, H, n, m, d, dv, dtype, seed, unit=False):
    g = _gen(seed)
    x = torch.randn(B, H, n, d, generator=g, dtype=torch.float64)
    ref = torch.randn(H, m, d, generator=g, dtype=torch.float64)
    if unit:  # SeTformer's unit-norm features and references
        x, ref = torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(ref, dim=-1)
    v = torch.randn(B, H, n, dv, generator=g, dtype=torch.float64)
    return x.to(dtype), ref.to(dtype), v.to(dtype)


def _ot_check(x, ref, v, filt, eps, iters, attention, dtype, tag, grad_dtype=None):
    """cpu against the fp64 reference: output and the gradients of x, ref, v (v may be None)."""
    leaves = [t.detach().requires_grad_() for t in (x, ref, v) if t is not None]
    fn = vitattn.ot_attention if attention else vitattn.ot_aggregate
    rfn = R.ot_attention if attention else R.ot_aggregate
    out = fn(*leaves[:2], leaves[2] if v is not None else None, eps=eps, iters=iters, pos_filter=filt, backend="cpu")
    assert out.dtype == x.dtype
    rleaves = [t.detach().double().requires_grad_() for t in (x, ref, v) if t is not None]
    want = rfn(*rleaves[:2], rleaves[2] if v is not None else None, eps=eps, iters=iters,
               pos_filter=None if filt is None else filt.double())
    assert out.shape == want.shape
    close(out, want, dtype, f"{tag} out")
    w = torch.randn(want.shape, generator=_gen(98), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), leaves)
    exp = torch.autograd.grad((want * w).sum(), rleaves)
    for name, a, b in zip(("dx", "dref", "dv"), got, exp):
        assert a.dtype == x.dtype
        close(a, b, grad_dtype or dtype, f"{tag} {name}")


# ---------------------------------------------------------------- sinkhorn


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,n,m", [((2, 2), 37, 19), ((3,), 300, 70), ((1,), 1, 5), ((2,), 5, 1), ((1,), 7, 5)])
def test_sinkhorn_values_and_gradients(dtype, batch, n, m, poisoned):
    # n = 300: three row blocks of the kernels; (2, 2) batch with a and b broadcast
    S, a, b = _sk_case(batch, n, m, dtype, seed=n * 7 + m)
    if n == 1 or m == 1:
        # one row or one column: the plan does not depend on S (dS vanishes); checked absolutely
        P = vitattn.sinkhorn(S.requires_grad_(), eps=0.3, iters=4, a=a, b=b, backend="cpu")
        close(P, R.sinkhorn(S.detach().double(), eps=0.3, iters=4, a=a, b=b), dtype, "plan")
        dS, = torch.autograd.grad(P.sum() * 1.0 + (P * torch.randn_like(P)).sum(), S)
        assert float(dS.abs().max()) < (1e-12 if dtype == torch.float64 else 1e-5)
        return
    _sk_check(noncontiguous(S), a, b, 0.3, 4, dtype, f"{batch} {n}x{m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_half_inputs(dtype):
    # fp16/bf16 scores computed in fp32; plan and dS stored in the input dtype
    S, a, b = _sk_case((3,), 37, 19, dtype, seed=3)
    _sk_check(S, a, b, 0.3, 4, dtype, str(dtype))


def test_sinkhorn_defaults_single_iteration_and_uniform():
    for iters in (1, 2):
        S, _, _ = _sk_case((4,), 17, 33, torch.float64, seed=iters, marginals=False)
        _sk_check(S, None, None, 0.1, iters, torch.float64, f"iters={iters}")
    # all-equal scores: the plan is a_i b_j / sum(a) after one column update; the gradient is that
    # of a constant-shift-invariant map
    S = torch.full((2, 9, 4), 0.37, dtype=torch.float64)
    _sk_check(S, torch.rand(9, dtype=torch.float64) + 0.1, None, 0.2, 3, torch.float64, "equal scores")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_absorption_regime(dtype):
    # |S| / eps up to ~100: the potentials move by more than the absorption threshold (16 in
    # fp32, 64 in fp64) during the first iterations, so rows and columns are absorbed
    S, a, b = _sk_case((2,), 41, 23, torch.float64, seed=5, scale=1.0)
    eps = 0.02 if dtype == torch.float64 else 0.1
    _sk_check(S.to(dtype), a, b, eps, 12, dtype, "absorbing")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_exact_rows_columns_and_logdomain_backward(dtype):
    # Masses of 1e-300 (fp64) / 1e-30 (fp32): every product of the scaling form falls under the
    # trusted range, so every row and column update is recomputed in the log domain, and the
    # backward's row factor 1 / a exceeds e^bound (log(ulp / (16 max(n, m) tiny))), so the
    # backward runs in the log domain too. The problem itself is as well conditioned as with
    # masses near 1.
    tiny = 1e-300 if dtype == torch.float64 else 1e-30
    n, m = 29, 13
    info = torch.finfo(dtype)
    bound = math.log(info.eps / (16 * max(n, m) * info.tiny))
    assert -math.log(tiny) > bound
    S, a, b = _sk_case((2,), n, m, torch.float64, seed=6, scale=1.0)
    _sk_check(S.to(dtype), a * tiny, b * tiny, 0.25, 5, dtype, "tiny masses")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_small_eps_stays_finite(dtype):
    # |S| / eps up to 1e4 (the exp domain overflows): absorption and exact updates in every
    # iteration; fp32 loses about |S|/eps * 2^-24 ~ 1e-3 in the exponent (tests/test_sinkhorn.py)
    eps = 1e-3
    S = (torch.rand(2, 21, 17, generator=_gen(4), dtype=torch.float64) * 20 - 10).to(dtype).requires_grad_()
    assert float(S.detach().abs().max() / eps) > 9e3
    P = vitattn.sinkhorn(S, eps=eps, iters=10, backend="cpu")
    Pr = R.sinkhorn(S.detach().double(), eps=eps, iters=10)
    tol = 1e-9 if dtype == torch.float64 else 5e-3
    torch.testing.assert_close(P.double(), Pr, atol=tol * float(Pr.max()), rtol=tol)
    torch.testing.assert_close(P.double().sum(-2), torch.full((2, 17), 1 / 17, dtype=torch.float64), atol=tol,
                               rtol=tol)
    g, = torch.autograd.grad((P * torch.randn(P.shape, generator=_gen(5), dtype=dtype)).sum(), S)
    assert torch.isfinite(g).all()


def test_sinkhorn_gradcheck():
    S = torch.randn(2, 6, 5, generator=_gen(5), dtype=torch.float64, requires_grad=True)
    a = (torch.rand(6, generator=_gen(6), dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.rand(2, 5, generator=_gen(7), dtype=torch.float64) + 0.5).requires_grad_()
    fn = lambda S, a, b: vitattn.sinkhorn(S, eps=0.7, iters=3, a=a, b=b, backend="cpu")
    assert torch.autograd.gradcheck(fn, (S, a, b))


# ---------------------------------------------------------------- ot_aggregate / ot_attention

OT_SHAPES = [
    (2, 2, 37, 19, 5, 9),     # d != dv, neither a multiple of the vector width
    (1, 2, 300, 64, 32, 32),  # three row blocks, SeTformer's m and d
    (2, 3, 7, 5, 4, 6),
    (1, 2, 1, 5, 3, 3),       # one token
    (1, 2, 17, 1, 2, 2),      # one reference
]


@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", OT_SHAPES)
def test_ot_values_and_gradients(shape, dtype, attention, poisoned):
    B, H, n, m, d, dv = shape
    x, ref, v = _ot_case(*shape, dtype, seed=sum(shape), unit=d == 32)
    filt = SK.gaussian_filter_1d(n, m, sigma=0.5, dtype=dtype)
    tag = f"{shape} {'attention' if attention else 'aggregate'}"
    if n == 1 or m == 1:
        # the plan does not depend on the scores: dx and dref vanish (up to rounding)
        xs, rs = x.requires_grad_(), ref.requires_grad_()
        fn = vitattn.ot_attention if attention else vitattn.ot_aggregate
        out = fn(xs, rs, v, eps=0.5, iters=3, pos_filter=filt, backend="cpu")
        rfn = R.ot_attention if attention else R.ot_aggregate
        close(out, rfn(x.double(), ref.double(), v.double(), eps=0.5, iters=3, pos_filter=filt.double()), dtype, tag)
        gx, gr = torch.autograd.grad((out * torch.randn_like(out)).sum(), (xs, rs))
        lim = 1e-12 if dtype == torch.float64 else 1e-5
        assert float(gx.abs().max()) < lim and float(gr.abs().max()) < lim
        return
    _ot_check(noncontiguous(x), ref, noncontiguous(v), filt, 0.2, 3, attention, dtype, tag + " filter")
    _ot_check(x, ref, v, None, 0.1, 10, attention, dtype, tag)


@pytest.mark.parametrize("attention", [False, True])
def test_ot_v_defaults_to_x_and_permuted_layouts(attention):
    # x from a (B, n, heads, d) tensor as SeTformer builds it (strided, last dim contiguous, read
    # in place), ref as a transposed view (last dim strided: copied)
    g = _gen(11)
    x = torch.randn(2, 23, 3, 8, generator=g, dtype=torch.float64).transpose(1, 2)
    ref = torch.randn(3, 8, 6, generator=g, dtype=torch.float64).transpose(1, 2)
    assert not x.is_contiguous() and x.stride(-1) == 1 and ref.stride(-1) != 1
    _ot_check(x, ref, None, None, 0.5, 3, attention, torch.float64, "v = x")
    v = torch.randn(2, 23, 3, 5, generator=g, dtype=torch.float64).transpose(1, 2)[..., ::1]
    vs = torch.randn(2, 3, 23, 10, generator=g, dtype=torch.float64)[..., ::2]  # last dim strided
    _ot_check(x, ref, v, None, 0.5, 3, attention, torch.float64, "permuted v")
    _ot_check(x, ref, vs, None, 0.5, 3, attention, torch.float64, "strided v")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attention", [False, True])
def test_ot_half_inputs(dtype, attention):
    x, ref, v = _ot_case(2, 2, 50, 16, 16, 12, dtype, seed=12)
    filt = SK.gaussian_filter_1d(50, 16, sigma=0.5, dtype=torch.float32)
    _ot_check(x, ref, v, filt, 0.5, 5, attention, dtype, str(dtype))


@pytest.mark.parametrize("attention", [False, True])
def test_ot_setformer_regime(attention):
    # unit-norm features, a 2-D position filter of width 0.1, eps 0.1 (SeTformer's), 10 iterations
    x, ref, v = _ot_case(1, 2, 196, 49, 32, 32, torch.float32, seed=13, unit=True)
    filt = SK.gaussian_filter_2d(14, 14, 49, sigma=0.1, dtype=torch.float32)
    _ot_check(x, ref, v, filt, 0.1, 10, attention, torch.float32, "setformer")


def test_ot_small_eps_and_logdomain_backward():
    # eps = 1e-3: the forward absorbs or recomputes exactly in every iteration
    g = _gen(9)
    x = torch.randn(1, 2, 30, 8, generator=g, dtype=torch.float32, requires_grad=True)
    ref = torch.randn(2, 5, 8, generator=g, dtype=torch.float32, requires_grad=True)
    out = vitattn.ot_attention(x, ref, eps=1e-3, iters=10, backend="cpu")
    want = R.ot_attention(x.detach().double(), ref.detach().double(), eps=1e-3, iters=10)
    torch.testing.assert_close(out.double(), want, atol=5e-3 * float(want.abs().max()), rtol=5e-3)
    gx, gr = torch.autograd.grad(out.sum(), (x, ref))
    assert torch.isfinite(gx).all() and torch.isfinite(gr).all()
    # n / m = 2e30: the backward's row factor n / m exceeds e^bound in fp32 and the backward
    # runs in the log domain, on a well-conditioned problem
    n, m = 2, 1
    assert math.log(2e30) > math.log(torch.finfo(torch.float32).eps / (16 * 2 * torch.finfo(torch.float32).tiny))
    x, ref, v = _ot_case(1, 2, 40, 7, 6, 5, torch.float64, seed=14)
    # the same decision in fp64 needs n/m > e^680: not reachable; fp64 runs the fast path here
    _ot_check(x, ref, v, None, 0.3, 4, True, torch.float64, "fp64 scaled backward")


@pytest.mark.parametrize("attention", [False, True])
def test_ot_gradcheck(attention):
    g = _gen(8)
    x = torch.randn(1, 2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    filt = SK.gaussian_filter_1d(6, 4, sigma=0.4, dtype=torch.float64)
    fn = vitattn.ot_attention if attention else vitattn.ot_aggregate
    f = lambda x, ref, v: fn(x, ref, v, eps=0.6, iters=3, pos_filter=filt, backend="cpu")
    assert torch.autograd.gradcheck(f, (x, ref, v))


# ---------------------------------------------------------------- threads, instruction sets, dispatch


def _all_results(seed):
    """Every op forward and backward on problems that run problem-parallel (many problems) and
    row-parallel (one problem of several row blocks)."""
    g = _gen(seed)
    outs = []
    for Z, n, m, B, H in ((1, 700, 64, 1, 1), (3, 300, 49, 1, 3), (16, 200, 17, 8, 2)):
        S = torch.randn(Z, n, m, generator=g)
        a = torch.rand(Z, n, generator=g) + 0.5
        Sg = S.clone().requires_grad_()
        P = vitattn.sinkhorn(Sg, eps=0.1, iters=7, a=a, backend="cpu")
        outs += [P, *torch.autograd.grad((P * S).sum(), Sg)]
        x = torch.randn(B, H, n, 32, generator=g, requires_grad=True)
        ref = torch.randn(H, m, 32, generator=g, requires_grad=True)
        v = torch.randn(B, H, n, 24, generator=g, requires_grad=True)
        filt = SK.gaussian_filter_1d(n, m, sigma=0.3)
        for fn in (vitattn.ot_aggregate, vitattn.ot_attention):
            out = fn(x, ref, v, eps=0.1, iters=7, pos_filter=filt, backend="cpu")
            outs += [out, *torch.autograd.grad((out * out.detach().sin()).sum(), (x, ref, v))]
    return outs


def test_bitwise_identical_with_one_and_two_threads():
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_results(21)
        torch.set_num_threads(2)
        two = _all_results(21)
    finally:
        torch.set_num_threads(old)
    assert len(one) == len(two) == 30  # 3 problem sets x (plan, dS, 2 ops x (out, dx, dref, dv))
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


_DEFAULT_ISA_SCRIPT = r"""
import torch, vitattn
from vitattn._extension import module
from vitattn.ops.sinkhorn import reference as R
assert module().cpu_isa().startswith("default"), module().cpu_isa()
torch.manual_seed(0)
def check(got, want, tol, what):
    err = float((got.double() - want.double()).abs().max() / want.double().abs().max())
    assert err < tol, (what, err)
for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
    S = torch.randn(2, 150, 19, dtype=torch.float64).to(dtype).requires_grad_()
    P = vitattn.sinkhorn(S, eps=0.2, iters=5, backend="cpu")
    S64 = S.detach().double().requires_grad_()
    Pr = R.sinkhorn(S64, eps=0.2, iters=5)
    check(P, Pr, tol, "plan")
    w = torch.randn(Pr.shape, dtype=torch.float64)
    check(torch.autograd.grad((P.double() * w).sum(), S)[0], torch.autograd.grad((Pr * w).sum(), S64)[0], tol, "dS")
    for fn, rfn in ((vitattn.ot_aggregate, R.ot_aggregate), (vitattn.ot_attention, R.ot_attention)):
        x = torch.randn(1, 2, 150, 5, dtype=torch.float64).to(dtype).requires_grad_()
        ref = torch.randn(2, 19, 5, dtype=torch.float64).to(dtype).requires_grad_()
        v = torch.randn(1, 2, 150, 9, dtype=torch.float64).to(dtype).requires_grad_()
        out = fn(x, ref, v, eps=0.3, iters=4, backend="cpu")
        leaves = [t.detach().double().requires_grad_() for t in (x, ref, v)]
        want = rfn(*leaves, eps=0.3, iters=4)
        check(out, want, tol, "out")
        w = torch.randn(want.shape, dtype=torch.float64)
        for g, r in zip(torch.autograd.grad((out.double() * w).sum(), (x, ref, v)),
                        torch.autograd.grad((want * w).sum(), leaves)):
            check(g, r, tol * 10, "grad")
print("ok")
"""


def test_baseline_instruction_set_copy():
    """The DEFAULT (no AVX) build of the kernels, chosen with ATEN_CPU_CAPABILITY=default."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    res = subprocess.run([sys.executable, "-c", _DEFAULT_ISA_SCRIPT], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-3000:]


def test_dispatch_lists_and_chooses_cpu():
    S = torch.randn(2, 30, 8)
    x, ref = torch.randn(2, 2, 30, 8), torch.randn(2, 6, 8)
    assert "cpu" in BK.NAMES
    for expl in (vitattn.explain("sinkhorn", S), vitattn.explain("ot_aggregate", x, ref),
                 vitattn.explain("ot_attention", x, ref)):
        assert expl.reasons()["cpu"] is None
    # "auto" takes the first backend that can run in the committed order, "cpu" on this CPU
    ctx = SK._ot_context("ot_attention", x, ref, x)
    order = [b.name for b in BK.dispatcher.ordered(ctx)]
    assert order.index("cpu") < order.index("torch")
    assert BK.dispatcher.choose("auto", ctx, "ot_attention") == "cpu"


# ---------------------------------------------------------------- bad input to the entry points


def test_bad_input_names_the_argument():
    C = ext.ops()
    S = torch.randn(2, 5, 4)
    la, lb = torch.full((2, 5), -math.log(5)), torch.full((2, 4), -math.log(4))
    with pytest.raises(RuntimeError, match="S must be 3-D"):
        C.sinkhorn_cpu_fwd(S[0], la, lb, 0.1, 3)
    with pytest.raises(RuntimeError, match="S must be float16, bfloat16, float32 or float64"):
        C.sinkhorn_cpu_fwd(S.long(), la, lb, 0.1, 3)
    with pytest.raises(RuntimeError, match="la must have shape"):
        C.sinkhorn_cpu_fwd(S, la[:, :4], lb, 0.1, 3)
    with pytest.raises(RuntimeError, match="lb must have shape"):
        C.sinkhorn_cpu_fwd(S, la, lb[:1], 0.1, 3)
    with pytest.raises(RuntimeError, match="eps must be a positive finite number"):
        C.sinkhorn_cpu_fwd(S, la, lb, 0.0, 3)
    with pytest.raises(RuntimeError, match="eps must be a positive finite number"):
        C.sinkhorn_cpu_fwd(S, la, lb, float("nan"), 3)
    with pytest.raises(RuntimeError, match="iters must be at least 1"):
        C.sinkhorn_cpu_fwd(S, la, lb, 0.1, 0)
    with pytest.raises(RuntimeError, match="S must have n >= 1 and m >= 1"):
        C.sinkhorn_cpu_fwd(torch.randn(2, 0, 4), la[:, :0], lb, 0.1, 3)
    P, G = C.sinkhorn_cpu_fwd(S, la, lb, 0.1, 3)
    with pytest.raises(RuntimeError, match="dP must have the shape of S"):
        C.sinkhorn_cpu_bwd(P[:, :4], S, la, lb, G, 0.1)
    with pytest.raises(RuntimeError, match="G must have shape"):
        C.sinkhorn_cpu_bwd(P, S, la, lb, G[:, :, :3], 0.1)
    x, ref, v = torch.randn(2, 3, 10, 4), torch.randn(3, 5, 4), torch.randn(2, 3, 10, 6)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        C.sinkhorn_ot_cpu_fwd(x[0], ref, v, None, 0.1, 3, True)
    with pytest.raises(RuntimeError, match=r"ref must have shape \(3, m, 4\)"):
        C.sinkhorn_ot_cpu_fwd(x, torch.randn(3, 5, 6), v, None, 0.1, 3, True)
    with pytest.raises(RuntimeError, match=r"v must have shape \(2, 3, 10, dv\)"):
        C.sinkhorn_ot_cpu_fwd(x, ref, v[:, :, :9], None, 0.1, 3, True)
    with pytest.raises(RuntimeError, match="x, ref and v must share a dtype"):
        C.sinkhorn_ot_cpu_fwd(x, ref.double(), v, None, 0.1, 3, True)
    with pytest.raises(RuntimeError, match=r"filt must have shape \(10, 5\)"):
        C.sinkhorn_ot_cpu_fwd(x, ref, v, torch.rand(5, 10), 0.1, 3, True)
    with pytest.raises(RuntimeError, match="iters must be at least 1"):
        C.sinkhorn_ot_cpu_fwd(x, ref, v, None, 0.1, 0, False)
    out, zeta, G = C.sinkhorn_ot_cpu_fwd(x, ref, v, None, 0.1, 3, True)
    with pytest.raises(RuntimeError, match=r"dout must have shape \(2, 3, 10, 6\)"):
        C.sinkhorn_ot_cpu_bwd(out[:, :, :5], x, ref, v, None, zeta, G, 0.1, True)
    with pytest.raises(RuntimeError, match=r"zeta must have shape \(2, 3, 5, 6\)"):
        C.sinkhorn_ot_cpu_bwd(out, x, ref, v, None, zeta[:1], G, 0.1, True)
    with pytest.raises(RuntimeError, match="G must have shape"):
        C.sinkhorn_ot_cpu_bwd(out, x, ref, v, None, zeta, G[..., :4], 0.1, True)
    # the public functions validate before dispatch and name their own arguments
    with pytest.raises(ValueError, match="eps"):
        vitattn.ot_attention(x, ref, eps=-1.0, backend="cpu")
    with pytest.raises(vitattn.BackendUnavailableError, match="cpu"):
        vitattn.sinkhorn(torch.randn(2, 5, 4, device="meta"), backend="cpu")
