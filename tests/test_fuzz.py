"""Property-based fuzzing of every op against its dense reference.

Hypothesis draws shapes (odd ones included), strides (contiguous, strided views into a
larger buffer, permuted views as the models pass them, stride-0 broadcast views),
dtypes (fp64/fp32/fp16; bf16 only on GPU, the interpreter's bf16 arithmetic is wrong),
parameters and the backend ("torch", and "triton" under TRITON_INTERPRET=1 on CPU).
Every example compares values and every input gradient with the fp64 reference run on
the same (rounded) input values. derandomize=True: the same examples in every run (CI
reproducible); the example counts keep the file within ~3 minutes on 2 shared cores.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
DTYPES = [torch.float64, torch.float32, torch.float16]
LAYOUTS = ["contiguous", "strided", "permuted", "broadcast"]


def fuzz(backend, torch_examples, triton_examples, **strategies):
    """Run the decorated body as a derandomized Hypothesis test for one backend.

    The interpreter runs a Triton program ~1000x slower than the torch backend runs a whole
    op, so Triton gets fewer examples (and the bodies cap its sizes)."""
    n = triton_examples if backend == "triton" else torch_examples

    def deco(body):
        return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(
            given(**strategies)(body))
    return deco


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the 2 cores are shared: oversubscribed intra-op threads make small ops several times slower
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make(shape, dtype, layout, seed, scale=1.0):
    """Fresh random values (never zeros) in `dtype` with the requested memory layout, as a leaf.

    permuted: stored with dims 1 and -2 swapped (as the models' head-split views are);
    broadcast: dim 0 has stride 0 (one sample expanded over the batch).
    """
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if layout == "broadcast" and len(shape) >= 2:
        base = (torch.randn((1,) + shape[1:], generator=g, dtype=torch.float64) * scale).to(dtype)
        t = base.to(DEV).expand(shape)
    elif layout == "permuted" and len(shape) >= 3:
        perm_shape = list(shape)
        perm_shape[1], perm_shape[-2] = perm_shape[-2], perm_shape[1]
        base = (torch.randn(perm_shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)
        t = base.transpose(1, -2)
    elif layout == "strided":
        big = (torch.randn(shape + (3,), generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)
        t = big[..., 1]
    else:
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)
    assert tuple(t.shape) == shape
    return t.detach().requires_grad_(True)


def as_ref(t):
    """The same values in fp64 as a fresh leaf, for the reference."""
    return t.detach().to(torch.float64).requires_grad_(t.requires_grad)


def check_op(run_op, run_ref, inputs, dtype, seed, what):
    """Values and gradients of every input that requires grad, op vs fp64 reference."""
    out = run_op(*inputs)
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, want {dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    refs = [as_ref(t) if isinstance(t, torch.Tensor) else t for t in inputs]
    want = run_ref(*refs)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.detach().to(torch.float64), want.detach(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} values: {m}")
    g = torch.Generator().manual_seed(seed + 7)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEV)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ref_leaves = [r for t, r in zip(inputs, refs) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    want_grads = torch.autograd.grad(want, ref_leaves, dout)
    for i, (got, exp) in enumerate(zip(grads, want_grads)):
        assert got.dtype == leaves[i].dtype
        assert torch.isfinite(got).all(), f"{what}: non-finite gradient of input {i}"
        # gradients are sums over many terms: scale the absolute tolerance by their magnitude
        scale_ = max(1.0, float(exp.abs().max()))
        torch.testing.assert_close(got.to(torch.float64), exp, atol=atol * scale_, rtol=rtol,
                                   msg=lambda m: f"{what} grad of input {i}: {m}")


# ---------------------------------------------------------------- masa

@pytest.mark.parametrize("backend", BACKENDS)
def test_masa(backend):
    tri = backend == "triton"

    @fuzz(backend, 80, 8,
          B=st.integers(1, 2), heads=st.integers(1, 3), H=st.integers(1, 5), W=st.integers(1, 6),
          d=st.sampled_from([2, 5, 8, 16, 24]), dv=st.sampled_from([1, 3, 8, 17]),
          dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), decomposed=st.booleans(),
          gamma_kind=st.sampled_from(["float", "tensor"]), scale=st.sampled_from([None, 0.3, 1.0]),
          seed=st.integers(0, 2 ** 16))
    def body(B, heads, H, W, d, dv, dtype, layout, decomposed, gamma_kind, scale, seed):
        if tri:  # interpreter budget
            B, heads, H, W = min(B, 2), min(heads, 2), min(H, 4), min(W, 4)
        q = make((B, heads, H, W, d), dtype, layout, seed)
        k = make((B, heads, H, W, d), dtype, layout, seed + 1)
        v = make((B, heads, H, W, dv), dtype, "contiguous" if layout == "broadcast" else layout, seed + 2)
        if gamma_kind == "float":
            gamma = 0.85
        else:  # per-head decays in (0, 1], learnable (fp32, as RMT's buffers)
            g = torch.Generator().manual_seed(seed + 3)
            gamma = (0.3 + 0.7 * torch.rand(heads, generator=g)).to(DEV).requires_grad_(True)

        def op(q, k, v, gamma):
            return _masa.masa(q, k, v, gamma, decomposed=decomposed, scale=scale, backend=backend)

        def ref(q, k, v, gamma):
            return R.masa(q, k, v, gamma, decomposed=decomposed, scale=scale)

        check_op(op, ref, [q, k, v, gamma], dtype, seed,
                 f"masa[{backend}, {dtype}, {layout}, decomposed={decomposed}, {B}x{heads}x{H}x{W}, d={d}, dv={dv}, "
                 f"gamma={gamma_kind}, scale={scale}]")

    body()


# ---------------------------------------------------------------- sinkhorn

@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn(backend):
    @fuzz(backend, 80, 8,
          batch=st.sampled_from([(), (1,), (3,), (2, 2)]), n=st.integers(1, 9), m=st.integers(1, 7),
          dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
          eps=st.sampled_from([0.05, 0.1, 0.5, 1.0]), iters=st.integers(1, 6),
          marg=st.sampled_from(["uniform", "a", "b", "ab"]), seed=st.integers(0, 2 ** 16))
    def body(batch, n, m, dtype, layout, eps, iters, marg, seed):
        lay = "strided" if not batch and layout in ("permuted", "broadcast") else layout
        S = make(batch + (n, m), dtype, lay, seed, scale=0.5)
        g = torch.Generator().manual_seed(seed + 5)
        # positive masses of any total (rows sum to a only before the last column update)
        a = (0.2 + torch.rand(n, generator=g, dtype=torch.float64)).to(dtype).to(DEV).requires_grad_(True) \
            if "a" in marg else None
        b = (0.2 + torch.rand(batch + (m,), generator=g, dtype=torch.float64)).to(dtype).to(DEV) \
            .requires_grad_(True) if "b" in marg else None

        def op(S, a, b):
            return _sk.sinkhorn(S, eps=eps, iters=iters, a=a, b=b, backend=backend)

        def ref(S, a, b):
            return R_sk.sinkhorn(S, eps=eps, iters=iters, a=a, b=b)

        check_op(op, ref, [S, a, b], dtype, seed,
                 f"sinkhorn[{backend}, {dtype}, {lay}, {batch + (n, m)}, eps={eps}, iters={iters}, {marg}]")

    body()


# ---------------------------------------------------------------- ot_aggregate / ot_attention

@pytest.mark.parametrize("backend", BACKENDS)
def test_ot(backend):
    tri = backend == "triton"

    @fuzz(backend, 80, 8,
          B=st.integers(1, 2), heads=st.integers(1, 2), n=st.integers(1, 9), m=st.integers(1, 6),
          d=st.sampled_from([1, 3, 8, 16]), dv=st.sampled_from([None, 2, 5, 16]),
          dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
          eps=st.sampled_from([0.1, 0.5, 1.0]), iters=st.integers(1, 4),
          filt=st.sampled_from([None, "gauss", "random"]), attention=st.booleans(), seed=st.integers(0, 2 ** 16))
    def body(B, heads, n, m, d, dv, dtype, layout, eps, iters, filt, attention, seed):
        if tri:
            B = 1
        x = make((B, heads, n, d), dtype, layout, seed, scale=0.5)
        ref_t = make((heads, m, d), dtype, "strided" if layout == "strided" else "contiguous", seed + 1, scale=0.5)
        v = None if dv is None else make((B, heads, n, dv), dtype, layout, seed + 2)
        if filt == "gauss":
            pf = _sk.gaussian_filter_1d(n, m, sigma=0.5, device=DEV)
        elif filt == "random":
            g = torch.Generator().manual_seed(seed + 3)
            pf = (0.1 + torch.rand(n, m, generator=g)).to(DEV)
        else:
            pf = None
        fn = _sk.ot_attention if attention else _sk.ot_aggregate
        rfn = R_sk.ot_attention if attention else R_sk.ot_aggregate

        def op(x, r, v):
            return fn(x, r, v, eps=eps, iters=iters, pos_filter=pf, backend=backend)

        def ref(x, r, v):
            return rfn(x, r, v, eps=eps, iters=iters, pos_filter=None if pf is None else pf.double())

        name = "ot_attention" if attention else "ot_aggregate"
        check_op(op, ref, [x, ref_t, v], dtype, seed,
                 f"{name}[{backend}, {dtype}, {layout}, B={B} heads={heads} n={n} m={m} d={d} dv={dv}, "
                 f"eps={eps}, iters={iters}, filter={filt}]")

    body()


# ---------------------------------------------------------------- group attention

@pytest.mark.parametrize("backend", BACKENDS)
def test_group_attention(backend):
    @fuzz(backend, 80, 12,
          B=st.integers(1, 2), heads=st.integers(1, 3), groups=st.integers(1, 4), size=st.integers(1, 7),
          d=st.sampled_from([2, 5, 16, 32]), dv=st.sampled_from([1, 4, 16, 19]),
          dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), permuted=st.booleans(),
          scale=st.sampled_from([None, 0.25, 2.0]), seed=st.integers(0, 2 ** 16))
    def body(B, heads, groups, size, d, dv, dtype, layout, permuted, scale, seed):
        N = groups * size
        q = make((B, heads, N, d), dtype, layout, seed)
        k = make((B, heads, N, d), dtype, layout, seed + 1)
        v = make((B, heads, N, dv), dtype, layout, seed + 2)
        perm = _ga.random_permutation(N, device=DEV, generator=torch.Generator(DEV).manual_seed(seed)) \
            if permuted else None

        def op(q, k, v):
            return _ga.group_attention(q, k, v, groups, perm=perm, scale=scale, backend=backend)

        def ref(q, k, v):
            return R_ga.group_attention(q, k, v, groups, perm=perm, scale=scale)

        check_op(op, ref, [q, k, v], dtype, seed,
                 f"group_attention[{backend}, {dtype}, {layout}, B={B} heads={heads} groups={groups} "
                 f"size={size} d={d} dv={dv} perm={permuted} scale={scale}]")

    body()


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(n=st.integers(1, 300), seed=st.integers(0, 2 ** 31))
def test_permutation_helpers(n, seed):
    p = _ga.random_permutation(n, device=DEV, generator=torch.Generator(DEV).manual_seed(seed))
    assert p.dtype == torch.int64 and p.shape == (n,)
    assert torch.equal(torch.sort(p).values.cpu(), torch.arange(n))
    inv = _ga.inverse_permutation(p)
    assert torch.equal(p[inv].cpu(), torch.arange(n)) and torch.equal(inv[p].cpu(), torch.arange(n))
    # also the inverse of a strided (non-contiguous) permutation view
    big = torch.stack([p, torch.zeros_like(p)], dim=1)
    assert torch.equal(_ga.inverse_permutation(big[:, 0]), inv)


# ---------------------------------------------------------------- dynamixer

@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamixer(backend):
    @fuzz(backend, 80, 12,
          lead=st.sampled_from([(), (2,), (1, 3), (2, 1, 2)]), L=st.integers(1, 9), S=st.integers(1, 3),
          cs=st.integers(1, 5), d=st.integers(1, 3), dtype=st.sampled_from(DTYPES),
          layout=st.sampled_from(LAYOUTS), bias=st.sampled_from(["both", "none", "compress", "generate"]),
          seed=st.integers(0, 2 ** 16))
    def body(lead, L, S, cs, d, dtype, layout, bias, seed):
        C = S * cs
        lay = "strided" if not lead and layout in ("permuted", "broadcast") else layout
        x = make(lead + (L, C), dtype, lay, seed)
        wc = make((S * d, C), dtype, "contiguous", seed + 1, scale=0.5)
        bc = make((S * d,), dtype, "contiguous", seed + 2, scale=0.5) if bias in ("both", "compress") else None
        wg = make((L * L, L * d), dtype, "strided" if lay == "strided" else "contiguous", seed + 3, scale=0.5)
        bg = make((L * L,), dtype, "contiguous", seed + 4, scale=0.5) if bias in ("both", "generate") else None

        def op(x, wc, bc, wg, bg):
            return _dm.dynamixer(x, wc, bc, wg, bg, S, backend=backend)

        def ref(x, wc, bc, wg, bg):
            return R_dm.dynamixer(x, wc, bc, wg, bg, S)

        check_op(op, ref, [x, wc, bc, wg, bg], dtype, seed,
                 f"dynamixer[{backend}, {dtype}, {lay}, lead={lead} L={L} C={C} S={S} d={d} bias={bias}]")

    body()
