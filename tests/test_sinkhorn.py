"""Tests of sinkhorn / ot_aggregate / ot_attention (issue 3) against the dense reference loop.

Run with TRITON_INTERPRET=1 (conftest sets it without a GPU) to test the Triton kernels on CPU.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from _util import HAS_CUDA, TRITON_DEVICE, backends_for, noncontiguous

import vitattn

# modules by import path: once vitattn exports the function sinkhorn, the attribute
SK = importlib.import_module("vitattn.ops.sinkhorn.op")
R = importlib.import_module("vitattn.ops.sinkhorn.reference")
TB = importlib.import_module("vitattn.ops.sinkhorn.torch_impl")
BK = importlib.import_module("vitattn.ops.sinkhorn.backends")

DEV = "cpu"
BACKENDS = backends_for(DEV)
DTYPES = [torch.float64, torch.float32, torch.float16]
# (atol relative to the largest reference entry, rtol) per dtype
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (3e-5, 3e-4), torch.float16: (2e-3, 1e-2),
       torch.bfloat16: (1e-2, 5e-2)}


def close(got, want, dtype, what):
    """|got - want| <= atol * max|want| + rtol * |want| elementwise (plans are tiny numbers)."""
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    atol, rtol = TOL[dtype]
    scale = want.abs().max().clamp_min(1e-300)
    torch.testing.assert_close(got, want, atol=atol * float(scale), rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    """Small row tiles, two row chunks per problem and small torch chunks, so that tiny problems cross
    tile and chunk boundaries (and chunks hold several tiles)."""
    if TRITON_DEVICE is not None:
        from vitattn.kernels import sinkhorn as TK

        monkeypatch.setattr(TK, "BLOCK_N_CAP", 16)
        monkeypatch.setattr(TK, "ROW_CHUNKS", 2)
    # 64 KiB of dense intermediates: 4096 fp32 elements per tensor, as 2 x 64 x 32 blocks
    monkeypatch.setenv("VITATTN_DENSE_BUDGET_MB", str(2 * 64 * 32 * 4 * 4 / 2 ** 20))


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the backends allocate with torch.empty starts as NaN: unwritten entries show."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _skip_half(dtype, backend):
    if dtype == torch.bfloat16 and not HAS_CUDA:
        pytest.skip("bf16 arithmetic is wrong under the Triton interpreter and is tested on GPU only")


# ---------------------------------------------------------------- sinkhorn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sinkhorn_matches_reference(backend, dtype, poisoned):
    torch.manual_seed(1)
    batch, n, m = (2, 2), 37, 19
    S = noncontiguous((torch.randn(*batch, n, m, dtype=torch.float64) * 2).to(dtype)).requires_grad_()
    a = (torch.rand(n, dtype=torch.float64) + 0.5).requires_grad_()          # broadcast over the batch
    b = (torch.rand(2, 1, m, dtype=torch.float64) + 0.5).requires_grad_()    # broadcast over dim 1
    eps, iters = 0.3, 4
    P = SK.sinkhorn(S, eps=eps, iters=iters, a=a, b=b, backend=backend)
    assert P.dtype == dtype and P.shape == S.shape
    S64 = S.detach().double().requires_grad_()
    Pr = R.sinkhorn(S64, eps=eps, iters=iters, a=a, b=b)
    close(P, Pr, dtype, "plan")
    # the last update is the column update: columns hold exactly b
    close(P.double().sum(-2), b.detach().expand(*batch, m), dtype, "column sums")
    w = torch.randn_like(Pr)
    gS, ga, gb = torch.autograd.grad((P.double() * w).sum(), (S, a, b))
    rS, ra, rb = torch.autograd.grad((Pr * w).sum(), (S64, a, b))
    assert gS.dtype == dtype
    close(gS, rS, dtype, "dscores")
    close(ga, ra, dtype, "da")
    close(gb, rb, dtype, "db")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_defaults_and_single_iteration(backend):
    torch.manual_seed(2)
    S = torch.randn(4, 17, 33, dtype=torch.float64, requires_grad=True)
    for iters in (1, 2):
        P = SK.sinkhorn(S, iters=iters, backend=backend)
        Pr = R.sinkhorn(S, iters=iters)
        close(P, Pr, torch.float64, f"plan iters={iters}")
        close(P.sum(-2), torch.full((4, 33), 1 / 33, dtype=torch.float64), torch.float64, "uniform b")
        w = torch.randn_like(P)
        g, = torch.autograd.grad((P * w).sum(), S)
        r, = torch.autograd.grad((Pr * w).sum(), S)
        close(g, r, torch.float64, f"dscores iters={iters}")


def exp_domain_sinkhorn(S, eps, iters, a, b):
    """Independent textbook scaling iterations: u = a / (K v), v = b / (K^T u), from v = 1."""
    K = torch.exp(S / eps)
    v = torch.ones(S.shape[:-2] + (S.shape[-1],), dtype=S.dtype)
    for _ in range(iters):
        u = a / (K @ v[..., None])[..., 0]
        v = b / (K.transpose(-1, -2) @ u[..., None])[..., 0]
    return u[..., :, None] * K * v[..., None, :]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_matches_exp_domain_scaling(backend):
    torch.manual_seed(3)
    n, m = 29, 18
    S = torch.randn(2, n, m, dtype=torch.float64)
    a = torch.rand(2, n, dtype=torch.float64) + 0.2
    b = torch.rand(2, m, dtype=torch.float64) + 0.2
    b = b * (a.sum(-1, keepdim=True) / b.sum(-1, keepdim=True))  # balanced masses
    for eps in (0.5, 2.0):
        P = SK.sinkhorn(S, eps=eps, iters=15, a=a, b=b, backend=backend)
        close(P, exp_domain_sinkhorn(S, eps, 15, a, b), torch.float64, f"eps={eps}")
    # converged: rows hold a as well
    P = SK.sinkhorn(S, eps=2.0, iters=200, a=a, b=b, backend="torch")
    torch.testing.assert_close(P.sum(-1), a, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_small_eps_stays_finite(backend, dtype):
    # |S|/eps up to 1e4: the exp domain overflows, the log domain must not
    torch.manual_seed(4)
    eps = 1e-3
    S = (torch.rand(2, 21, 17, dtype=torch.float64) * 20 - 10).to(dtype).requires_grad_()
    assert float(S.detach().abs().max() / eps) > 9e3
    assert not torch.isfinite(torch.exp(S.detach().double() / eps)).all()
    P = SK.sinkhorn(S, eps=eps, iters=10, backend=backend)
    assert torch.isfinite(P).all()
    Pr = R.sinkhorn(S.detach().double(), eps=eps, iters=10)
    # the reference itself is fp64; fp32 loses about |S|/eps * 2^-24 ~ 1e-3 in the exponent
    tol = 1e-9 if dtype == torch.float64 else 5e-3
    torch.testing.assert_close(P.double(), Pr, atol=tol * float(Pr.max()), rtol=tol)
    torch.testing.assert_close(P.double().sum(-2), torch.full((2, 17), 1 / 17, dtype=torch.float64),
                               atol=tol, rtol=tol)
    g, = torch.autograd.grad((P * torch.randn_like(P)).sum(), S)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_gradcheck(backend):
    torch.manual_seed(5)
    S = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    a = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    b = (torch.rand(2, 5, dtype=torch.float64) + 0.5).requires_grad_()
    fn = lambda S, a, b: SK.sinkhorn(S, eps=0.7, iters=3, a=a, b=b, backend=backend)
    assert torch.autograd.gradcheck(fn, (S, a, b), fast_mode=backend == "triton")


# ---------------------------------------------------------------- ot_aggregate / ot_attention


def _ot_inputs(dtype, B=2, H=2, n=37, m=19, d=5, dv=9, seed=0):
    torch.manual_seed(seed)
    x = noncontiguous(torch.randn(B, H, n, d, dtype=torch.float64).to(dtype)).requires_grad_()
    # ref as a transposed view (non-contiguous)
    ref = (torch.randn(H, d, m, dtype=torch.float64)).to(dtype).transpose(1, 2).requires_grad_()
    v = noncontiguous(torch.randn(B, H, n, dv, dtype=torch.float64).to(dtype)).requires_grad_()
    return x, ref, v


def _ref_grads(fn, x, ref, v, filt, w, **kw):
    xs = [t.detach().double().requires_grad_() for t in (x, ref, v) if t is not None]
    out = fn(*xs[:2], None if v is None else xs[2], pos_filter=filt, **kw)
    grads = torch.autograd.grad((out * w).sum(), xs)
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ot_matches_reference(backend, attention, dtype, poisoned):
    x, ref, v = _ot_inputs(dtype)
    n, m = x.shape[2], ref.shape[1]
    filt = SK.gaussian_filter_1d(n, m, sigma=0.5, dtype=torch.float64)
    fn = SK.ot_attention if attention else SK.ot_aggregate
    rfn = R.ot_attention if attention else R.ot_aggregate
    kw = dict(eps=0.2, iters=3)
    for f in (None, filt.to(dtype)):
        out = fn(x, ref, v, pos_filter=f, backend=backend, **kw)
        assert out.dtype == dtype
        assert out.shape == (2, 2, n if attention else m, v.shape[-1])
        w = torch.randn(out.shape, dtype=torch.float64)
        want, rgrads = _ref_grads(rfn, x, ref, v, None if f is None else f.double(), w, **kw)
        tag = f"{'attention' if attention else 'aggregate'} filter={f is not None}"
        close(out, want, dtype, tag)
        grads = torch.autograd.grad((out.double() * w).sum(), (x, ref, v))
        for name, g, r in zip(("dx", "dref", "dv"), grads, rgrads):
            assert g.dtype == dtype
            close(g, r, dtype, f"{tag} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention", [False, True])
def test_ot_v_defaults_to_x(backend, attention):
    x, ref, _ = _ot_inputs(torch.float64, B=1, H=2, n=23, m=6, d=7, seed=6)
    fn = SK.ot_attention if attention else SK.ot_aggregate
    rfn = R.ot_attention if attention else R.ot_aggregate
    out = fn(x, ref, eps=0.5, iters=3, backend=backend)
    w = torch.randn(out.shape, dtype=torch.float64)
    want, rgrads = _ref_grads(rfn, x, ref, None, None, w, eps=0.5, iters=3)
    close(out, want, torch.float64, "out")
    grads = torch.autograd.grad((out * w).sum(), (x, ref))
    close(grads[0], rgrads[0], torch.float64, "dx (scores and values)")
    close(grads[1], rgrads[1], torch.float64, "dref")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ot_large_m_and_single_iteration(backend):
    # m = 40 pads to 64 columns, d = 33 pads to 64: masking of every padded tile edge
    x, ref, v = _ot_inputs(torch.float64, B=1, H=1, n=20, m=40, d=33, dv=17, seed=7)
    for attention in (False, True):
        fn = SK.ot_attention if attention else SK.ot_aggregate
        rfn = R.ot_attention if attention else R.ot_aggregate
        out = fn(x, ref, v, eps=1.0, iters=1, backend=backend)
        w = torch.randn(out.shape, dtype=torch.float64)
        want, rgrads = _ref_grads(rfn, x, ref, v, None, w, eps=1.0, iters=1)
        close(out, want, torch.float64, "out")
        for g, r in zip(torch.autograd.grad((out * w).sum(), (x, ref, v)), rgrads):
            close(g, r, torch.float64, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,m,d", [(1, 5, 3), (16, 16, 16), (17, 1, 2)])
def test_edge_sizes(backend, n, m, d):
    # a single token, a single reference, and sizes that fill the 16-wide tiles exactly
    torch.manual_seed(n * 100 + m)
    x = torch.randn(1, 2, n, d, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, m, d, dtype=torch.float64, requires_grad=True)
    out = SK.ot_attention(x, ref, eps=0.5, iters=3, backend=backend)
    w = torch.randn(out.shape, dtype=torch.float64)
    want, rgrads = _ref_grads(R.ot_attention, x, ref, None, None, w, eps=0.5, iters=3)
    close(out, want, torch.float64, "out")
    gx, gref = torch.autograd.grad((out * w).sum(), (x, ref))
    close(gx, rgrads[0], torch.float64, "dx")
    if m == 1:
        # one reference: the plan is m/n everywhere whatever the scores, dref vanishes identically
        assert float(rgrads[1].abs().max()) == 0.0 and float(gref.abs().max()) < 1e-12
    else:
        close(gref, rgrads[1], torch.float64, "dref")
    S = torch.randn(2, n, m, dtype=torch.float64, requires_grad=True)
    P = SK.sinkhorn(S, iters=2, backend=backend)
    Pr = R.sinkhorn(S, iters=2)
    close(P, Pr, torch.float64, "plan")
    w = torch.randn_like(P)
    gS, rS = torch.autograd.grad((P * w).sum(), S)[0], torch.autograd.grad((Pr * w).sum(), S)[0]
    if m == 1:
        assert float(rS.abs().max()) < 1e-12 and float(gS.abs().max()) < 1e-12  # again independent of S
    else:
        close(gS, rS, torch.float64, "dS")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention", [False, True])
def test_ot_gradcheck(backend, attention):
    torch.manual_seed(8)
    x = torch.randn(1, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 6, 2, dtype=torch.float64, requires_grad=True)
    filt = SK.gaussian_filter_1d(6, 4, sigma=0.4, dtype=torch.float64)
    fn = SK.ot_attention if attention else SK.ot_aggregate
    f = lambda x, ref, v: fn(x, ref, v, eps=0.6, iters=3, pos_filter=filt, backend=backend)
    assert torch.autograd.gradcheck(f, (x, ref, v), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ot_small_eps_stays_finite(backend):
    torch.manual_seed(9)
    x = torch.randn(1, 2, 30, 8, dtype=torch.float32, requires_grad=True)
    ref = torch.randn(2, 5, 8, dtype=torch.float32, requires_grad=True)
    out = SK.ot_attention(x, ref, eps=1e-3, iters=10, backend=backend)
    assert torch.isfinite(out).all()
    want = R.ot_attention(x.detach().double(), ref.detach().double(), eps=1e-3, iters=10)
    torch.testing.assert_close(out.double(), want, atol=5e-3 * float(want.abs().max()), rtol=5e-3)
    gx, gr = torch.autograd.grad(out.sum(), (x, ref))
    assert torch.isfinite(gx).all() and torch.isfinite(gr).all()


def test_ot_aggregate_matches_exp_domain_otk():
    """OTKE's exp-domain loop (u = a / K v, v = 1 / K^T u with a = m/n) written out independently."""
    torch.manual_seed(10)
    x, ref, v = _ot_inputs(torch.float64, B=2, H=2, n=15, m=4, d=6, dv=3, seed=10)
    n, m = 15, 4
    filt = SK.gaussian_filter_1d(n, m, sigma=0.3, dtype=torch.float64)
    eps, iters = 0.5, 20
    S = filt * torch.einsum("bhnd,hmd->bhnm", x.detach(), ref.detach())
    K = torch.exp(S / eps)
    vv = torch.ones(2, 2, m, dtype=torch.float64)
    for _ in range(iters):
        u = (m / n) / (K @ vv[..., None])[..., 0]
        vv = 1.0 / (K.transpose(-1, -2) @ u[..., None])[..., 0]
    T = filt * (u[..., None] * K * vv[..., None, :])
    want = T.transpose(-1, -2) @ v.detach()
    for backend in BACKENDS:
        got = SK.ot_aggregate(x, ref, v, eps=eps, iters=iters, pos_filter=filt, backend=backend)
        close(got, want, torch.float64, backend)
        got = SK.ot_attention(x, ref, v, eps=eps, iters=iters, pos_filter=filt, backend=backend)
        close(got, (n / m) * T @ want, torch.float64, backend + " attention")


def test_otkernel_layout_and_filters():
    """ot_aggregate with the input shared by every head reproduces OTKernel's (batch, m, heads*d) output."""
    torch.manual_seed(11)
    Hh, Ww, m, heads, d = 5, 6, 9, 2, 4
    inp = torch.randn(3, Hh * Ww, d, dtype=torch.float64)
    weight = torch.randn(heads, m, d, dtype=torch.float64)
    filt = SK.gaussian_filter_2d(Hh, Ww, m, sigma=0.3, dtype=torch.float64)
    torch.testing.assert_close(filt, R.otk_position_filter((Hh, Ww), m, 0.3, dtype=torch.float64))
    want = R.otkernel(inp, weight, eps=0.4, max_iter=5, position_filter=filt)
    for backend in BACKENDS:
        out = SK.ot_aggregate(inp[:, None].expand(3, heads, Hh * Ww, d), weight, eps=0.4, iters=5,
                              pos_filter=filt, backend=backend)
        got = out.permute(0, 2, 1, 3).reshape(3, m, heads * d)
        close(got, want, torch.float64, backend)


def test_position_filters_formulas():
    n, m, sigma = 11, 4, 0.25
    f1 = SK.gaussian_filter_1d(n, m, sigma=sigma, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            assert math.isclose(float(f1[i, j]), math.exp(-(((i / n) - (j / m)) / sigma) ** 2), rel_tol=1e-12)
    torch.testing.assert_close(f1, R.otk_position_filter((n,), m, sigma, dtype=torch.float64))
    Hh, Ww, s = 3, 4, 2
    f2 = SK.gaussian_filter_2d(Hh, Ww, s * s, sigma=sigma, dtype=torch.float64)
    assert f2.shape == (Hh * Ww, s * s)
    for r in range(Hh):
        for c in range(Ww):
            for p in range(s):
                for q in range(s):
                    want = math.exp(-(((r + 1) / Hh - (p + 1) / s) / sigma) ** 2) * \
                        math.exp(-(((c + 1) / Ww - (q + 1) / s) / sigma) ** 2)
                    assert math.isclose(float(f2[r * Ww + c, p * s + q]), want, rel_tol=1e-12)
    assert SK.gaussian_filter_1d(3, 2).dtype == torch.float32
    with pytest.raises(ValueError, match="m"):
        SK.gaussian_filter_2d(3, 3, 8)
    with pytest.raises(ValueError, match="sigma"):
        SK.gaussian_filter_1d(3, 2, sigma=0.0)
    with pytest.raises(ValueError, match="n"):
        SK.gaussian_filter_1d(0, 2)


# ---------------------------------------------------------------- memory, determinism, dispatch


@pytest.mark.parametrize("backend", BACKENDS)
def test_ot_saves_only_potentials(backend):
    """Autograd keeps the inputs, zeta (m x dv) and the potentials (iters x m): nothing n x m."""
    B, H, n, m, d, iters = 2, 2, 40, 6, 4, 7
    x, ref, v = _ot_inputs(torch.float32, B=B, H=H, n=n, m=m, d=d, dv=3)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = SK.ot_attention(x, ref, v, eps=0.3, iters=iters, backend=backend)
    extra = [t for t in saved if not any(t.data_ptr() == s.data_ptr() for s in (x, ref, v))]
    extra_numel = sum(t.numel() for t in extra)
    assert extra_numel <= B * H * (iters * m + m * 3) + 2 * B * H * n * 3 + B * H * m * 3, [t.shape for t in extra]
    assert all(t.numel() < B * H * n * m for t in extra), [t.shape for t in extra]
    out.sum().backward()


@pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton cannot run here (no CUDA, no TRITON_INTERPRET=1)")
def test_triton_backward_is_deterministic():
    x, ref, v = _ot_inputs(torch.float32, B=2, H=1, n=33, m=5, d=4, dv=3, seed=12)
    filt = SK.gaussian_filter_1d(33, 5)
    runs = []
    for _ in range(2):
        out = SK.ot_attention(x, ref, v, eps=0.2, iters=3, pos_filter=filt, backend="triton")
        runs.append((out,) + torch.autograd.grad(out.sum(), (x, ref, v)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_dispatch_reasons():
    x, ref, v = _ot_inputs(torch.float32, B=1, H=1, n=8, m=3, d=4, dv=4)
    names = [r.backend for r in vitattn.explain("ot_aggregate", x, ref, v)]
    assert "torch" in names and "triton" in names
    if not HAS_CUDA:
        # the interpreter is never chosen automatically
        assert vitattn.explain("ot_aggregate", x, ref, v).reasons()["triton"] is not None
    big = torch.randn(1, 1, 8, 4)
    ref_big = torch.randn(1, BK.TRITON_MAX_M + 1, 4)
    if TRITON_DEVICE == "cpu":
        with pytest.raises(vitattn.BackendUnavailableError, match="references"):
            SK.ot_aggregate(big, ref_big, backend="triton")
    with pytest.raises(ValueError, match="^ot_aggregate: unknown backend"):
        SK.ot_aggregate(x, ref, backend="nope")
    with pytest.raises(TypeError, match="backend"):
        SK.sinkhorn(torch.randn(3, 4), backend=3)


def test_autocast_runs_in_low_precision():
    x, ref, v = _ot_inputs(torch.float32, B=1, H=2, n=9, m=3, d=4, dv=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SK.ot_aggregate(x, ref, v, backend="torch")
    assert out.dtype == torch.bfloat16
    want = R.ot_aggregate(x.detach().bfloat16().double(), ref.detach().bfloat16().double(),
                          v.detach().bfloat16().double())
    close(out, want, torch.bfloat16, "autocast")


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 arithmetic is wrong under the Triton interpreter: GPU only")
def test_bf16_triton_on_gpu():
    x = torch.randn(2, 2, 50, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = torch.randn(2, 8, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = SK.ot_attention(x, ref, eps=0.5, iters=5, backend="triton")
    want = R.ot_attention(x.detach().double(), ref.detach().double(), eps=0.5, iters=5)
    close(out, want, torch.bfloat16, "bf16")
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(ref.grad).all()


# ---------------------------------------------------------------- torch.compile / export / opcheck


def test_compile_fullgraph_and_export():
    BK = "auto"  # under the interpreter "auto" skips triton: the dispatch itself must trace
    x, ref, v = _ot_inputs(torch.float32, B=1, H=2, n=12, m=4, d=4, dv=4)
    S = torch.randn(2, 7, 5, requires_grad=True)

    def f(x, ref, v, S):
        return SK.ot_attention(x, ref, v, eps=0.3, iters=3, backend=BK).sum() + \
            SK.sinkhorn(S, iters=2, backend=BK).sum() + SK.ot_aggregate(x, ref, eps=0.3, iters=2, backend=BK).sum()

    eager = f(x, ref, v, S)
    ge = torch.autograd.grad(eager, (x, ref, v, S))
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, ref, v, S)
    torch.testing.assert_close(out, eager)
    for a, b in zip(torch.autograd.grad(out, (x, ref, v, S)), ge):
        torch.testing.assert_close(a, b)

    class M(torch.nn.Module):
        def forward(self, x, ref):
            return SK.ot_attention(x, ref, eps=0.3, iters=3, backend=BK)

    ep = torch.export.export(M(), (x.detach(), ref.detach()))
    torch.testing.assert_close(ep.module()(x.detach(), ref.detach()), M()(x.detach(), ref.detach()))


def test_opcheck_custom_ops():
    torch.manual_seed(13)
    x = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 2, dtype=torch.float64, requires_grad=True)
    filt = SK.gaussian_filter_1d(7, 4, dtype=torch.float64)
    torch.library.opcheck(torch.ops.vitattn.sinkhorn_ot_fwd.default, (x, ref, v, filt, 0.5, 2, True, "torch"))
    torch.library.opcheck(torch.ops.vitattn.sinkhorn_ot_fwd.default, (x, ref, v, None, 0.5, 2, False, "torch"))
    S = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    la = torch.full((3, 5), -math.log(5), dtype=torch.float64, requires_grad=True)
    lb = torch.full((3, 4), -math.log(4), dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.vitattn.sinkhorn_fwd.default, (S, la, lb, 0.5, 3, "torch"))


# ---------------------------------------------------------------- bad input


def test_bad_input_sinkhorn():
    S = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="eps"):
        SK.sinkhorn(S, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        SK.sinkhorn(S, eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        SK.sinkhorn(S, eps=float("nan"))
    with pytest.raises(TypeError, match="eps"):
        SK.sinkhorn(S, eps="0.1")
    with pytest.raises(ValueError, match="iters"):
        SK.sinkhorn(S, iters=0)
    with pytest.raises(TypeError, match="iters"):
        SK.sinkhorn(S, iters=2.0)
    with pytest.raises(TypeError, match="scores"):
        SK.sinkhorn(S.numpy())
    with pytest.raises(TypeError, match="scores"):
        SK.sinkhorn(S.long())
    with pytest.raises(ValueError, match="scores"):
        SK.sinkhorn(torch.randn(5))
    with pytest.raises(ValueError, match="scores"):
        SK.sinkhorn(torch.randn(2, 0, 4))
    with pytest.raises(ValueError, match="a must hold finite positive"):
        SK.sinkhorn(S, a=torch.tensor([0.2, 0.2, -0.1, 0.3, 0.4]))
    with pytest.raises(ValueError, match="b must hold finite positive"):
        SK.sinkhorn(S, b=torch.tensor([0.25, 0.25, 0.0, 0.5]))
    with pytest.raises(ValueError, match="a must be broadcastable"):
        SK.sinkhorn(S, a=torch.rand(4) + 0.1)
    with pytest.raises(ValueError, match="b must be broadcastable"):
        SK.sinkhorn(S, b=torch.rand(3, 4) + 0.1)
    with pytest.raises(TypeError, match="b"):
        SK.sinkhorn(S, b=torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match="a"):
        SK.sinkhorn(S, a=[0.2] * 5)


@pytest.mark.parametrize("fn", [SK.ot_aggregate, SK.ot_attention])
def test_bad_input_ot(fn):
    x, ref, v = torch.randn(2, 3, 10, 4), torch.randn(3, 5, 4), torch.randn(2, 3, 10, 6)
    with pytest.raises(ValueError, match="eps"):
        fn(x, ref, eps=0.0)
    with pytest.raises(ValueError, match="iters"):
        fn(x, ref, iters=0)
    with pytest.raises(ValueError, match="ref"):
        fn(x, torch.randn(3, 5, 6))          # feature dim mismatch
    with pytest.raises(ValueError, match="ref"):
        fn(x, torch.randn(2, 5, 4))          # heads mismatch
    with pytest.raises(ValueError, match="ref"):
        fn(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="x"):
        fn(torch.randn(3, 10, 4), ref)
    with pytest.raises(ValueError, match="v"):
        fn(x, ref, torch.randn(2, 3, 9, 6))
    with pytest.raises(TypeError, match="ref"):
        fn(x, ref.double())
    with pytest.raises(TypeError, match="v"):
        fn(x, ref, v.half())
    with pytest.raises(TypeError, match="x"):
        fn(x.long(), ref.long())
    with pytest.raises(ValueError, match="pos_filter"):
        fn(x, ref, pos_filter=torch.rand(10, 4))
    with pytest.raises(ValueError, match="pos_filter"):
        fn(x, ref, pos_filter=torch.rand(5, 10))
    with pytest.raises(ValueError, match="pos_filter"):
        fn(x, ref, pos_filter=torch.rand(10, 5, requires_grad=True))
    with pytest.raises(TypeError, match="pos_filter"):
        fn(x, ref, pos_filter=torch.ones(10, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        fn(torch.randn(2, 3, 0, 4), ref)
