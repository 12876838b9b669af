"""Manhattan self-attention: reference, every backend against it, autograd, integration, bad input."""

import itertools
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import vitattn
from vitattn import reference

from _util import TRITON_DEVICE, assert_close, noncontiguous

DEV = "cuda" if torch.cuda.is_available() else "cpu"


BACKENDS = ["torch"] + (["triton"] if TRITON_DEVICE == DEV else [])



def make(B, heads, H, W, d, dv, dtype=torch.float64, device=DEV, mag=1.0, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = (torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64) * mag).to(device=device, dtype=dtype)
    k = (torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64) * mag).to(device=device, dtype=dtype)
    v = torch.randn(B, heads, H, W, dv, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    gamma = (0.5 + 0.49 * torch.rand(heads, generator=g, dtype=torch.float64)).to(device)
    return q, k, v, gamma


def ref64(q, k, v, gamma, **kw):
    return reference.masa(q.double(), k.double(), v.double(), gamma.double() if torch.is_tensor(gamma) else gamma, **kw)


# ---------------------------------------------------------------- the reference itself


def _loop_masa(q, k, v, gamma, decomposed, scale):
    """Independent formula: explicit loops over tokens in numpy (tiny grids only)."""
    q, k, v = (t.detach().double().cpu().numpy() for t in (q, k, v))
    B, Hh, H, W, d = q.shape
    g = np.broadcast_to(np.asarray(gamma, dtype=np.float64).reshape(-1), (Hh,))
    out = np.zeros(v.shape)

    def attend(qi, ks, vs, dists, gh):
        logits = np.array([scale * qi @ kj + math.log(gh) * dj for kj, dj in zip(ks, dists)])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        return sum(wj * vj for wj, vj in zip(w, vs))

    for b, h in itertools.product(range(B), range(Hh)):
        if not decomposed:
            toks = [(r, c) for r in range(H) for c in range(W)]
            for r, c in toks:
                out[b, h, r, c] = attend(q[b, h, r, c], [k[b, h, i, j] for i, j in toks], [v[b, h, i, j] for i, j in toks],
                                         [abs(r - i) + abs(c - j) for i, j in toks], g[h])
        else:
            mid = np.zeros(v.shape[2:])
            for r, c in itertools.product(range(H), range(W)):
                mid[r, c] = attend(q[b, h, r, c], k[b, h, r], v[b, h, r], [abs(c - j) for j in range(W)], g[h])
            for r, c in itertools.product(range(H), range(W)):
                out[b, h, r, c] = attend(q[b, h, r, c], k[b, h, :, c], mid[:, c], [abs(r - i) for i in range(H)], g[h])
    return torch.from_numpy(out)


@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("shape", [(1, 2, 3, 4, 5, 3), (2, 1, 2, 5, 4, 6), (1, 1, 1, 1, 3, 2)])
def test_reference_matches_independent_formula(shape, decomposed):
    q, k, v, gamma = make(*shape, device="cpu")
    got = reference.masa(q, k, v, gamma, decomposed=decomposed, scale=0.7)
    want = _loop_masa(q, k, v, gamma.numpy(), decomposed, 0.7)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_reference_gamma_one_is_plain_softmax_attention():
    q, k, v, _ = make(2, 2, 3, 5, 8, 4, device="cpu")
    got = reference.masa(q, k, v, 1.0)
    qf, kf, vf = (t.reshape(2, 2, 15, -1) for t in (q, k, v))
    want = torch.softmax(qf @ kf.transpose(-1, -2) / math.sqrt(8), -1) @ vf
    torch.testing.assert_close(got, want.reshape(2, 2, 3, 5, 4))


# ---------------------------------------------------------------- backends against the reference

SHAPES = [
    (2, 3, 7, 9, 24, 20),   # odd grid, d=24, dv != d
    (1, 2, 1, 1, 16, 16),   # a single token
    (1, 1, 17, 3, 64, 64),  # tall thin grid, d=64
    (1, 2, 5, 6, 16, 40),   # dv > d
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_grads(backend, dtype, decomposed, shape):
    q, k, v, gamma = make(*shape, dtype=dtype)
    gamma = gamma.to(dtype if dtype != torch.float16 else torch.float32).requires_grad_(True)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out = vitattn.masa(q, k, v, gamma, decomposed=decomposed, backend=backend)
    assert out.dtype == dtype and out.shape == v.shape and out.is_contiguous()
    want = ref64(q, k, v, gamma, decomposed=decomposed)
    assert_close(out, want, dtype, "out")

    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, gamma), dout)
    q64, k64, v64, g64 = (t.detach().double().requires_grad_(True) for t in (q, k, v, gamma))
    want_grads = torch.autograd.grad(reference.masa(q64, k64, v64, g64, decomposed=decomposed), (q64, k64, v64, g64), dout.double())
    for name, got, exp in zip("qkvg", grads, want_grads):
        assert got.dtype == (q.dtype if name != "g" else gamma.dtype)
        # dgamma sums over every token pair: compare relative to its size
        if name == "g":
            torch.testing.assert_close(got.double(), exp, atol=assert_tol(dtype) * (1 + exp.abs().max().item()), rtol=assert_tol(dtype))
        else:
            assert_close(got, exp, dtype, f"d{name}")


def assert_tol(dtype):
    return {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 3e-2}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decomposed", [False, True])
def test_gradcheck_fp64(backend, decomposed):
    q, k, v, gamma = make(1, 2, 2, 3, 4, 3)
    args = [t.requires_grad_(True) for t in (q, k, v, gamma)]
    fn = lambda q, k, v, g: vitattn.masa(q, k, v, g, decomposed=decomposed, backend=backend)
    # the interpreter costs ~0.1 s a call: Triton is checked along random directions (fast
    # mode), the torch backend element by element; both against finite differences in fp64
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decomposed", [False, True])
def test_permuted_and_strided_inputs(backend, decomposed):
    # RMT hands in (B, H, W, heads, d) projections permuted to (B, heads, H, W, d)
    B, heads, H, W, d, dv = 2, 2, 5, 7, 16, 24
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, W, heads, d, generator=g, dtype=torch.float64).to(DEV).permute(0, 3, 1, 2, 4)
    k = torch.randn(B, W, H, heads, d, generator=g, dtype=torch.float64).to(DEV).permute(0, 3, 2, 1, 4)
    v = noncontiguous(torch.randn(B, heads, H, W, dv, generator=g, dtype=torch.float64).to(DEV))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    for t in (q, k, v):
        t.requires_grad_(True)
    out = vitattn.masa(q, k, v, 0.83, decomposed=decomposed, backend=backend)
    want = ref64(q, k, v, 0.83, decomposed=decomposed)
    assert_close(out, want, torch.float64, "out")
    dout = noncontiguous(torch.randn_like(out))
    got = torch.autograd.grad(out, (q, k, v), dout)
    exp = torch.autograd.grad(want, (q, k, v), dout)
    for a, b in zip(got, exp):
        assert_close(a, b, torch.float64, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits_and_tiny_gamma_stay_finite(backend, decomposed, dtype):
    q, k, v, _ = make(1, 2, 6, 7, 24, 16, dtype=dtype, mag=30 ** 0.5 * 5.5)  # |q|,|k| ~ 30
    for t in (q, k, v):
        t.requires_grad_(True)
    gamma = torch.tensor([1e-4, 1e-6], dtype=torch.float64, device=DEV)
    out = vitattn.masa(q, k, v, gamma, decomposed=decomposed, backend=backend)
    assert torch.isfinite(out).all()
    assert_close(out, ref64(q, k, v, gamma, decomposed=decomposed), dtype, "out")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert all(torch.isfinite(g_).all() for g_ in grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decomposed", [False, True])
def test_poisoned_buffers_are_fully_overwritten(backend, decomposed, monkeypatch):
    # every freshly allocated floating buffer starts as NaN: any element a kernel forgets shows up
    q, k, v, gamma = make(1, 2, 5, 9, 24, 20, dtype=torch.float32)
    for t in (q, k, v):
        t.requires_grad_(True)
    real_empty = torch.empty

    def poisoned(*size, **kw):
        t = real_empty(*size, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", poisoned)
    out = vitattn.masa(q, k, v, gamma, decomposed=decomposed, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    monkeypatch.undo()
    assert torch.isfinite(out).all()
    assert_close(out, ref64(q, k, v, gamma, decomposed=decomposed), torch.float32, "out")
    for g_ in grads:
        assert torch.isfinite(g_).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gamma_forms_agree(backend):
    q, k, v, _ = make(1, 3, 4, 5, 8, 8)
    a = vitattn.masa(q, k, v, 0.75, backend=backend)
    b = vitattn.masa(q, k, v, torch.tensor(0.75, dtype=torch.float64, device=DEV), backend=backend)
    c = vitattn.masa(q, k, v, torch.full((3,), 0.75, dtype=torch.float64, device=DEV), backend=backend)
    d = vitattn.masa(q, k, v, torch.full((1,), 0.75, dtype=torch.float32, device=DEV), backend=backend)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalar_gamma_gradient(backend):
    q, k, v, _ = make(1, 2, 3, 4, 8, 8)
    g = torch.tensor(0.6, dtype=torch.float64, device=DEV, requires_grad=True)
    out = vitattn.masa(q, k, v, g, backend=backend)
    (dg,) = torch.autograd.grad(out.sum() + out.square().sum(), g)
    g64 = g.detach().clone().requires_grad_(True)
    want = reference.masa(q, k, v, g64)
    (dg_ref,) = torch.autograd.grad(want.sum() + want.square().sum(), g64)
    assert dg.shape == () and torch.allclose(dg, dg_ref, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("decomposed", [False, True])
def test_scale_argument(backend, decomposed):
    q, k, v, gamma = make(1, 2, 4, 3, 12, 5)
    out = vitattn.masa(q, k, v, gamma, decomposed=decomposed, scale=1.0, backend=backend)
    assert_close(out, reference.masa(q, k, v, gamma, decomposed=decomposed, scale=1.0), torch.float64, "out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    q, k, v, gamma = make(2, 2, 6, 5, 16, 16, dtype=torch.float32)
    outs = []
    for _ in range(2):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        o = vitattn.masa(qq, kk, vv, gamma, backend=backend)
        outs.append((o, *torch.autograd.grad(o.square().sum(), (qq, kk, vv))))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_head_dims_up_to_256_on_triton():
    if TRITON_DEVICE != DEV:
        pytest.skip("Triton kernels are not runnable here (no GPU and TRITON_INTERPRET unset)")
    q, k, v, gamma = make(1, 1, 2, 3, 256, 1)
    q.requires_grad_(True)
    out = vitattn.masa(q, k, v, gamma, backend="triton")
    assert_close(out, ref64(q, k, v, gamma), torch.float64, "out")
    (dq,) = torch.autograd.grad(out.sum(), q)
    q2 = q.detach().requires_grad_(True)
    (dq_ref,) = torch.autograd.grad(reference.masa(q2, k, v, gamma).sum(), q2)
    assert_close(dq, dq_ref, torch.float64, "dq")


# ---------------------------------------------------------------- PyTorch integration


def test_torch_compile_fullgraph_no_graph_break():
    q, k, v, gamma = make(1, 2, 4, 5, 8, 8, dtype=torch.float32)
    q.requires_grad_(True)

    def f(q, k, v):
        return vitattn.masa(q, k, v, 0.9, backend="torch").sum() + vitattn.masa(q, k, v, gamma, decomposed=True).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v)
    want = f(q, k, v)
    torch.testing.assert_close(got, want)
    (g1,) = torch.autograd.grad(got, q)
    (g2,) = torch.autograd.grad(want, q)
    torch.testing.assert_close(g1, g2)


def test_torch_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return vitattn.masa(q, k, v, 0.9, decomposed=True, backend="torch")

    q, k, v, _ = make(1, 2, 4, 5, 8, 6, dtype=torch.float32)
    ep = torch.export.export(M(), (q, k, v))
    assert any("vitattn.masa_fwd" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(q, k, v), M()(q, k, v))


def test_autocast_runs_in_low_precision():
    q, k, v, gamma = make(1, 2, 4, 5, 16, 16, dtype=torch.float32)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = vitattn.masa(q, k, v, gamma, backend="torch")
    assert out.dtype == torch.bfloat16
    assert_close(out, ref64(q, k, v, gamma), torch.bfloat16, "out")


# ---------------------------------------------------------------- memory bound of the torch backend


def test_torch_backend_is_memory_bounded_at_96x96():
    # N = 9216: one (heads, N, N) fp32 tensor alone would be 680 MB
    code = textwrap.dedent(
        """
        import torch, vitattn
        from benchmarks.common import peak_memory_mb
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 2, 96, 96, 16, requires_grad=True) for _ in range(3))
        def step():
            out = vitattn.masa(q, k, v, 0.9, backend="torch")
            out.backward(torch.ones_like(out))
        print(peak_memory_mb(step, torch.device("cpu")))
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    assert res.returncode == 0, res.stderr
    peak = float(res.stdout.strip().splitlines()[-1])
    assert peak < 600, f"peak memory grew by {peak:.0f} MB"


# ---------------------------------------------------------------- dispatch and bad input


def test_auto_picks_a_backend_and_explains():
    q, k, v, gamma = make(1, 1, 2, 2, 4, 4)
    vitattn.masa(q, k, v, gamma)  # runs
    reasons = vitattn.explain("masa", q, k, v, 0.9).reasons()
    assert set(reasons) >= {"torch", "triton", "cpu", "cuda"}
    assert reasons["torch"] is None
    if DEV == "cpu":
        assert "cuda" in reasons and reasons["cuda"]  # cannot run on CPU tensors, with a reason
        assert reasons["triton"]  # never chosen automatically on CPU


def test_unknown_backend_is_value_error():
    q, k, v, gamma = make(1, 1, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="backend"):
        vitattn.masa(q, k, v, gamma, backend="tpu")
    with pytest.raises(TypeError, match="backend"):
        vitattn.masa(q, k, v, gamma, backend=None)


def test_explicit_triton_on_cpu_without_interpreter_says_why():
    code = textwrap.dedent(
        """
        import os, torch
        os.environ.pop("TRITON_INTERPRET", None)
        import vitattn
        q = torch.randn(1, 1, 2, 2, 4)
        try:
            vitattn.masa(q, q, q, 0.5, backend="triton")
        except vitattn.BackendUnavailableError as e:
            print("RAISED", e)
        """
    )
    env = {k_: v_ for k_, v_ in os.environ.items() if k_ != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "RAISED" in res.stdout and ("TRITON_INTERPRET" in res.stdout or "triton cannot be imported" in res.stdout)


BAD = [
    ("wrong rank", lambda q, k, v: dict(q=q[0]), ValueError, "q"),
    ("k shape", lambda q, k, v: dict(k=k[..., :3]), ValueError, "k"),
    ("v grid", lambda q, k, v: dict(v=v[:, :, :1]), ValueError, "v"),
    ("int dtype", lambda q, k, v: dict(q=q.long(), k=k.long(), v=v.long()), TypeError, "q"),
    ("mixed dtype", lambda q, k, v: dict(k=k.float()), TypeError, "k"),
    ("device", lambda q, k, v: dict(k=k.to("meta")), ValueError, "k"),
    ("gamma zero", lambda q, k, v: dict(gamma=0.0), ValueError, "gamma"),
    ("gamma negative tensor", lambda q, k, v: dict(gamma=torch.tensor([0.5, -0.1], dtype=torch.float64, device=DEV)), ValueError, "gamma"),
    ("gamma above one", lambda q, k, v: dict(gamma=1.5), ValueError, "gamma"),
    ("gamma above one tensor", lambda q, k, v: dict(gamma=torch.tensor(1.01, device=DEV)), ValueError, "gamma"),
    ("gamma shape", lambda q, k, v: dict(gamma=torch.full((3,), 0.5, device=DEV)), ValueError, "gamma"),
    ("gamma 2-D", lambda q, k, v: dict(gamma=torch.full((2, 1), 0.5, device=DEV)), ValueError, "gamma"),
    ("gamma int tensor", lambda q, k, v: dict(gamma=torch.tensor([1, 1], device=DEV)), TypeError, "gamma"),
    ("gamma string", lambda q, k, v: dict(gamma="0.5"), TypeError, "gamma"),
    ("not a tensor", lambda q, k, v: dict(v=v.tolist()), TypeError, "v"),
    ("decomposed", lambda q, k, v: dict(decomposed="yes"), TypeError, "decomposed"),
    ("scale", lambda q, k, v: dict(scale=float("nan")), ValueError, "scale"),
]


@pytest.mark.parametrize("name,change,exc,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, change, exc, arg):
    q, k, v, _ = make(1, 2, 3, 3, 4, 4)
    kw = dict(q=q, k=k, v=v, gamma=0.5)
    kw.update(change(q, k, v))
    with pytest.raises(exc, match=arg):
        vitattn.masa(kw.pop("q"), kw.pop("k"), kw.pop("v"), kw.pop("gamma"), **kw)


def test_autocast_accepts_mixed_input_dtypes():
    q, k, v, gamma = make(1, 2, 3, 4, 8, 8, dtype=torch.float32)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        out = vitattn.masa(q.to(torch.bfloat16), k, v.double(), gamma, backend="torch")
    assert out.dtype == torch.bfloat16
    assert_close(out, ref64(q.to(torch.bfloat16), k, v, gamma), torch.bfloat16, "out")
    with torch.autocast(DEV, dtype=torch.bfloat16), pytest.raises(TypeError, match="q"):
        vitattn.masa(q.long(), k, v, gamma, backend="torch")
