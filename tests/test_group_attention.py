"""group_attention (SReT group / permuted attention): every backend against the dense reference.

Run on CPU with the Triton kernels under the interpreter:
    TRITON_INTERPRET=1 python -m pytest tests/test_group_attention.py
"""

from __future__ import annotations

import math

import pytest
import torch

import vitattn
from vitattn import _validate as V
from vitattn._dispatch import BackendUnavailableError
from vitattn import group_attention, inverse_permutation, random_permutation
from vitattn.ops.group_attention.op import explain
from vitattn.reference import group_attention as reference

from _util import HAS_CUDA, TRITON_DEVICE, assert_close, backends_for, noncontiguous

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def _case_params():
    """(device, backend) pairs that can run here."""
    return [(dev, be) for dev in DEVICES for be in backends_for(dev)]


CASES = _case_params()
IDS = [f"{d}-{b}" for d, b in CASES]


def _inputs(B, H, N, d, dv, dtype, device, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda f: torch.randn(B, H, N, f, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = mk(d), mk(d), mk(dv)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _perm(N, device, seed):
    return random_permutation(N, device=device, generator=torch.Generator(device=device).manual_seed(seed))


def _check(q, k, v, groups, perm, backend, dtype, scale=None, what=""):
    """Values and q/k/v gradients of one backend against the fp64 reference on the same inputs."""
    out = group_attention(q, k, v, groups, perm=perm, scale=scale, backend=backend)
    assert out.dtype == dtype and out.shape == q.shape[:3] + (v.shape[-1],)
    q64, k64, v64 = (t.detach().to(torch.float64).requires_grad_(True) for t in (q, k, v))
    want = reference(q64, k64, v64, groups, perm=perm, scale=scale)
    assert_close(out, want, dtype, f"{what} out")
    dout = torch.randn(out.shape, dtype=torch.float64, device=out.device)
    got = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    ref = torch.autograd.grad(want, (q64, k64, v64), dout.to(dtype).to(torch.float64))
    for name, a, b in zip("qkv", got, ref):
        assert a.dtype == dtype
        # gradients are sums over a whole group: scale the tolerance by their magnitude
        atol, rtol = {torch.float64: (1e-9, 1e-7), torch.float32: (5e-4, 5e-4), torch.float16: (3e-2, 3e-2),
                      torch.bfloat16: (1e-1, 1e-1)}[dtype]
        torch.testing.assert_close(a.to(torch.float64), b, atol=atol * max(1.0, b.abs().max().item()), rtol=rtol,
                                   msg=lambda m: f"{what} d{name}: {m}")


# Group sizes cover the packed layout (several tiny groups, of different heads and images, in
# one program; sizes 1, 7, 14, 49 that are no multiple of 16) and the tiled layout (98, 392
# beyond the fp32/fp64 tile), head dims 32 and 42 (SReT-T, SReT-S), dv != d.
SHAPES = [
    # B, heads, N, d, dv, groups, permuted
    (2, 3, 28, 16, 16, 4, True),     # n = 7, 9 groups packed per program, last program partial
    (1, 2, 56, 32, 32, 4, True),     # n = 14
    (3, 1, 49, 42, 42, 1, False),    # n = 49, head dim of SReT-S
    (1, 2, 196, 32, 32, 2, True),    # n = 98: packed in fp16, tiled in fp32/fp64 (2 query/key blocks)
    (1, 1, 392, 16, 24, 1, True),    # n = 392: 7 blocks of 64, dv != d; perm unused at groups=1
    (2, 1, 30, 24, 40, 3, True),     # n = 10, odd feature sizes
]


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + ("p" if s[6] else ""))
def test_matches_reference_fp64(device, backend, shape):
    B, H, N, d, dv, G, permuted = shape
    q, k, v = _inputs(B, H, N, d, dv, torch.float64, device, seed=N + G, requires_grad=True)
    perm = _perm(N, device, seed=N) if permuted else None
    _check(q, k, v, G, perm, backend, torch.float64, what=f"{backend} {shape}")


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 2, 98, 32, 32, 7, True), (1, 1, 196, 42, 42, 2, True)],
                         ids=["n14", "n98"])
def test_low_precision(device, backend, dtype, shape):
    if dtype == torch.bfloat16 and device == "cpu" and backend == "triton":
        pytest.skip("the Triton interpreter's bf16 arithmetic is wrong; bf16 is tested on GPU only")
    if dtype == torch.float16 and device == "cpu" and backend == "torch":
        pass  # the torch backend computes in fp32 and casts, fp16 is fine on CPU
    B, H, N, d, dv, G, permuted = shape
    q, k, v = _inputs(B, H, N, d, dv, dtype, device, seed=3, requires_grad=True)
    perm = _perm(N, device, seed=4) if permuted else None
    _check(q, k, v, G, perm, backend, dtype, what=f"{backend} {dtype}")


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
def test_noncontiguous_and_scale(device, backend):
    # q/k/v as produced by a qkv linear: (B, N, 3, heads, d) permuted to (B, heads, N, d) views
    B, H, N, d, G = 2, 3, 60, 16, 5
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, N, 3, H, d, generator=g, dtype=torch.float64).to(device)
    q, k, v = (qkv[:, :, i].transpose(1, 2).requires_grad_(True) for i in range(3))
    assert not q.is_contiguous()
    perm = _perm(N, device, 5)
    _check(q, k, v, G, perm, backend, torch.float64, scale=0.37, what="qkv views")
    # strided views with a gap between elements
    q2, k2, v2 = (noncontiguous(t.detach()).requires_grad_(True) for t in (q, k, v))
    assert q2.stride(-1) == 2
    _check(q2, k2, v2, G, perm, backend, torch.float64, what="strided")


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
def test_groups_1_is_full_attention(device, backend):
    q, k, v = _inputs(2, 2, 45, 16, 16, torch.float64, device, seed=21)
    perm = _perm(45, device, 1)
    out = group_attention(q, k, v, 1, perm=perm, backend=backend)
    full = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    assert_close(out, full, torch.float64, "groups=1")


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
def test_groups_n_returns_v(device, backend):
    # one token per group: softmax over a single key is 1, so out = v (whatever the permutation)
    q, k, v = _inputs(2, 3, 20, 16, 8, torch.float64, device, seed=22)
    perm = _perm(20, device, 2)
    for p in (None, perm):
        out = group_attention(q, k, v, 20, perm=p, backend=backend)
        assert torch.equal(out, v)


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
def test_identity_perm_equals_none(device, backend):
    q, k, v = _inputs(1, 2, 36, 16, 16, torch.float64, device, seed=23)
    a = group_attention(q, k, v, 3, backend=backend)
    b = group_attention(q, k, v, 3, perm=torch.arange(36, device=device), backend=backend)
    assert_close(a, b, torch.float64, "identity perm")


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
def test_permutation_semantics(device, backend):
    # Direct statement of the semantics: permuting the inputs by perm, attending in contiguous
    # groups without perm, and un-permuting gives the permuted result; and the groups really are
    # taken in permuted order (a different perm gives a different result).
    N, G = 24, 4
    q, k, v = _inputs(2, 2, N, 16, 16, torch.float64, device, seed=24)
    perm = _perm(N, device, 6)
    inv = inverse_permutation(perm)
    out = group_attention(q, k, v, G, perm=perm, backend=backend)
    plain = group_attention(q[:, :, perm], k[:, :, perm], v[:, :, perm], G, backend=backend)
    assert_close(out, plain[:, :, inv], torch.float64, "semantics")
    other = group_attention(q, k, v, G, perm=_perm(N, device, 7), backend=backend)
    assert (other - out).abs().max() > 1e-3


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
def test_outputs_fully_written(device, backend, monkeypatch):
    # No out= buffer exists: poison every fresh allocation instead, so a row or feature the
    # kernels forget to write (or write to the wrong token) shows up as NaN.
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **kw):
        t = real_empty(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    def nan_empty_like(*a, **kw):
        t = real_empty_like(*a, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    for N, G, d in ((30, 6, 24), (140, 2, 16)):  # packed (n = 5) and tiled (n = 70) layouts
        q, k, v = _inputs(2, 2, N, d, d, torch.float64, device, seed=N, requires_grad=True)
        perm = _perm(N, device, N)
        monkeypatch.setattr(torch, "empty", nan_empty)
        monkeypatch.setattr(torch, "empty_like", nan_empty_like)
        try:
            out = group_attention(q, k, v, G, perm=perm, backend=backend)
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        finally:
            monkeypatch.undo()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(g).all() for g in grads)
        q64, k64, v64 = (t.detach().requires_grad_(True) for t in (q, k, v))
        want = reference(q64, k64, v64, G, perm=perm)
        assert_close(out, want, torch.float64, "poisoned out")
        ref_grads = torch.autograd.grad(want, (q64, k64, v64), torch.ones_like(want))
        for a, b in zip(grads, ref_grads):
            assert_close(a, b, torch.float64, "poisoned grads")


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
@pytest.mark.parametrize("B,H,N,d,G,permuted,fast", [
    (1, 1, 6, 3, 2, True, False),    # every Jacobian column, tiny
    (2, 2, 12, 16, 3, True, True),   # packed: groups of different heads/images share a program
    (1, 1, 80, 8, 1, False, True),   # one group of 80 > the fp64 tile of 64: Triton's tiled kernels
], ids=["exact", "packed", "tiled"])
def test_gradcheck_fp64(device, backend, B, H, N, d, G, permuted, fast):
    q, k, v = _inputs(B, H, N, d, d + 1, torch.float64, device, seed=N, requires_grad=True)
    perm = _perm(N, device, 9) if permuted else None
    fn = lambda a, b, c: group_attention(a, b, c, G, perm=perm, backend=backend)
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=fast)


@pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("n,block", [(33, 16), (16, 16), (9, 16)])
def test_triton_tiled_and_packed_edges(n, block):
    # Small forced tiles reach, cheaply, the tiled layout with several key blocks and a ragged
    # last block (33), an exact fit (16) and packing with a partial last tile (9 -> 1 per tile).
    from vitattn.kernels import group_attention as tk

    dev = TRITON_DEVICE
    B, H, G = 1, 2, 2
    N = n * G
    meta = tk.config(n, 16, 16, torch.float64, block)
    assert meta["PACKED"] == (n <= block)
    q, k, v = _inputs(B, H, N, 16, 24, torch.float64, dev, seed=n)
    perm = _perm(N, dev, n)
    out, lse = tk.group_attention_fwd(q, k, v, perm, G, 0.3, block=block)
    q64, k64, v64 = (t.clone().requires_grad_(True) for t in (q, k, v))
    want = reference(q64, k64, v64, G, perm=perm, scale=0.3)
    assert_close(out, want, torch.float64, "fwd")
    # lse per original token
    qp, kp = q[:, :, perm].reshape(B, H, G, n, 16), k[:, :, perm].reshape(B, H, G, n, 16)
    lse_ref = torch.logsumexp(0.3 * qp @ kp.transpose(-1, -2), -1).reshape(B, H, N)[:, :, inverse_permutation(perm)]
    assert_close(lse, lse_ref, torch.float64, "lse")
    dout = torch.randn_like(out)
    dq, dk, dv = tk.group_attention_bwd(dout, q, k, v, out, lse, perm, G, 0.3, block=block)
    rq, rk, rv = torch.autograd.grad(want, (q64, k64, v64), dout)
    for name, a, b in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close(a, b, torch.float64, name)


@pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_config_layouts():
    from vitattn.kernels import group_attention as tk

    # SReT shapes in fp16, head dim 32: groups of 49 / 14 / 7 tokens are packed (14 and 7 several
    # per program), 98 and 392 are tiled
    for n, packed, pack in ((98, False, 1), (49, True, 1), (14, True, 4), (7, True, 9), (392, False, 1)):
        for bwd in (False, True):
            m = tk.config(n, 32, 32, torch.float16, backward=bwd)
            assert (m["PACKED"], m["PACK"]) == (packed, pack), (n, bwd, m)
            if packed:
                assert m["PACK"] * n <= m["BLOCK_M"]
    # head dim 42 (SReT-S): padded to 64; the backward uses smaller tiles but still packs 14s
    assert tk.config(42, 42, 42, torch.float16)["BLOCK_D"] == 64
    m = tk.config(14, 42, 42, torch.float16, backward=True)
    assert m["PACKED"] and m["PACK"] == 2 and m["BLOCK_M"] == 32
    assert tk.config(49, 42, 42, torch.float16, backward=True)["PACKED"] is False
    # fp32: exact products, smaller tiles
    m = tk.config(10, 16, 16, torch.float32)
    assert m["PREC"] == "ieee" and m["BLOCK_M"] == 32
    assert tk.config(10, 16, 16, torch.float16)["PREC"] == "tf32"


# ---------------------------------------------------------------- permutations


@pytest.mark.parametrize("device", DEVICES)
def test_random_permutation(device):
    g = torch.Generator(device=device).manual_seed(0)
    p = random_permutation(784, device=device, generator=g)
    assert p.dtype == torch.int64 and p.device.type == device and p.shape == (784,)
    assert torch.equal(p.sort().values, torch.arange(784, device=device))
    assert not torch.equal(p, torch.arange(784, device=device))
    # reproducible with a generator, different draws without re-seeding
    again = random_permutation(784, device=device, generator=torch.Generator(device=device).manual_seed(0))
    assert torch.equal(p, again)
    assert not torch.equal(p, random_permutation(784, device=device, generator=g))
    assert torch.equal(random_permutation(1, device=device), torch.zeros(1, dtype=torch.int64, device=device))
    inv = inverse_permutation(p)
    ar = torch.arange(784, device=device)
    assert torch.equal(inv[p], ar) and torch.equal(p[inv], ar)
    assert torch.equal(inv, torch.argsort(p))


def test_random_permutation_is_uniform_enough():
    # position of element 0 over many draws of a 4-permutation: roughly uniform
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(4)
    for _ in range(800):
        counts[random_permutation(4, generator=g).tolist().index(0)] += 1
    assert (counts > 140).all() and (counts < 260).all(), counts


def test_permutation_helpers_bad_input():
    with pytest.raises(TypeError, match="n must be an int"):
        random_permutation(3.0)
    with pytest.raises(ValueError, match="n must be >= 1"):
        random_permutation(0)
    with pytest.raises(TypeError, match="generator"):
        random_permutation(3, generator=1)
    with pytest.raises(ValueError, match="device"):
        random_permutation(3, device="nodevice")
    if HAS_CUDA:
        with pytest.raises(ValueError, match="generator"):
            random_permutation(3, device="cuda", generator=torch.Generator())
    with pytest.raises(TypeError, match="perm must be a torch.Tensor"):
        inverse_permutation([0, 1])
    with pytest.raises(TypeError, match="perm must be an int64"):
        inverse_permutation(torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="perm must have shape"):
        inverse_permutation(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="perm must be a permutation"):
        inverse_permutation(torch.tensor([0, 0, 2]))


# ---------------------------------------------------------------- validation and dispatch


def test_bad_input_names_the_argument():
    q, k, v = _inputs(1, 2, 12, 8, 8, torch.float32, "cpu", seed=0)
    perm = random_permutation(12)
    cases = [
        (TypeError, "q must be a torch.Tensor", lambda: group_attention(q.numpy(), k, v, 2)),
        (ValueError, "q must have 4 dimensions", lambda: group_attention(q[0], k, v, 2)),
        (TypeError, "q must be float16", lambda: group_attention(q.long(), k.long(), v.long(), 2)),
        (TypeError, "k has dtype", lambda: group_attention(q, k.double(), v, 2)),
        (ValueError, "k must have shape", lambda: group_attention(q, k[:, :, :6], v, 2)),
        (ValueError, "v must have shape", lambda: group_attention(q, k, v[:, :1], 2)),
        (TypeError, "groups must be an int", lambda: group_attention(q, k, v, 2.0)),
        (ValueError, "groups must be >= 1", lambda: group_attention(q, k, v, 0)),
        (ValueError, "groups must divide", lambda: group_attention(q, k, v, 5)),
        (TypeError, "perm must be an int64", lambda: group_attention(q, k, v, 2, perm=perm.int())),
        (TypeError, "perm must be a torch.Tensor", lambda: group_attention(q, k, v, 2, perm=list(range(12)))),
        (ValueError, "perm must have shape", lambda: group_attention(q, k, v, 2, perm=perm[:11])),
        (ValueError, "perm must have shape", lambda: group_attention(q, k, v, 2, perm=perm[None])),
        (ValueError, "perm must be a permutation", lambda: group_attention(q, k, v, 2, perm=perm.clamp(max=10))),
        (ValueError, "perm must be a permutation", lambda: group_attention(q, k, v, 2, perm=perm + 1)),
        (ValueError, "perm must be a permutation", lambda: group_attention(q, k, v, 2, perm=perm - 1)),
        (TypeError, "scale must be a float", lambda: group_attention(q, k, v, 2, scale="x")),
        (ValueError, "scale must be finite", lambda: group_attention(q, k, v, 2, scale=math.inf)),
        (ValueError, "unknown backend", lambda: group_attention(q, k, v, 2, backend="nope")),
        (TypeError, "backend must be a string", lambda: group_attention(q, k, v, 2, backend=None)),
        (ValueError, "feature dim d >= 1", lambda: group_attention(q[..., :0], k[..., :0], v, 2)),
    ]
    if HAS_CUDA:
        cases.append((ValueError, "perm is on", lambda: group_attention(q, k, v, 2, perm=perm.cuda())))
        cases.append((ValueError, "k is on", lambda: group_attention(q, k.cuda(), v, 2)))
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_cpu_perm_checked_even_with_value_checks_off():
    q, k, v = _inputs(1, 1, 8, 8, 8, torch.float32, "cpu", seed=0)
    V.set_value_checks(False)
    try:
        with pytest.raises(ValueError, match="perm must be a permutation"):
            group_attention(q, k, v, 2, perm=torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]))
    finally:
        V.set_value_checks(True)


def test_dispatch():
    q, k, v = _inputs(1, 1, 8, 8, 8, torch.float32, "cpu", seed=0)
    reasons = explain(q, k, v, 2).reasons()
    assert reasons["torch"] is None
    assert "triton" in reasons
    # the interpreter is never chosen automatically, so CPU tensors go to the torch backend
    assert reasons["triton"] is not None
    if TRITON_DEVICE != "cpu":
        with pytest.raises(BackendUnavailableError, match="triton"):
            group_attention(q, k, v, 2, backend="triton")
    huge = torch.randn(1, 1, 8, 300)
    if TRITON_DEVICE is not None:
        with pytest.raises(BackendUnavailableError, match="head dims up to 256"):
            group_attention(huge, huge, huge, 2, backend="triton")


def test_autocast_cpu():
    q, k, v = _inputs(1, 2, 16, 8, 8, torch.float32, "cpu", seed=5)
    perm = random_permutation(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = group_attention(q, k, v, 4, perm=perm, backend="torch")
    assert out.dtype == torch.bfloat16
    want = reference(*(t.to(torch.bfloat16).double() for t in (q, k, v)), 4, perm=perm)
    assert_close(out, want, torch.bfloat16, "autocast")


@pytest.mark.parametrize("device,backend", CASES, ids=IDS)
def test_opcheck(device, backend):
    # fake tensor / autograd registration / schema of the custom ops
    q, k, v = _inputs(1, 2, 12, 16, 16, torch.float64, device, seed=6, requires_grad=True)
    perm = _perm(12, device, 3)
    for p in (perm, None):
        torch.library.opcheck(torch.ops.vitattn.group_attention_fwd.default, (q, k, v, p, 3, 0.25, backend),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_compile_fullgraph_and_export():
    q, k, v = _inputs(1, 2, 12, 8, 8, torch.float32, "cpu", seed=7, requires_grad=True)
    perm = random_permutation(12)

    def f(q, k, v, perm):
        return group_attention(q, k, v, 3, perm=perm, backend="torch").sum(-1)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, perm)
    want = f(q, k, v, perm)
    assert_close(got, want, torch.float32, "compiled")
    g1 = torch.autograd.grad(got.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert_close(a, b, torch.float32, "compiled grads")

    class M(torch.nn.Module):
        def forward(self, q, k, v, perm):
            return group_attention(q, k, v, 3, perm=perm, backend="torch")

    qd, kd, vd = (t.detach() for t in (q, k, v))
    ep = torch.export.export(M(), (qd, kd, vd, perm))
    assert_close(ep.module()(qd, kd, vd, perm), M()(qd, kd, vd, perm), torch.float32, "exported")


@pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton needs CUDA or TRITON_INTERPRET=1")
def test_triton_unchecked_bad_perm_stays_in_bounds():
    # Under torch.compile perm values are not checked; the kernels mask out-of-range indices
    # instead of reading or writing outside the tensors. Valid rows are still exact.
    from vitattn.kernels import group_attention as tk

    dev = TRITON_DEVICE
    N, G = 8, 2
    q, k, v = _inputs(1, 1, N, 16, 16, torch.float64, dev, seed=1)
    bad = torch.tensor([0, 1, 2, 3, 4, 5, 6, 1 << 40], device=dev)
    out, _ = tk.group_attention_fwd(q, k, v, bad, G, 0.25)
    # the first group (tokens 0-3) is untouched by the bad index
    want = reference(q, k, v, G, perm=torch.arange(N, device=dev), scale=0.25)
    assert_close(out[:, :, :4], want[:, :, :4], torch.float64, "valid group")
    neg = torch.tensor([-3, 1, 2, 3, 4, 5, 6, 7], device=dev)
    tk.group_attention_fwd(q, k, v, neg, G, 0.25)
