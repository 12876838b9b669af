"""MaSA "cpu" backend (C++ kernels in vitattn._C, csrc/cpu/masa*): the whole-op entry points
torch.ops.vitattn_C.masa_cpu_fwd / masa_cpu_bwd and vitattn.masa(backend="cpu"), always against
the dense reference: values, the saved statistics (v_mid, lse) and gradients (gamma's too) in
fp64 / fp32 and from fp16 / bf16 inputs, fp64 gradcheck, odd shapes, strided and permuted inputs,
poisoned buffers, large logits, bitwise-identical results with 1 and 2 threads, the DEFAULT
instruction-set copy, memory, compile / export, dispatch and bad input."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vitattn
from vitattn import reference
from vitattn._dispatch import BackendUnavailableError

from _util import assert_close, noncontiguous

try:
    import vitattn._C  # noqa: F401  (registers torch.ops.vitattn_C)
    _WHY = ""
except ImportError as exc:  # not built
    _WHY = str(exc)

pytestmark = pytest.mark.skipif(bool(_WHY), reason=f"vitattn._C is not built: {_WHY}")

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
# (atol, rtol) of gradients against the fp64 reference, relative to the gradient's size:
# low-precision gradients pass through fp16/bf16 roundings of q, k, v, dout, out and v_mid
GRAD_TOL = {F64: (1e-9, 1e-7), F32: (5e-4, 5e-4), F16: (3e-2, 3e-2), BF16: (1e-1, 1e-1)}
# the saved log-sum-exp (fp32 for low-precision inputs, computed from the rounded inputs)
LSE_TOL = {F64: (1e-10, 1e-10), F32: (1e-5, 1e-5), F16: (1e-4, 1e-5), BF16: (1e-4, 1e-5)}


def ops():
    return torch.ops.vitattn_C


def acc(dtype):
    return F64 if dtype == F64 else F32


def make(B, heads, H, W, d, dv, dtype=F64, mag=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, heads, H, W, d, generator=g, dtype=F64) * mag).to(dtype)
    k = (torch.randn(B, heads, H, W, d, generator=g, dtype=F64) * mag).to(dtype)
    v = torch.randn(B, heads, H, W, dv, generator=g, dtype=F64).to(dtype)
    gamma = 0.5 + 0.49 * torch.rand(heads, generator=g, dtype=F64)
    return q, k, v, gamma


def _axis_distance(L):
    i = torch.arange(L, dtype=F64)
    return (i[:, None] - i[None, :]).abs()


def _grid_distance(H, W):
    r, c = torch.arange(H * W) // W, torch.arange(H * W) % W
    return ((r[:, None] - r[None]).abs() + (c[:, None] - c[None]).abs()).to(F64)


def dense_passes(q, k, v, log_gamma, scale, decomposed):
    """fp64 dense (out, v_mid, lse_w, lse_h): the backend contract's results, differentiable."""
    q, k, v, lg = (t.double() for t in (q, k, v, log_gamma))
    B, heads, H, W, d = q.shape
    lg = lg[None, :, None, None]
    if not decomposed:
        dist = _grid_distance(H, W)
        s = scale * q.reshape(B, heads, H * W, d) @ k.reshape(B, heads, H * W, d).transpose(-1, -2) + lg * dist
        out = torch.softmax(s, -1) @ v.reshape(B, heads, H * W, -1)
        return out.reshape(v.shape), None, torch.logsumexp(s, -1).reshape(B, heads, H, W), None
    s = scale * q @ k.transpose(-1, -2) + lg[..., None] * _axis_distance(W)
    v_mid = torch.softmax(s, -1) @ v
    lse_w = torch.logsumexp(s, -1)
    qh, kh = q.transpose(2, 3), k.transpose(2, 3)
    s = scale * qh @ kh.transpose(-1, -2) + lg[..., None] * _axis_distance(H)
    out = (torch.softmax(s, -1) @ v_mid.transpose(2, 3)).transpose(2, 3)
    return out, v_mid, lse_w, torch.logsumexp(s, -1).transpose(2, 3)


def close(got, want, tol, what):
    atol, rtol = tol
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def close_grad(got, want, dtype, what):
    """Gradients relative to their size (dlog_gamma sums over every token pair)."""
    atol, rtol = GRAD_TOL[dtype]
    mag = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.double(), want, atol=atol * mag, rtol=rtol, msg=lambda m: f"{what}: {m}")


SHAPES = [
    (2, 3, 7, 9, 24, 20),  # odd grid, d = 24, dv != d
    (1, 2, 1, 1, 16, 16),  # a single token
    (1, 2, 1, 13, 8, 8),  # a single row (1 x W)
    (1, 2, 11, 1, 7, 9),  # a single column (H x 1)
    (1, 1, 17, 3, 64, 64),  # tall thin grid, d = 64
    (1, 2, 5, 6, 16, 40),  # dv > d
    (1, 1, 24, 25, 5, 3),  # N = 600: two key blocks and five query blocks in the full form
]


@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16], ids=str)
@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_whole_op_contract_values_and_gradients(shape, decomposed, dtype):
    """masa_cpu_fwd's (out, v_mid, lse_w, lse_h) and masa_cpu_bwd's (dq, dk, dv, dlog_gamma)."""
    q, k, v, gamma = make(*shape, dtype=dtype, seed=sum(shape) + decomposed)
    lg = torch.log(gamma).to(acc(dtype))
    scale = 0.7 / shape[4] ** 0.5
    out, v_mid, lse_w, lse_h = ops().masa_cpu_fwd(q, k, v, lg, scale, decomposed)
    assert out.dtype == dtype and out.shape == v.shape and out.is_contiguous()
    assert lse_w.dtype == acc(dtype) and lse_w.shape == q.shape[:4]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, lg)]
    want = dense_passes(*leaves, scale, decomposed)
    assert_close(out, want[0], dtype, "out")
    close(lse_w, want[2], LSE_TOL[dtype], "lse_w" if decomposed else "lse")
    if decomposed:
        assert v_mid.dtype == dtype and v_mid.shape == v.shape and lse_h.shape == q.shape[:4]
        assert_close(v_mid, want[1], dtype, "v_mid")
        close(lse_h, want[3], LSE_TOL[dtype], "lse_h")
    else:
        assert v_mid.shape == (0,) and lse_h.shape == (0,)
    dout = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = ops().masa_cpu_bwd(dout, q, k, v, lg, out, v_mid, lse_w, lse_h, scale, decomposed)
    wgrads = torch.autograd.grad(want[0], leaves, dout.double())
    for name, g, w, t in zip(("dq", "dk", "dv", "dlog_gamma"), got, wgrads, (q, k, v, lg)):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous(), name
        close_grad(g, w, dtype, name)


@pytest.mark.parametrize("dtype", [F64, F32, F16, BF16], ids=str)
@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
def test_public_op_gradients_with_learnable_gamma(decomposed, dtype):
    """vitattn.masa(backend="cpu") with gamma a (heads,) tensor that requires grad."""
    q, k, v, gamma = make(2, 3, 7, 9, 24, 20, dtype=dtype, seed=3)
    gamma = gamma.to(acc(dtype)).requires_grad_()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = vitattn.masa(*leaves, gamma, decomposed=decomposed, backend="cpu")
    assert out.dtype == dtype and out.shape == v.shape
    dout = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, (*leaves, gamma), dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, gamma)]
    want = reference.masa(*ref_leaves, decomposed=decomposed)
    assert_close(out, want, dtype, "out")
    wgrads = torch.autograd.grad(want, ref_leaves, dout.double())
    for name, g, w in zip(("dq", "dk", "dv", "dgamma"), grads, wgrads):
        assert g.dtype == (gamma.dtype if name == "dgamma" else dtype), name
        close_grad(g, w, dtype, name)


@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
@pytest.mark.parametrize("shape", [(1, 2, 3, 4, 3, 2), (1, 1, 2, 5, 4, 6)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_fp64(shape, decomposed):
    q, k, v, gamma = make(*shape, seed=9)
    args = [t.requires_grad_() for t in (q, k, v, gamma)]
    fn = lambda q, k, v, g: vitattn.masa(q, k, v, g, decomposed=decomposed, backend="cpu")
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
def test_strided_and_permuted_inputs(decomposed):
    """RMT's layout ((B, H, W, heads, d) permuted), a feature stride of 2, a stride-0
    broadcast and a non-contiguous dout, read in place by the kernels."""
    B, heads, H, W, d, dv = 2, 3, 6, 5, 12, 7
    q, k, v, gamma = make(B, heads, H, W, d, dv, dtype=F32, seed=3)
    q_rmt = q.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4)
    k_nc = noncontiguous(k)
    v_one = v[:1].clone()
    v_b = v_one.expand(B, -1, -1, -1, -1)  # one batch element broadcast over B (stride 0)
    assert not q_rmt.is_contiguous() and k_nc.stride(-1) == 2 and v_b.stride(0) == 0
    lg = torch.log(gamma).float()
    res = ops().masa_cpu_fwd(q_rmt, k_nc, v_b, lg, d ** -0.5, decomposed)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v_b, lg)]
    want = dense_passes(*leaves, d ** -0.5, decomposed)
    assert_close(res[0], want[0], F32, "out")
    dout = noncontiguous(torch.randn_like(res[0]))
    got = ops().masa_cpu_bwd(dout, q_rmt, k_nc, v_b, lg, *res, d ** -0.5, decomposed)
    wgrads = torch.autograd.grad(want[0], leaves, dout.double())
    for name, g, w in zip(("dq", "dk", "dv", "dlog_gamma"), got, wgrads):
        close_grad(g, w, F32, name)
    # through the public op (autograd sums dv over the broadcast batch)
    ql, kl, vl = (t.detach().requires_grad_() for t in (q_rmt, k_nc, v_one))
    out = vitattn.masa(ql, kl, vl.expand(B, -1, -1, -1, -1), gamma, decomposed=decomposed, backend="cpu")
    assert_close(out, want[0], F32, "public out")
    g = torch.autograd.grad(out, (ql, kl, vl), dout)
    close_grad(g[2], wgrads[2].sum(0, keepdim=True), F32, "dv summed over the broadcast")


@pytest.fixture
def junk_filled_allocations():
    """Every CPU allocation, in C++ too, starts filled with junk (NaN for fp32) while active:
    c10's own debugging flag, so an output or scratch element a kernel forgets shows up."""
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    flag = ctypes.c_bool.in_dll(lib, "FLAGS_caffe2_cpu_allocator_do_junk_fill")
    old = flag.value
    flag.value = True
    assert torch.isnan(torch.empty(64)).all(), "the allocator's junk fill is not in effect"
    yield
    flag.value = old


@pytest.mark.parametrize("dtype", [F32, F64, F16], ids=str)
@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
def test_poisoned_buffers_are_fully_overwritten(decomposed, dtype, junk_filled_allocations):
    q, k, v, gamma = make(2, 2, 5, 9, 20, 12, dtype=dtype, seed=4)
    lg = torch.log(gamma).to(acc(dtype))
    res = ops().masa_cpu_fwd(q, k, v, lg, 0.3, decomposed)
    dout = torch.randn(res[0].shape, dtype=F64, generator=torch.Generator().manual_seed(2)).to(dtype)
    grads = ops().masa_cpu_bwd(dout, q, k, v, lg, *res, 0.3, decomposed)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, lg)]
    want = dense_passes(*leaves, 0.3, decomposed)
    for name, t in zip(("out", "v_mid", "lse_w", "lse_h"), res):
        assert torch.isfinite(t).all(), name
    assert_close(res[0], want[0], dtype, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dlog_gamma"), grads, torch.autograd.grad(want[0], leaves, dout.double())):
        assert torch.isfinite(g).all(), name
        close_grad(g, w, dtype, name)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
def test_large_logits_and_tiny_gamma(decomposed, dtype):
    """|q|, |k| ~ 30 (logits ~ 1e4, softmax nearly one-hot) with gamma = 1e-6 (decay ~ -14 per
    step): finite, and within the usual tolerances of the fp64 reference."""
    q, k, v, _ = make(1, 2, 5, 7, 16, 8, dtype=dtype, mag=30.0, seed=5)
    gamma = torch.tensor([1e-6, 0.9], dtype=F32, requires_grad=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = vitattn.masa(*leaves, gamma, decomposed=decomposed, scale=1.0, backend="cpu")
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, gamma)]
    want = reference.masa(*ref_leaves, decomposed=decomposed, scale=1.0)
    assert float((q.double() @ k.double().transpose(-1, -2)).abs().max()) > 5e3  # really exercised
    assert torch.isfinite(out).all()
    assert_close(out, want, dtype, "out")
    dout = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(3)).to(dtype)
    grads = torch.autograd.grad(out, (*leaves, gamma), dout)
    for name, g, w in zip(("dq", "dk", "dv", "dgamma"), grads, torch.autograd.grad(want, ref_leaves, dout.double())):
        assert torch.isfinite(g).all(), name
        close_grad(g, w, dtype, name)


@pytest.mark.parametrize("dtype", [F32, F16], ids=str)
@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
def test_bitwise_identical_with_one_and_two_threads(decomposed, dtype):
    """No atomics, reductions in task order: 1 and 2 threads give the same bits. The full form
    spans two key blocks and several query blocks (and a different query split per thread count)."""
    q, k, v, gamma = make(2, 2, 24, 25, 8, 6, dtype=dtype, seed=6)
    lg = torch.log(gamma).float()
    dout = torch.randn(v.shape, dtype=F64, generator=torch.Generator().manual_seed(4)).to(dtype)

    def run():
        res = ops().masa_cpu_fwd(q, k, v, lg, 0.4, decomposed)
        return (*res, *ops().masa_cpu_bwd(dout, q, k, v, lg, *res, 0.4, decomposed))

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(old)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"result {i} differs between 1 and 2 threads"


def test_default_instruction_set_copy():
    """The DEFAULT (no AVX) copy of the kernels, chosen with ATEN_CPU_CAPABILITY=default."""
    code = textwrap.dedent("""
        import torch, vitattn._C
        from vitattn import reference
        assert vitattn._C.cpu_isa().startswith("default"), vitattn._C.cpu_isa()
        torch.manual_seed(0)
        for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
            for dec in (False, True):
                q, k, v = (torch.randn(1, 2, 7, 9, 12, dtype=dtype) for _ in range(3))
                gamma = torch.tensor([0.7, 0.95], dtype=torch.float64)
                lg = gamma.log().to(dtype)
                res = torch.ops.vitattn_C.masa_cpu_fwd(q, k, v, lg, 0.3, dec)
                leaves = [t.detach().double().requires_grad_() for t in (q, k, v, gamma)]
                want = reference.masa(*leaves, decomposed=dec, scale=0.3)
                torch.testing.assert_close(res[0].double(), want, atol=tol, rtol=tol)
                dout = torch.randn_like(res[0])
                got = torch.ops.vitattn_C.masa_cpu_bwd(dout, q, k, v, lg, *res, 0.3, dec)
                wg = torch.autograd.grad(want, leaves, dout.double())
                for g, w in zip(got[:3], wg[:3]):
                    torch.testing.assert_close(g.double(), w, atol=tol * 10, rtol=tol * 10)
                torch.testing.assert_close(got[3].double() / gamma, wg[3], atol=tol * 100, rtol=tol * 10)
        print("OK")
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("gamma,mag,scale", [(1.0, 1.0, None), (1e-6, 1.0, None), (0.9, 6.0, 2.0)])
@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
def test_numerical_stability(gamma, mag, scale, decomposed):
    """gamma = 1 (no decay), a vanishing gamma (logits down to -1e3) and very peaked logits."""
    q, k, v, _ = make(1, 2, 8, 9, 16, 16, dtype=F32, mag=mag, seed=5)
    out = vitattn.masa(q, k, v, gamma, decomposed=decomposed, scale=scale, backend="cpu")
    want = reference.masa(q.double(), k.double(), v.double(), gamma, decomposed=decomposed, scale=scale)
    assert torch.isfinite(out).all()
    assert_close(out, want, F32, "out")


@pytest.mark.parametrize("decomposed", [False, True], ids=["full", "decomposed"])
def test_memory_grows_linearly(decomposed):
    """A 64 x 64 grid (N = 4096): an N x N fp32 tensor would be 64 MiB; the kernels' is O(N)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from common import peak_memory_mb

    q, k, v, gamma = make(1, 1, 64, 64, 8, 8, dtype=F32, seed=6)
    lg = torch.log(gamma).float()
    fwd = lambda: ops().masa_cpu_fwd(q, k, v, lg, 0.3, decomposed)
    res = fwd()  # warm up allocator and thread pool
    bwd = lambda: ops().masa_cpu_bwd(v, q, k, v, lg, *res, 0.3, decomposed)
    bwd()
    peaks = [peak_memory_mb(f, torch.device("cpu")) for f in (fwd, bwd)]
    if peaks[0] is None:
        pytest.skip("no /proc peak-RSS reset on this platform")
    assert peaks[0] < 16 and peaks[1] < 16, f"forward / backward used {peaks} MiB extra"


def test_compile_fullgraph_and_export():
    q, k, v, gamma = make(1, 2, 5, 6, 8, 8, dtype=F32, seed=8)
    fn = lambda q, k, v: vitattn.masa(q, k, v, 0.8, decomposed=True, backend="cpu")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    assert_close(out, reference.masa(q.double(), k.double(), v.double(), 0.8, decomposed=True), F32, "compiled")
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)

    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return vitattn.masa(q, k, v, 0.8, backend="cpu")

    ep = torch.export.export(M(), (q, k, v))
    assert_close(ep.module()(q, k, v), reference.masa(q.double(), k.double(), v.double(), 0.8), F32, "exported")


# ---------------------------------------------------------------- dispatch and bad input


def test_cpu_backend_refuses_other_devices():
    q, k, v, _ = make(1, 2, 4, 4, 8, 8, dtype=F32)
    with pytest.raises(BackendUnavailableError, match="cpu"):
        vitattn.masa(q.to("meta"), k.to("meta"), v.to("meta"), 0.9, backend="cpu")


def test_bad_input_names_the_argument():
    q, k, v, gamma = make(1, 2, 4, 5, 8, 8, dtype=F32)
    with pytest.raises(TypeError, match="q"):
        vitattn.masa(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), gamma, backend="cpu")
    with pytest.raises(ValueError, match="k"):
        vitattn.masa(q, k[..., :4], v, gamma, backend="cpu")
    with pytest.raises(TypeError, match="v"):
        vitattn.masa(q, k, v.double(), gamma, backend="cpu")
    with pytest.raises(ValueError, match="gamma"):
        vitattn.masa(q, k, v, 1.5, backend="cpu")
    # the entry points check their own arguments too (they can be called directly)
    lg = torch.log(gamma).float()
    fwd, bwd = ops().masa_cpu_fwd, ops().masa_cpu_bwd
    with pytest.raises(RuntimeError, match="log_gamma"):
        fwd(q, k, v, lg[:1], 0.5, False)
    with pytest.raises(RuntimeError, match="k must have"):
        fwd(q, k[:, :1], v, lg, 0.5, False)
    with pytest.raises(RuntimeError, match="v must have"):
        fwd(q, k, v[:, :, :2], lg, 0.5, True)
    with pytest.raises(RuntimeError, match="5-D"):
        fwd(q[0], k[0], v[0], lg, 0.5, False)
    with pytest.raises(RuntimeError, match="share a dtype"):
        fwd(q, k.double(), v, lg, 0.5, False)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        fwd(q.to(torch.int32), k.to(torch.int32), v.to(torch.int32), lg, 0.5, False)
    with pytest.raises(RuntimeError, match="empty"):
        fwd(q[:0], k[:0], v[:0], lg, 0.5, False)
    out, v_mid, lse_w, lse_h = fwd(q, k, v, lg, 0.5, True)
    with pytest.raises(RuntimeError, match="lse_h"):
        bwd(out, q, k, v, lg, out, v_mid, lse_w, lse_h[..., :1], 0.5, True)
    with pytest.raises(RuntimeError, match="lse_w"):
        bwd(out, q, k, v, lg, out, v_mid, lse_w.double(), lse_h, 0.5, True)
    with pytest.raises(RuntimeError, match="v_mid"):
        bwd(out, q, k, v, lg, out, v_mid[:0], lse_w, lse_h, 0.5, True)
    with pytest.raises(RuntimeError, match="dout"):
        bwd(out[..., :3], q, k, v, lg, out, v_mid, lse_w, lse_h, 0.5, True)


def test_missing_extension_stub_raises_import_error(monkeypatch):
    import vitattn._extension as ext

    monkeypatch.setattr(ext, "_module", None)
    monkeypatch.setattr(ext, "_error", "it was not built (test)")
    with pytest.raises(ImportError, match="not built"):
        ext.C.cpu_isa
    with pytest.raises(ImportError, match="not built"):
        ext.ops()
    assert "missing" in repr(ext.C) and not ext.available()


def test_package_works_without_the_extension():
    """With vitattn._C unimportable: torch backend still runs, "cpu" is refused with the reason."""
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
