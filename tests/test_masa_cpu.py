"""MaSA "cpu" backend (C++ kernels in vitattn._C): values, gradients, strides, stability,
memory, dispatch and bad input, always against the dense reference or the "torch" backend."""

import os
import sys

import pytest
import torch

import vitattn
from vitattn import reference
from vitattn._dispatch import BackendUnavailableError

import vitattn._extension as ext
from vitattn.ops.masa import backends as masa_backends, torch_impl
from vitattn.ops.masa import op as masa_mod

from _util import assert_close, noncontiguous

_cpu = masa_backends._CppPasses("cpu")

pytestmark = pytest.mark.skipif(not ext.available(), reason=f"vitattn._C is not built: {ext.why_unavailable()}")

LOW = (torch.float16, torch.bfloat16)
# low-precision gradients pass through fp16/bf16 roundings of q, k, v, dout and out
GRAD_TOL = {torch.float64: (1e-9, 1e-7), torch.float32: (5e-4, 5e-4), torch.float16: (3e-2, 3e-2),
            torch.bfloat16: (1e-1, 1e-1)}


def make(B, heads, H, W, d, dv, dtype=torch.float64, mag=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64) * mag).to(dtype)
    k = (torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64) * mag).to(dtype)
    v = torch.randn(B, heads, H, W, dv, generator=g, dtype=torch.float64).to(dtype)
    gamma = 0.5 + 0.49 * torch.rand(heads, generator=g, dtype=torch.float64)
    return q, k, v, gamma


def ref_with_grads(q, k, v, gamma, dout, **kw):
    """fp64 reference output and gradients (q, k, v, gamma) from the given (rounded) inputs."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, gamma)]
    out = reference.masa(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return out.detach(), grads


def close(got, want, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


SHAPES = [
    (2, 3, 5, 7, 8, 8),    # odd grid
    (1, 2, 9, 4, 5, 3),    # odd head dims (padded to the vector width inside)
    (1, 1, 1, 13, 16, 24),  # a single row
    (1, 2, 11, 1, 7, 9),   # a single column
    (1, 1, 17, 19, 4, 4),  # N = 323 > one key block (several blocks, last one partial)
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_vs_reference(shape, decomposed, dtype):
    q, k, v, gamma = make(*shape, dtype=dtype, seed=hash((shape, decomposed)) % 1000)
    gamma = gamma.requires_grad_()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = vitattn.masa(qr, kr, vr, gamma, decomposed=decomposed, backend="cpu")
    assert out.dtype == dtype and out.shape == v.shape and out.is_contiguous()
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads = torch.autograd.grad(out, (qr, kr, vr, gamma), dout)
    want, wgrads = ref_with_grads(q, k, v, gamma, dout, decomposed=decomposed)
    assert_close(out, want, dtype, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dgamma"), grads, wgrads):
        assert g.dtype == (gamma.dtype if name == "dgamma" else dtype)
        close(g, w, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("decomposed", [False, True])
def test_strided_inputs(decomposed):
    """Non-contiguous views, a permuted (B, H, W, heads, d) layout and a stride-0 broadcast."""
    B, heads, H, W, d, dv = 2, 3, 6, 5, 12, 7
    q, k, v, gamma = make(B, heads, H, W, d, dv, dtype=torch.float32, seed=3)
    q_nc = noncontiguous(q)
    k_perm = k.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)
    v_b = v[:1].expand(B, -1, -1, -1, -1)  # one batch element broadcast over B (stride 0)
    assert not q_nc.is_contiguous() and not k_perm.is_contiguous() and v_b.stride(0) == 0
    leaves = [t.requires_grad_() for t in (q_nc, k_perm)]  # views kept as leaves: strides stay
    vleaf = v[:1].clone().requires_grad_()
    out = vitattn.masa(leaves[0], leaves[1], vleaf.expand(B, -1, -1, -1, -1), gamma, decomposed=decomposed,
                       backend="cpu")
    dout = noncontiguous(torch.randn_like(out))
    g = torch.autograd.grad(out, (*leaves, vleaf), dout)
    want, wg = ref_with_grads(q, k, v_b, gamma, dout, decomposed=decomposed)
    assert_close(out, want, torch.float32, "out")
    close(g[0], wg[0], GRAD_TOL[torch.float32], "dq")
    close(g[1], wg[1], GRAD_TOL[torch.float32], "dk")
    close(g[2], wg[2].sum(0, keepdim=True), GRAD_TOL[torch.float32], "dv (summed over the broadcast)")


@pytest.mark.parametrize("axis", [None, "w", "h"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_raw_pass_matches_torch_backend(axis, dtype):
    """The backend interface itself: out, lse (layout and dtype), dq, dk, dv, dlog_gamma."""
    q, k, v, gamma = make(2, 2, 7, 10, 6, 5, dtype=dtype, seed=11)
    lg = torch.log(gamma).to(torch.float64 if dtype == torch.float64 else torch.float32)
    out, lse = _cpu.pass_fwd(q, k, v, lg, 0.3, axis)
    out_t, lse_t = torch_impl.pass_fwd(q, k, v, lg, 0.3, axis)
    assert lse.shape == (2, 2, 7, 10) and lse.dtype == lg.dtype and out.is_contiguous()
    assert_close(out, out_t, dtype, "out")
    assert_close(lse, lse_t, dtype, "lse")
    dout = noncontiguous(torch.randn_like(out))
    got = _cpu.pass_bwd(dout, q, k, v, out, lse, lg, 0.3, axis)
    want = torch_impl.pass_bwd(dout, q, k, v, out_t, lse_t, lg, 0.3, axis)
    for name, g, w in zip(("dq", "dk", "dv", "dlog_gamma"), got, want):
        assert g.shape == w.shape, name
        close(g, w, GRAD_TOL[dtype], name)


def test_outputs_freshly_written():
    """Two calls with different inputs: every element of each result is that call's own."""
    q, k, v, gamma = make(1, 2, 9, 9, 8, 8, dtype=torch.float32, seed=1)
    q2, k2, v2, _ = make(1, 2, 9, 9, 8, 8, dtype=torch.float32, seed=2)
    for decomposed in (False, True):
        a = vitattn.masa(q, k, v, gamma, decomposed=decomposed, backend="cpu")
        b = vitattn.masa(q2, k2, v2, gamma, decomposed=decomposed, backend="cpu")
        assert a.data_ptr() not in (q.data_ptr(), k.data_ptr(), v.data_ptr())
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert_close(a, reference.masa(q.double(), k.double(), v.double(), gamma, decomposed=decomposed),
                     torch.float32, "first call")
        assert_close(b, reference.masa(q2.double(), k2.double(), v2.double(), gamma, decomposed=decomposed),
                     torch.float32, "second call")


@pytest.mark.parametrize("gamma,mag,scale", [(1.0, 1.0, None), (1e-6, 1.0, None), (0.9, 6.0, 2.0)])
@pytest.mark.parametrize("decomposed", [False, True])
def test_numerical_stability(gamma, mag, scale, decomposed):
    """gamma = 1 (no decay), a vanishing gamma (logits down to -1e3) and very peaked logits."""
    q, k, v, _ = make(1, 2, 8, 9, 16, 16, dtype=torch.float32, mag=mag, seed=5)
    out = vitattn.masa(q, k, v, gamma, decomposed=decomposed, scale=scale, backend="cpu")
    want = reference.masa(q.double(), k.double(), v.double(), gamma, decomposed=decomposed, scale=scale)
    assert torch.isfinite(out).all()
    assert_close(out, want, torch.float32, "out")


@pytest.mark.parametrize("decomposed", [False, True])
def test_gradcheck_fp64(decomposed):
    q, k, v, gamma = make(1, 2, 3, 4, 3, 2, seed=9)
    args = [t.requires_grad_() for t in (q, k, v, gamma)]
    fn = lambda q, k, v, g: vitattn.masa(q, k, v, g, decomposed=decomposed, backend="cpu")
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_deterministic_across_thread_counts():
    """Tasks never share an accumulator: 1 and 2 threads give bit-identical results."""
    q, k, v, gamma = make(1, 2, 12, 11, 8, 8, dtype=torch.float32, seed=4)
    gamma = gamma.requires_grad_()
    old = torch.get_num_threads()

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = vitattn.masa(*leaves, gamma, backend="cpu")
        return (out, *torch.autograd.grad(out.square().sum(), (*leaves, gamma)))

    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_memory_grows_linearly():
    """A 64 x 64 grid (N = 4096): an N x N fp32 tensor would be 64 MiB; the kernel's is O(N)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from common import peak_memory_mb

    q, k, v, gamma = make(1, 1, 64, 64, 8, 8, dtype=torch.float32, seed=6)
    vitattn.masa(q, k, v, gamma, backend="cpu")  # warm up allocator and thread pool
    peak = peak_memory_mb(lambda: vitattn.masa(q, k, v, gamma, backend="cpu"), torch.device("cpu"))
    if peak is None:
        pytest.skip("no /proc peak-RSS reset on this platform")
    assert peak < 16, f"forward used {peak:.1f} MiB extra"


def test_compile_fullgraph_and_export():
    q, k, v, gamma = make(1, 2, 5, 6, 8, 8, dtype=torch.float32, seed=8)
    fn = lambda q, k, v: vitattn.masa(q, k, v, 0.8, decomposed=True, backend="cpu")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    assert_close(out, reference.masa(q.double(), k.double(), v.double(), 0.8, decomposed=True), torch.float32, "compiled")
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return vitattn.masa(q, k, v, 0.8, backend="cpu")

    ep = torch.export.export(M(), (q, k, v))
    assert_close(ep.module()(q, k, v), reference.masa(q.double(), k.double(), v.double(), 0.8), torch.float32, "exported")


# ---------------------------------------------------------------- dispatch and bad input


def test_dispatch_registration():
    q, k, v, _ = make(1, 2, 16, 16, 8, 8, dtype=torch.float32)
    reasons = vitattn.explain("masa", q, k, v, 0.9).reasons()
    assert reasons["cpu"] is None
    # a tiny grid: "auto" would not take "cpu" (measured slower), naming it still runs it
    small = [t[:, :, :4, :4] for t in (q, k, v)]
    assert "measured" in vitattn.explain("masa", *small, 0.9).reasons()["cpu"]
    assert_close(vitattn.masa(*small, 0.9, backend="cpu"), reference.masa(*(t.double() for t in small), 0.9),
                 torch.float32, "explicit cpu on a small grid")
    ctx = masa_mod._context(q.to("meta"), v.to("meta"), False)
    why = masa_mod.dispatcher.reason("cpu", ctx)
    assert why is not None and "CPU tensors" in why
    with pytest.raises(BackendUnavailableError, match="cpu"):
        vitattn.masa(q.to("meta"), k.to("meta"), v.to("meta"), 0.9, backend="cpu")


@pytest.mark.parametrize("H,W,decomposed,want", [(28, 28, False, "cpu"), (56, 56, False, "cpu"), (14, 14, False, "cpu"),
                                                  (7, 7, False, "torch"), (56, 56, True, "cpu"), (28, 28, True, "torch"),
                                                  (7, 7, True, "torch")])
def test_auto_choice_follows_measurement(H, W, decomposed, want):
    """"auto" takes "cpu" where benchmarks/results/masa_cpu_vs_torch.md measured it faster."""
    ctx = dict(device=torch.device("cpu"), dtype=torch.float32, d=32, dv=32, H=H, W=W, B=1, heads=4,
               decomposed=decomposed)
    if os.environ.get("VITATTN_BACKEND"):
        pytest.skip("VITATTN_BACKEND forces the choice")
    chosen = masa_mod.dispatcher.choose("auto", ctx)
    assert chosen == want
    assert (masa_backends._cpu_check(ctx, True) is None) == (want == "cpu")


def test_bad_input_names_the_argument():
    q, k, v, gamma = make(1, 2, 4, 5, 8, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match="q"):
        vitattn.masa(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), gamma, backend="cpu")
    with pytest.raises(ValueError, match="k"):
        vitattn.masa(q, k[..., :4], v, gamma, backend="cpu")
    with pytest.raises(TypeError, match="v"):
        vitattn.masa(q, k, v.double(), gamma, backend="cpu")
    with pytest.raises(ValueError, match="gamma"):
        vitattn.masa(q, k, v, 1.5, backend="cpu")
    # the raw extension checks its own arguments too (it can be called directly)
    lg = torch.log(gamma).float()
    with pytest.raises(RuntimeError, match="axis"):
        ext.C.masa_cpu_fwd(q, k, v, lg, 0.5, 3)
    with pytest.raises(RuntimeError, match="log_gamma"):
        ext.C.masa_cpu_fwd(q, k, v, lg[:1], 0.5, 0)
    with pytest.raises(RuntimeError, match="k must have"):
        ext.C.masa_cpu_fwd(q, k[:, :1], v, lg, 0.5, 0)
    with pytest.raises(RuntimeError, match="lse"):
        out, lse = ext.C.masa_cpu_fwd(q, k, v, lg, 0.5, 0)
        ext.C.masa_cpu_bwd(out, q, k, v, out, lse[..., :1], lg, 0.5, 0)


def test_missing_extension_stub_raises_import_error(monkeypatch):
    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_error", "it was not built (test)")
    with pytest.raises(ImportError, match="not built"):
        ext.C.masa_cpu_fwd
    assert "missing" in repr(ext.C)


def test_package_works_without_the_extension():
    """With vitattn._C unimportable: torch backend still runs, "cpu" is refused with the reason."""
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import sys
        sys.modules["vitattn._C"] = None  # makes `from . import _C` raise ImportError
        import torch, vitattn
        import vitattn._extension as ext
        from vitattn._dispatch import BackendUnavailableError
        assert not ext.available() and "absent" in ext.status(), ext.status()
        q = torch.randn(1, 2, 3, 4, 8)
        out = vitattn.masa(q, q, q, 0.9)  # auto falls back to "torch"
        assert torch.isfinite(out).all()
        try:
            vitattn.masa(q, q, q, 0.9, backend="cpu")
        except BackendUnavailableError as e:
            assert "vitattn._C" in str(e), e
        else:
            raise AssertionError("cpu ran without the extension")
        try:
            ext.C.masa_cpu_fwd
        except ImportError as e:
            assert "vitattn._C" in str(e)
        else:
            raise AssertionError("stub did not raise")
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "VITATTN_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr
