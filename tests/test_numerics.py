"""Numerical edge cases of every op, on every backend runnable here, against the fp64 reference.

* large logits: fp16 inputs whose logits reach ~1e4 (softmax nearly one-hot; the
  max-subtraction must happen in fp32, never in fp16);
* tiny decays: MaSA with gamma = 1e-6 (log gamma = -13.8, decay terms down to e^-140);
* sharp transport: Sinkhorn / OT with eps = 1e-3 and |S| / eps up to 1e4;
* all-equal scores (uniform attention / plans, checked against the closed form too);
* single-token grids and sequences (1x1, 1xW, Hx1, N = 1, groups of one token, L = 1);
* determinism: with torch.use_deterministic_algorithms(True), two runs give bitwise-equal
  outputs and gradients.

Every output and gradient must be finite; values match the fp64 reference run on the
same (rounded) inputs.
"""

from __future__ import annotations

import importlib
import pytest
import torch

# the reference modules (the package may re-export same-named functions)
R = importlib.import_module("vitattn.ops.masa.reference")
R_dm = importlib.import_module("vitattn.ops.dynamixer.reference")
R_ga = importlib.import_module("vitattn.ops.group_attention.reference")
R_sk = importlib.import_module("vitattn.ops.sinkhorn.reference")

from _util import TOL, backends_for

_masa = importlib.import_module("vitattn.ops.masa.op")
_sk = importlib.import_module("vitattn.ops.sinkhorn.op")
_ga = importlib.import_module("vitattn.ops.group_attention.op")
_dm = importlib.import_module("vitattn.ops.dynamixer.op")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = backends_for(DEV)
F16, F32, F64 = torch.float16, torch.float32, torch.float64
U32 = 2.0 ** -24  # fp32 unit roundoff


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def rand(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype).to(DEV).requires_grad_(True)


def ref_copy(t):
    return None if t is None else (t.detach().to(F64).requires_grad_(t.requires_grad)
                                   if isinstance(t, torch.Tensor) else t)


def run_and_compare(op, ref, inputs, dtype, what, atol=None, rtol=None, grads=True, seed=0):
    """op(*inputs) vs ref(fp64 copies): finite values and gradients that match."""
    a0, r0 = TOL[dtype]
    atol = a0 if atol is None else atol
    rtol = r0 if rtol is None else rtol
    out = op(*inputs)
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    refs = [ref_copy(t) for t in inputs]
    want = ref(*refs)
    assert torch.isfinite(want).all(), f"{what}: the reference itself is not finite"
    torch.testing.assert_close(out.detach().to(F64), want.detach(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} values: {m}")
    if not grads:
        return out
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    rleaves = [r for t, r in zip(inputs, refs) if isinstance(t, torch.Tensor) and t.requires_grad]
    g = torch.Generator().manual_seed(seed + 99)
    dout = torch.randn(out.shape, generator=g, dtype=F64).to(DEV)
    got = torch.autograd.grad(out, leaves, dout.to(dtype))
    exp = torch.autograd.grad(want, rleaves, dout)
    for i, (a, b) in enumerate(zip(got, exp)):
        assert torch.isfinite(a).all(), f"{what}: non-finite gradient of input {i}"
        mag = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.to(F64), b, atol=atol * mag, rtol=rtol,
                                   msg=lambda m: f"{what} grad of input {i}: {m}")
    return out


# ---------------------------------------------------------------- large logits (|logit| ~ 1e4)

def _big_qk(shape, dtype, seed):
    # entries ~ N(0, 25^2) (representable in fp16) and d = 16, scale 1: |q.k| reaches ~1e4 (std 2500)
    return rand(shape, dtype, seed, 25.0), rand(shape, dtype, seed + 1, 25.0)


# fp32 too: with |logits| ~ 1e4 an fp32 log-sum-exp carries an absolute error ~ 1e4 * 2^-24; a
# backend must not let that leak into the normalisation of the output (the fp32 reference does not)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, F32])
@pytest.mark.parametrize("decomposed", [False, True])
def test_masa_logits_near_1e4(backend, dtype, decomposed):
    q, k = _big_qk((1, 2, 4, 5, 16), dtype, 1)
    v = rand((1, 2, 4, 5, 8), dtype, 3)
    logits = (q.detach().double() @ k.detach().double().transpose(-1, -2)).abs().max()
    assert float(logits) > 5e3  # the case is really exercised
    run_and_compare(lambda q, k, v: _masa.masa(q, k, v, 0.9, decomposed=decomposed, scale=1.0, backend=backend),
                    lambda q, k, v: R.masa(q, k, v, 0.9, decomposed=decomposed, scale=1.0),
                    [q, k, v], dtype, f"masa big logits [{backend}, {dtype}, decomposed={decomposed}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, F32])
def test_group_attention_logits_near_1e4(backend, dtype):
    q, k = _big_qk((1, 2, 12, 16), dtype, 4)
    v = rand((1, 2, 12, 8), dtype, 6)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0)).to(DEV)
    run_and_compare(lambda q, k, v: _ga.group_attention(q, k, v, 3, perm=perm, scale=1.0, backend=backend),
                    lambda q, k, v: R_ga.group_attention(q, k, v, 3, perm=perm, scale=1.0),
                    [q, k, v], dtype, f"group_attention big logits [{backend}, {dtype}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F16, F32])
def test_dynamixer_logits_near_1e4(backend, dtype):
    L, C, S, d = 6, 8, 2, 2
    x = rand((2, L, C), dtype, 7)
    wc = rand((S * d, C), dtype, 8, 2.0)
    bc = rand((S * d,), dtype, 9)
    # generate weights large enough that the (S, L, L) logits reach several thousand
    wg = rand((L * L, L * d), dtype, 10, 100.0)
    bg = rand((L * L,), dtype, 11)
    with torch.no_grad():
        r = torch.nn.functional.linear(x.double(), wc.double(), bc.double())
        z = torch.nn.functional.linear(r.reshape(2, L, S, d).movedim(-2, -3).reshape(2, S, L * d), wg.double())
    assert float(z.abs().max()) > 4e3
    run_and_compare(lambda *a: _dm.dynamixer(*a, S, backend=backend),
                    lambda *a: R_dm.dynamixer(*a, S),
                    [x, wc, bc, wg, bg], dtype, f"dynamixer big logits [{backend}, {dtype}]")


# ---------------------------------------------------------------- gamma = 1e-6

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("decomposed", [False, True])
def test_masa_tiny_gamma(backend, dtype, decomposed):
    q = rand((1, 2, 5, 6, 8), dtype, 20)
    k = rand((1, 2, 5, 6, 8), dtype, 21)
    v = rand((1, 2, 5, 6, 8), dtype, 22)
    # learnable decay: d out / d gamma = (d out / d log gamma) / gamma, large but finite at 1e-6
    gamma = torch.tensor([1e-6, 0.5], device=DEV, requires_grad=True)
    out = run_and_compare(
        lambda q, k, v, g: _masa.masa(q, k, v, g, decomposed=decomposed, backend=backend),
        lambda q, k, v, g: R.masa(q, k, v, g, decomposed=decomposed),
        [q, k, v, gamma], dtype, f"masa gamma=1e-6 [{backend}, {dtype}, decomposed={decomposed}]")
    assert out.shape == (1, 2, 5, 6, 8)


# ---------------------------------------------------------------- eps = 1e-3, |S| / eps up to 1e4

def _sharp_scores(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.empty(shape, dtype=F64).uniform_(-10.0, 10.0, generator=g)
    return S.to(dtype).to(DEV).requires_grad_(True)


def _fp32_transport_tol(max_ratio):
    # fp32 forms S/eps once: an absolute error ~ |S|/eps * u in every exponent, i.e. a relative
    # error of that size in every plan entry (the conditioning of the problem, not of the code)
    return 8 * U32 * max_ratio


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_sinkhorn_eps_1e_3(backend, dtype):
    eps = 1e-3
    S = _sharp_scores((2, 7, 5), dtype, 30)
    ratio = float(S.detach().abs().max()) / eps
    assert ratio > 9e3
    a = (torch.rand(7, generator=torch.Generator().manual_seed(1), dtype=F64) + 0.5).to(dtype).to(DEV)
    atol = rtol = None
    if dtype == F32:
        atol = rtol = _fp32_transport_tol(ratio)
    run_and_compare(lambda S, a: _sk.sinkhorn(S, eps=eps, iters=20, a=a, backend=backend),
                    lambda S, a: R_sk.sinkhorn(S, eps=eps, iters=20, a=a),
                    [S, a], dtype, f"sinkhorn eps=1e-3 [{backend}, {dtype}]", atol=atol, rtol=rtol,
                    # fp32 gradients pass through 20 unrolled sharp iterations: only fp64 is compared
                    grads=dtype == F64)
    if dtype == F32:  # still finite gradients
        gS, = torch.autograd.grad(_sk.sinkhorn(S, eps=eps, iters=20, backend=backend).sum(), S)
        assert torch.isfinite(gS).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention", [False, True])
def test_ot_eps_1e_3(backend, attention):
    eps = 1e-3
    # |x . ref| up to ~10: |S| / eps ~ 1e4
    x = rand((1, 2, 9, 4), F64, 40, 1.6)
    r = rand((2, 4, 4), F64, 41, 1.6)
    v = rand((1, 2, 9, 3), F64, 42)
    pf = _sk.gaussian_filter_1d(9, 4, sigma=0.5, dtype=F64, device=DEV)
    with torch.no_grad():
        ratio = float(torch.einsum("bhnd,hmd->bhnm", x, r).abs().max()) / eps
    assert ratio > 5e3
    fn = _sk.ot_attention if attention else _sk.ot_aggregate
    rfn = R_sk.ot_attention if attention else R_sk.ot_aggregate
    run_and_compare(lambda x, r, v: fn(x, r, v, eps=eps, iters=15, pos_filter=pf, backend=backend),
                    lambda x, r, v: rfn(x, r, v, eps=eps, iters=15, pos_filter=pf),
                    [x, r, v], F64, f"{fn.__name__} eps=1e-3 [{backend}]")
    # fp32: finite and within the conditioning bound
    x32, r32, v32 = (t.detach().float().requires_grad_(True) for t in (x, r, v))
    tol = _fp32_transport_tol(ratio)
    run_and_compare(lambda x, r, v: fn(x, r, v, eps=eps, iters=15, pos_filter=pf.float(), backend=backend),
                    lambda x, r, v: rfn(x, r, v, eps=eps, iters=15, pos_filter=pf),
                    [x32, r32, v32], F32, f"{fn.__name__} eps=1e-3 fp32 [{backend}]", atol=tol, rtol=tol,
                    grads=False)


# ---------------------------------------------------------------- all-equal scores

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
@pytest.mark.parametrize("decomposed", [False, True])
def test_masa_all_equal_scores(backend, dtype, decomposed):
    # every query and key the same vector and gamma = 1: uniform attention, out = mean of v
    B, heads, H, W, d = 1, 2, 3, 5, 8
    base = torch.randn(d, generator=torch.Generator().manual_seed(50), dtype=F64)
    q = base.expand(B, heads, H, W, d).to(dtype).to(DEV).clone().requires_grad_(True)
    k = base.expand(B, heads, H, W, d).to(dtype).to(DEV).clone().requires_grad_(True)
    v = rand((B, heads, H, W, 6), dtype, 51)
    out = run_and_compare(lambda q, k, v: _masa.masa(q, k, v, 1.0, decomposed=decomposed, backend=backend),
                          lambda q, k, v: R.masa(q, k, v, 1.0, decomposed=decomposed),
                          [q, k, v], dtype, f"masa all-equal [{backend}, {dtype}]")
    mean = v.detach().double().mean(dim=(2, 3), keepdim=True).expand_as(v)
    torch.testing.assert_close(out.detach().double(), mean, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_sinkhorn_all_equal_scores(backend, dtype):
    S = torch.full((3, 6, 4), 0.7, dtype=dtype, device=DEV, requires_grad=True)
    P = run_and_compare(lambda S: _sk.sinkhorn(S, eps=0.05, iters=3, backend=backend),
                        lambda S: R_sk.sinkhorn(S, eps=0.05, iters=3),
                        [S], dtype, f"sinkhorn all-equal [{backend}, {dtype}]")
    torch.testing.assert_close(P.detach().double(), torch.full(P.shape, 1 / 24, dtype=F64),
                               atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("attention", [False, True])
def test_ot_all_equal_scores(backend, attention):
    # identical tokens and identical references: a uniform plan T = (m/n) / m per entry
    n, m = 6, 4
    x = torch.full((1, 2, n, 4), 0.3, device=DEV, requires_grad=True)
    r = torch.full((2, m, 4), -0.2, device=DEV, requires_grad=True)
    v = rand((1, 2, n, 5), F32, 60)
    fn = _sk.ot_attention if attention else _sk.ot_aggregate
    rfn = R_sk.ot_attention if attention else R_sk.ot_aggregate
    out = run_and_compare(lambda x, r, v: fn(x, r, v, eps=0.1, iters=3, backend=backend),
                          lambda x, r, v: rfn(x, r, v, eps=0.1, iters=3),
                          [x, r, v], F32, f"{fn.__name__} all-equal [{backend}]")
    vs = v.detach().double().sum(dim=2, keepdim=True) / n  # T^T v: every reference gets the mean token
    want = vs.expand(1, 2, n, 5) if attention else vs.expand(1, 2, m, 5)
    torch.testing.assert_close(out.detach().double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_group_attention_all_equal_scores(backend, dtype):
    N, groups = 12, 3
    base = torch.randn(8, generator=torch.Generator().manual_seed(70), dtype=F64)
    q = base.expand(2, 2, N, 8).to(dtype).to(DEV).clone().requires_grad_(True)
    k = base.expand(2, 2, N, 8).to(dtype).to(DEV).clone().requires_grad_(True)
    v = rand((2, 2, N, 5), dtype, 71)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1)).to(DEV)
    out = run_and_compare(lambda q, k, v: _ga.group_attention(q, k, v, groups, perm=perm, backend=backend),
                          lambda q, k, v: R_ga.group_attention(q, k, v, groups, perm=perm),
                          [q, k, v], dtype, f"group_attention all-equal [{backend}, {dtype}]")
    # every token gets the mean of v over its (permuted) group
    vp = v.detach().double()[:, :, perm].reshape(2, 2, groups, N // groups, 5)
    want_p = vp.mean(dim=3, keepdim=True).expand_as(vp).reshape(2, 2, N, 5)
    want = torch.empty_like(want_p)
    want[:, :, perm] = want_p
    torch.testing.assert_close(out.detach().double(), want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_dynamixer_all_equal_logits(backend, dtype):
    # generate_weight 0 and a constant bias: every logit equal, y = mean of x over the L tokens
    L, C, S, d = 7, 6, 3, 2
    x = rand((2, L, C), dtype, 80)
    wc = rand((S * d, C), dtype, 81)
    wg = torch.zeros(L * L, L * d, dtype=dtype, device=DEV, requires_grad=True)
    bg = torch.full((L * L,), 0.4, dtype=dtype, device=DEV, requires_grad=True)
    y = run_and_compare(lambda x, wc, wg, bg: _dm.dynamixer(x, wc, None, wg, bg, S, backend=backend),
                        lambda x, wc, wg, bg: R_dm.dynamixer(x, wc, None, wg, bg, S),
                        [x, wc, wg, bg], dtype, f"dynamixer all-equal [{backend}, {dtype}]")
    want = x.detach().double().mean(dim=1, keepdim=True).expand(2, L, C)
    torch.testing.assert_close(y.detach().double(), want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


# ---------------------------------------------------------------- single tokens

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("HW", [(1, 1), (1, 7), (7, 1)])
@pytest.mark.parametrize("decomposed", [False, True])
def test_masa_single_token_axes(backend, HW, decomposed):
    H, W = HW
    q, k, v = (rand((1, 2, H, W, 8), F32, 90 + i) for i in range(3))
    gamma = torch.tensor([0.3, 0.9], device=DEV, requires_grad=True)
    out = run_and_compare(lambda q, k, v, g: _masa.masa(q, k, v, g, decomposed=decomposed, backend=backend),
                          lambda q, k, v, g: R.masa(q, k, v, g, decomposed=decomposed),
                          [q, k, v, gamma], F32, f"masa {H}x{W} [{backend}, decomposed={decomposed}]")
    if H == W == 1:  # one token attends only to itself
        torch.testing.assert_close(out, v.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N_groups", [(1, 1), (5, 5), (6, 1)])
def test_group_attention_single_token(backend, N_groups):
    N, groups = N_groups
    q, k = rand((1, 2, N, 4), F32, 100), rand((1, 2, N, 4), F32, 101)
    v = rand((1, 2, N, 3), F32, 102)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(2)).to(DEV)
    out = run_and_compare(lambda q, k, v: _ga.group_attention(q, k, v, groups, perm=perm, backend=backend),
                          lambda q, k, v: R_ga.group_attention(q, k, v, groups, perm=perm),
                          [q, k, v], F32, f"group_attention N={N} groups={groups} [{backend}]")
    if N == groups:  # groups of one token: the identity on v
        torch.testing.assert_close(out, v.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nm", [(1, 1), (1, 5), (6, 1)])
def test_sinkhorn_single_row_or_column(backend, nm):
    n, m = nm
    S = rand((2, n, m), F32, 110)
    P = run_and_compare(lambda S: _sk.sinkhorn(S, eps=0.1, iters=4, backend=backend),
                        lambda S: R_sk.sinkhorn(S, eps=0.1, iters=4),
                        [S], F32, f"sinkhorn {n}x{m} [{backend}]")
    # columns always sum to b = 1/m after the last column update
    torch.testing.assert_close(P.detach().sum(-2), torch.full((2, m), 1 / m, device=DEV), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nm", [(1, 1), (1, 4), (5, 1)])
@pytest.mark.parametrize("attention", [False, True])
def test_ot_single_token_or_reference(backend, nm, attention):
    n, m = nm
    x, r, v = rand((2, 1, n, 3), F32, 120), rand((1, m, 3), F32, 121), rand((2, 1, n, 2), F32, 122)
    fn = _sk.ot_attention if attention else _sk.ot_aggregate
    rfn = R_sk.ot_attention if attention else R_sk.ot_aggregate
    run_and_compare(lambda x, r, v: fn(x, r, v, eps=0.2, iters=3, backend=backend),
                    lambda x, r, v: rfn(x, r, v, eps=0.2, iters=3),
                    [x, r, v], F32, f"{fn.__name__} n={n} m={m} [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamixer_single_token(backend):
    # L = 1: the softmax over one token is 1, y = x exactly
    x = rand((3, 1, 4), F32, 130)
    wc, bc = rand((4, 4), F32, 131), rand((4,), F32, 132)
    wg, bg = rand((1, 2), F32, 133), rand((1,), F32, 134)
    y = run_and_compare(lambda *a: _dm.dynamixer(*a, 2, backend=backend), lambda *a: R_dm.dynamixer(*a, 2),
                        [x, wc, bc, wg, bg], F32, f"dynamixer L=1 [{backend}]")
    torch.testing.assert_close(y, x.detach(), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- determinism

@pytest.fixture
def deterministic():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(old)


def _twice(fn, inputs):
    """Two independent forward+backward runs: (out, grads) of each."""
    runs = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out = fn(*leaves)
        dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
        grads = torch.autograd.grad(out, leaves, dout)
        runs.append((out.detach(), grads))
    return runs


def _assert_bitwise(runs, what):
    (o1, g1), (o2, g2) = runs
    assert torch.equal(o1, o2), f"{what}: outputs differ between runs"
    for i, (a, b) in enumerate(zip(g1, g2)):
        assert torch.equal(a, b), f"{what}: gradient {i} differs between runs"


# sizes that span several key/query blocks of the fused kernels (where a non-deterministic
# reduction order would show)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F16])
def test_determinism_masa(deterministic, backend, dtype):
    q, k, v = (rand((1, 1, 5, 7, 16), dtype, 140 + i) for i in range(3))
    gamma = torch.tensor([0.8], device=DEV)
    for decomposed in (False, True):
        runs = _twice(lambda q, k, v, g: _masa.masa(q, k, v, g, decomposed=decomposed, backend=backend),
                      [q, k, v, gamma])
        _assert_bitwise(runs, f"masa [{backend}, {dtype}, decomposed={decomposed}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_group_attention(deterministic, backend):
    q, k, v = (rand((1, 2, 40, 16), F32, 150 + i) for i in range(3))
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3)).to(DEV)
    runs = _twice(lambda q, k, v: _ga.group_attention(q, k, v, 2, perm=perm, backend=backend), [q, k, v])
    _assert_bitwise(runs, f"group_attention [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_sinkhorn_and_ot(deterministic, backend):
    S = rand((2, 20, 9), F32, 160)
    a = (torch.rand(20, generator=torch.Generator().manual_seed(4)) + 0.5).to(DEV)
    runs = _twice(lambda S, a: _sk.sinkhorn(S, eps=0.1, iters=5, a=a, backend=backend), [S, a])
    _assert_bitwise(runs, f"sinkhorn [{backend}]")
    x, r, v = rand((2, 2, 37, 8), F32, 161), rand((2, 9, 8), F32, 162), rand((2, 2, 37, 6), F32, 163)
    pf = _sk.gaussian_filter_1d(37, 9, sigma=0.3, device=DEV)
    for fn in (_sk.ot_aggregate, _sk.ot_attention):
        runs = _twice(lambda x, r, v: fn(x, r, v, eps=0.1, iters=4, pos_filter=pf, backend=backend), [x, r, v])
        _assert_bitwise(runs, f"{fn.__name__} [{backend}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_dynamixer(deterministic, backend):
    L, C, S, d = 12, 16, 2, 2
    x = rand((3, L, 5, C), F32, 170).detach().transpose(1, 2)  # a strided view, as the models mix along H
    wc, bc = rand((S * d, C), F32, 171), rand((S * d,), F32, 172)
    wg, bg = rand((L * L, L * d), F32, 173), rand((L * L,), F32, 174)
    runs = _twice(lambda *a: _dm.dynamixer(*a, S, backend=backend), [x, wc, bc, wg, bg])
    _assert_bitwise(runs, f"dynamixer [{backend}]")

