"""group_attention C++ CPU kernels (vitattn._C: torch.ops.vitattn_C.group_attention_cpu_fwd/_bwd):
values, log-sum-exp and gradients against the dense reference on fresh random inputs, odd
shapes, permutations, strides, poisoned outputs, large logits, thread-count independence, the
baseline (DEFAULT) instruction-set build, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vitattn.reference import group_attention as reference

try:
    import vitattn._C  # noqa: F401  (registers torch.ops.vitattn_C)

    HAVE_EXT = hasattr(torch.ops.vitattn_C, "group_attention_cpu_fwd")
    WHY = "vitattn._C has no group_attention_cpu_fwd (rebuild the extension)"
except ImportError as exc:
    HAVE_EXT, WHY = False, f"vitattn._C is not built: {exc}"

pytestmark = pytest.mark.skipif(not HAVE_EXT, reason=WHY)

LOW = (torch.float16, torch.bfloat16)
# (atol, rtol) against the fp64 reference computed from the same (rounded) inputs; gradients
# are sums over a whole group, so their atol is scaled by the largest reference gradient
OUT_TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 4e-3),
           torch.bfloat16: (3e-2, 3e-2)}
GRAD_TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (1e-4, 5e-4), torch.float16: (1e-2, 2e-2),
            torch.bfloat16: (6e-2, 6e-2)}


def ops():
    return torch.ops.vitattn_C


def make(B, H, N, d, dv, dtype, seed, mag=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) * mag).to(dtype)
    k = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) * mag).to(dtype)
    v = torch.randn(B, H, N, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def make_perm(N, seed):
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed))


def reference_all(q, k, v, groups, perm, scale, dout):
    """fp64 out, lse (B, heads, N) and (dq, dk, dv) from the given (rounded) inputs."""
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out = reference(*leaves, groups, perm=perm, scale=scale)
    grads = torch.autograd.grad(out, leaves, dout.double())
    B, H, N, d = q.shape
    n = N // groups
    qd, kd = q.double(), k.double()
    if perm is not None:
        qd, kd = qd[:, :, perm], kd[:, :, perm]
    s = scale * qd.reshape(B, H, groups, n, d) @ kd.reshape(B, H, groups, n, d).transpose(-1, -2)
    lse = torch.logsumexp(s, -1).reshape(B, H, N)
    if perm is not None:
        lse = lse[:, :, torch.argsort(perm)]
    return out.detach(), lse, grads


def close(got, want, tol, what, scale_atol=False):
    atol, rtol = tol
    if scale_atol:
        atol = atol * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def run_cpu(q, k, v, groups, perm, scale, dout):
    out, lse = ops().group_attention_cpu_fwd(q, k, v, perm, groups, scale)
    dq, dk, dv = ops().group_attention_cpu_bwd(dout, q, k, v, out, lse, perm, groups, scale)
    return out, lse, (dq, dk, dv)


def check(q, k, v, groups, perm, scale, dtype, what, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g, dtype=torch.float64).to(dtype)
    out, lse, grads = run_cpu(q, k, v, groups, perm, scale, dout)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and out.shape == q.shape[:3] + (v.shape[-1],) and out.is_contiguous()
    assert lse.dtype == acc and lse.shape == q.shape[:3]
    want, lse_ref, ref_grads = reference_all(q, k, v, groups, perm, scale, dout)
    close(out, want, OUT_TOL[dtype], f"{what} out")
    close(lse, lse_ref, OUT_TOL[acc], f"{what} lse", scale_atol=True)
    for name, got, ref, t in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert got.dtype == dtype and got.shape == t.shape and got.is_contiguous()
        close(got, ref, GRAD_TOL[dtype], f"{what} {name}", scale_atol=True)


# B, heads, N, d, dv, groups, permuted
SHAPES = [
    (2, 3, 28, 16, 16, 4, True),     # n = 7
    (1, 2, 196, 32, 32, 2, True),    # n = 98, SReT-T head dim
    (3, 1, 49, 42, 42, 1, False),    # n = 49, SReT-S head dim, one group
    (2, 1, 30, 24, 20, 3, True),     # d = 24, dv = 20 (neither a multiple of the vector width)
    (1, 2, 21, 8, 5, 21, True),      # group size 1, odd N
    (2, 2, 45, 24, 20, 5, False),    # odd N, n = 9, no permutation
    (1, 1, 600, 16, 12, 1, True),    # one group beyond a key block: online softmax, blocked backward
]
SHAPE_IDS = ["x".join(map(str, s[:6])) + ("p" if s[6] else "") for s in SHAPES]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_values_lse_gradients(shape, dtype):
    B, H, N, d, dv, G, permuted = shape
    q, k, v = make(B, H, N, d, dv, dtype, seed=N + G + d)
    perm = make_perm(N, seed=N) if permuted else None
    check(q, k, v, G, perm, d ** -0.5, dtype, f"{shape} {dtype}", seed=N)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3], SHAPES[6]], ids=[SHAPE_IDS[1], SHAPE_IDS[3], SHAPE_IDS[6]])
def test_half_precision_inputs(shape, dtype):
    # loaded and accumulated in fp32, rounded once on store
    B, H, N, d, dv, G, permuted = shape
    q, k, v = make(B, H, N, d, dv, dtype, seed=7 + N)
    perm = make_perm(N, seed=8) if permuted else None
    check(q, k, v, G, perm, d ** -0.5, dtype, f"{shape} {dtype}")


class _CpuGroupAttention(torch.autograd.Function):
    """The two C++ entry points as one differentiable function (for gradcheck)."""

    @staticmethod
    def forward(ctx, q, k, v, perm, groups, scale):
        out, lse = ops().group_attention_cpu_fwd(q, k, v, perm, groups, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.perm, ctx.groups, ctx.scale = perm, groups, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ops().group_attention_cpu_bwd(dout.contiguous(), q, k, v, out, lse, ctx.perm, ctx.groups,
                                                   ctx.scale)
        return dq, dk, dv, None, None, None


@pytest.mark.parametrize("B,H,N,d,dv,G,permuted,fast", [
    (1, 1, 6, 3, 4, 2, True, False),     # every Jacobian column
    (2, 2, 12, 5, 3, 3, True, False),
    (1, 1, 300, 4, 3, 1, False, True),   # beyond a key block in fp64 (online softmax, blocked backward)
], ids=["exact", "groups", "blocked"])
def test_gradcheck_fp64(B, H, N, d, dv, G, permuted, fast):
    q, k, v = (t.requires_grad_(True) for t in make(B, H, N, d, dv, torch.float64, seed=N))
    perm = make_perm(N, seed=3) if permuted else None
    fn = lambda a, b, c: _CpuGroupAttention.apply(a, b, c, perm, G, 0.7)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, fast_mode=fast)


def test_groups_n_returns_v_and_groups_1_ignores_perm():
    q, k, v = make(2, 3, 20, 16, 8, torch.float64, seed=22)
    perm = make_perm(20, seed=2)
    for p in (None, perm):
        out, lse = ops().group_attention_cpu_fwd(q, k, v, p, 20, 0.25)
        assert torch.equal(out, v)  # softmax over one key is exactly 1
    # full attention is permutation-equivariant: perm changes nothing but the key order
    a, _ = ops().group_attention_cpu_fwd(q, k, v, None, 1, 0.25)
    b, _ = ops().group_attention_cpu_fwd(q, k, v, perm, 1, 0.25)
    close(a, b, OUT_TOL[torch.float64], "groups=1 with perm")


def test_permutation_semantics():
    # permuting the inputs, attending in contiguous groups and un-permuting is the same as
    # gathering through perm in the kernel (bitwise: the kernel sees the same rows in the same order)
    N, G = 24, 4
    q, k, v = make(2, 2, N, 16, 12, torch.float32, seed=24)
    perm = make_perm(N, seed=6)
    inv = torch.argsort(perm)
    out, lse = ops().group_attention_cpu_fwd(q, k, v, perm, G, 0.3)
    plain, plain_lse = ops().group_attention_cpu_fwd(q[:, :, perm], k[:, :, perm], v[:, :, perm], None, G, 0.3)
    assert torch.equal(out, plain[:, :, inv]) and torch.equal(lse, plain_lse[:, :, inv])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = ops().group_attention_cpu_bwd(dout, q, k, v, out, lse, perm, G, 0.3)
    pgrads = ops().group_attention_cpu_bwd(dout[:, :, perm], q[:, :, perm], k[:, :, perm], v[:, :, perm],
                                           plain, plain_lse, None, G, 0.3)
    for a, b in zip(grads, pgrads):
        assert torch.equal(a, b[:, :, inv])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs_give_identical_results(dtype):
    # the kernels read through any strides: views give bitwise the contiguous result
    B, H, N, d, G = 2, 3, 60, 16, 5
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))   # the qkv-linear layout of SReT
    assert not q.is_contiguous()
    perm = make_perm(N, seed=5)
    dout = torch.randn(B, H, N, d, generator=g).to(dtype)
    base = run_cpu(*(t.contiguous() for t in (q, k, v)), G, perm, 0.37, dout)
    views = [
        (q, k, v, dout),
        # a gap between features (feature stride 2) and a transposed (feature-major) layout
        tuple(torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0] for t in (q, k, v, dout)),
        tuple(t.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v, dout)),
    ]
    for i, (a, b, c, do) in enumerate(views):
        out, lse, grads = run_cpu(a, b, c, G, perm, 0.37, do)
        assert torch.equal(out, base[0]) and torch.equal(lse, base[1]), i
        for x, y in zip(grads, base[2]):
            assert torch.equal(x, y), i
    # a broadcast (stride-0) batch dimension
    k1, v1 = k[:1].expand(B, -1, -1, -1), v[:1].expand(B, -1, -1, -1)
    out, lse, _ = run_cpu(q, k1, v1, G, perm, 0.37, dout)
    ref, ref_lse, _ = run_cpu(q.contiguous(), k1.contiguous(), v1.contiguous(), G, perm, 0.37, dout)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


def test_outputs_fully_written():
    # PyTorch's deterministic mode fills every fresh at::empty with NaN: an output element, lse
    # entry or gradient row the kernels fail to write (or write to the wrong token) stays NaN
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        assert torch.isnan(torch.empty(3)).all()  # the poisoning is in effect
        for (B, H, N, d, dv, G), dtype in (((2, 2, 30, 24, 20, 6), torch.float64),
                                           ((1, 2, 140, 16, 8, 2), torch.float32),
                                           ((1, 1, 520, 8, 8, 1), torch.bfloat16)):
            q, k, v = make(B, H, N, d, dv, dtype, seed=N)
            perm = make_perm(N, seed=N)
            dout = torch.randn(B, H, N, dv, dtype=torch.float64, generator=torch.Generator().manual_seed(N)).to(dtype)
            out, lse, grads = run_cpu(q, k, v, G, perm, N ** -0.5, dout)
            for t in (out, lse) + tuple(grads):
                assert torch.isfinite(t).all()
            want, lse_ref, ref_grads = reference_all(q, k, v, G, perm, N ** -0.5, dout)
            close(out, want, OUT_TOL[dtype], "poisoned out")
            for got, ref in zip(grads, ref_grads):
                close(got, ref, GRAD_TOL[dtype], "poisoned grads", scale_atol=True)
    finally:
        torch.use_deterministic_algorithms(prev_det)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_large_logits(dtype):
    # |scale q.k| up to ~3e3: the max-shifted exponentials must neither overflow nor lose the
    # result; fp32 inputs are compared against fp64 math on the same (rounded) values
    B, H, N, d, G = 1, 2, 64, 16, 2
    q, k, v = make(B, H, N, d, d, dtype, seed=31, mag=15.0)
    perm = make_perm(N, seed=4)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(B, H, N, d, generator=g, dtype=torch.float64).to(dtype)
    out, lse, grads = run_cpu(q, k, v, G, perm, 1.0, dout)
    assert lse.abs().max() > 500
    want, lse_ref, ref_grads = reference_all(q, k, v, G, perm, 1.0, dout)
    close(out, want, OUT_TOL[dtype], "out")
    close(lse, lse_ref, OUT_TOL[dtype], "lse", scale_atol=True)
    # near-one-hot softmax: gradients w.r.t. q and k are products of huge logits and tiny
    # probabilities, so compare them relative to their scale
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert torch.isfinite(got).all(), name
        close(got, ref, GRAD_TOL[dtype], name, scale_atol=True)


@pytest.mark.parametrize("shape", [(1, 1, 300, 16, 16, 1), (2, 3, 196, 32, 32, 4), (1, 1, 600, 8, 8, 1)],
                         ids=["one-group", "sret-s2", "blocked"])
def test_bitwise_identical_1_and_2_threads(shape):
    # one group of 300 tokens is split over several query-block tasks, more with 2 threads
    B, H, N, d, dv, G = shape
    q, k, v = make(B, H, N, d, dv, torch.float32, seed=N)
    perm = make_perm(N, seed=9)
    dout = torch.randn(B, H, N, dv, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run_cpu(q, k, v, G, perm, 0.2, dout))
    finally:
        torch.set_num_threads(before)
    (o1, l1, g1), (o2, l2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_empty_batch():
    q, k, v = make(0, 2, 12, 8, 4, torch.float32, seed=0)
    out, lse = ops().group_attention_cpu_fwd(q, k, v, None, 3, 0.5)
    assert out.shape == (0, 2, 12, 4) and lse.shape == (0, 2, 12)
    grads = ops().group_attention_cpu_bwd(out, q, k, v, out, lse, None, 3, 0.5)
    assert [tuple(g.shape) for g in grads] == [(0, 2, 12, 8), (0, 2, 12, 8), (0, 2, 12, 4)]


DEFAULT_ISA_SCRIPT = textwrap.dedent("""
    import torch, vitattn._C as C
    from vitattn.reference import group_attention as reference
    assert C.cpu_isa().startswith("default"), C.cpu_isa()
    ops = torch.ops.vitattn_C
    for dtype, (B, H, N, d, dv, G), tol in ((torch.float64, (2, 2, 30, 24, 20, 3), 1e-9),
                                           (torch.float32, (1, 2, 196, 42, 42, 2), 2e-4),
                                           (torch.bfloat16, (1, 1, 520, 8, 8, 1), 6e-2)):
        g = torch.Generator().manual_seed(N)
        q, k, v = (torch.randn(B, H, N, f, generator=g, dtype=torch.float64).to(dtype) for f in (d, d, dv))
        perm = torch.randperm(N, generator=g)
        dout = torch.randn(B, H, N, dv, generator=g, dtype=torch.float64).to(dtype)
        out, lse = ops.group_attention_cpu_fwd(q, k, v, perm, G, d ** -0.5)
        grads = ops.group_attention_cpu_bwd(dout, q, k, v, out, lse, perm, G, d ** -0.5)
        leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
        want = reference(*leaves, G, perm=perm, scale=d ** -0.5)
        ref = torch.autograd.grad(want, leaves, dout.double())
        torch.testing.assert_close(out.double(), want.detach(), atol=tol, rtol=tol)
        for a, b in zip(grads, ref):
            torch.testing.assert_close(a.double(), b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol)
    print("ok", C.cpu_isa())
""")


def test_default_isa_build_in_subprocess():
    # the baseline copy of the kernels (no AVX), chosen by PyTorch's ATEN_CPU_CAPABILITY
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", DEFAULT_ISA_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok default"), res.stdout


def test_bad_input_names_the_argument():
    f, b = ops().group_attention_cpu_fwd, ops().group_attention_cpu_bwd
    q, k, v = make(1, 2, 12, 8, 4, torch.float32, seed=0)
    perm = make_perm(12, seed=0)
    out, lse = f(q, k, v, perm, 3, 0.5)
    cases = [
        (TypeError, "q must be float16, bfloat16, float32 or float64", lambda: f(q.long(), k.long(), v.long(), None, 3, .5)),
        (TypeError, "k has dtype", lambda: f(q, k.double(), v, None, 3, .5)),
        (TypeError, "v has dtype", lambda: f(q, k, v.half(), None, 3, .5)),
        (ValueError, "q must have 4 dimensions", lambda: f(q[0], k, v, None, 3, .5)),
        (ValueError, "k must have q's shape", lambda: f(q, k[:, :, :6], v, None, 3, .5)),
        (ValueError, "v must have shape", lambda: f(q, k, v[:, :1], None, 3, .5)),
        (ValueError, "groups must be >= 1", lambda: f(q, k, v, None, 0, .5)),
        (ValueError, "groups must divide", lambda: f(q, k, v, None, 5, .5)),
        (ValueError, "scale must be finite", lambda: f(q, k, v, None, 3, float("inf"))),
        (TypeError, "perm must be an int64", lambda: f(q, k, v, perm.int(), 3, .5)),
        (ValueError, "perm must have shape", lambda: f(q, k, v, perm[:11], 3, .5)),
        (ValueError, "perm must be a permutation", lambda: f(q, k, v, perm.clamp(max=10), 3, .5)),
        (ValueError, "perm must be a permutation", lambda: f(q, k, v, perm + 1, 3, .5)),
        (ValueError, "perm must be a permutation", lambda: f(q, k, v, perm - 1, 3, .5)),
        (ValueError, "dout must have v's shape", lambda: b(out[:, :, :6], q, k, v, out, lse, perm, 3, .5)),
        (TypeError, "out has dtype", lambda: b(out, q, k, v, out.double(), lse, perm, 3, .5)),
        (TypeError, "lse must have dtype", lambda: b(out, q, k, v, out, lse.double(), perm, 3, .5)),
        (ValueError, "lse must have shape", lambda: b(out, q, k, v, out, lse[:, :1], perm, 3, .5)),
        (ValueError, "perm must be a permutation", lambda: b(out, q, k, v, out, lse, perm.flip(0).clamp(min=1), 3, .5)),
    ]
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


# ---------------------------------------------------------------- through the public op


def test_public_op_backend_cpu_values_and_gradients():
    from vitattn import explain, group_attention

    for dtype, (B, H, N, d, dv, G, permuted) in ((torch.float64, SHAPES[3]), (torch.float32, SHAPES[1]),
                                                 (torch.bfloat16, SHAPES[4])):
        q, k, v = (t.requires_grad_(True) for t in make(B, H, N, d, dv, dtype, seed=N))
        perm = make_perm(N, seed=1) if permuted else None
        assert explain("group_attention", q, k, v, G, perm=perm).reasons()["cpu"] is None
        out = group_attention(q, k, v, G, perm=perm, backend="cpu")
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        want, _, ref_grads = reference_all(q, k, v, G, perm, d ** -0.5, dout)
        close(out, want, OUT_TOL[dtype], f"{dtype} out")
        for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
            close(got, ref, GRAD_TOL[dtype], f"{dtype} {name}", scale_atol=True)
        # "auto" picks a backend that can run (the C++ one unless measurements rank another first)
        auto = group_attention(q, k, v, G, perm=perm)
        close(auto, want, OUT_TOL[dtype], f"{dtype} auto")


def test_public_op_cpu_custom_op_registration_and_empty_batch():
    from vitattn import group_attention

    q, k, v = (t.requires_grad_(True) for t in make(1, 2, 12, 16, 8, torch.float64, seed=6))
    perm = make_perm(12, seed=3)
    for p in (perm, None):
        torch.library.opcheck(torch.ops.vitattn.group_attention_fwd.default, (q, k, v, p, 3, 0.25, "cpu"),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    e = torch.randn(0, 2, 12, 16, requires_grad=True)
    out = group_attention(e, e, e, 3, backend="cpu")
    assert out.shape == (0, 2, 12, 16)
    (g,) = torch.autograd.grad(out.sum(), (e,))
    assert g.shape == e.shape
