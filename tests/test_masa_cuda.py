"""MaSA "cuda" backend (csrc/cuda kernels in vitattn._C) against the dense reference.

Skipped without a CUDA device or without the extension's CUDA kernels. Covers both kernel
families (on-chip for problems of <= 128 tokens, flash otherwise), every head-dim width
class (accumulator counts 1, 2, 4, 8 per lane), fp32/fp16/bf16 values and gradients,
strided inputs, determinism, torch.compile and bad input.
"""

import pytest
import torch

import vitattn
from vitattn import reference
from vitattn._dispatch import BackendUnavailableError

import vitattn._extension as ext
from vitattn.ops.masa import torch_impl

from _util import assert_close, noncontiguous


class _CudaPasses:
    """The CUDA kernels' one-pass entries (vitattn._C pybind; axis 0 full, 1 along W, 2 along H)."""

    _AXIS = {None: 0, "w": 1, "h": 2}

    def pass_fwd(self, q, k, v, log_gamma, scale, axis):
        return ext.C.masa_cuda_fwd(q, k, v, log_gamma, float(scale), self._AXIS[axis])

    def pass_bwd(self, dout, q, k, v, out, lse, log_gamma, scale, axis):
        return ext.C.masa_cuda_bwd(dout, q, k, v, out, lse, log_gamma, float(scale), self._AXIS[axis])


_cuda = _CudaPasses()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not ext.has_cuda(), reason="vitattn._C was built without its CUDA kernels: "
                       + (ext.status() if ext.available() else ext.why_unavailable())),
]

DEV = "cuda"
GRAD_TOL = {torch.float32: (1e-3, 1e-3), torch.float16: (3e-2, 3e-2), torch.bfloat16: (1e-1, 1e-1)}


def make(B, heads, H, W, d, dv, dtype=torch.float32, mag=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64) * mag).to(DEV, dtype)
    k = (torch.randn(B, heads, H, W, d, generator=g, dtype=torch.float64) * mag).to(DEV, dtype)
    v = torch.randn(B, heads, H, W, dv, generator=g, dtype=torch.float64).to(DEV, dtype)
    gamma = (0.5 + 0.49 * torch.rand(heads, generator=g, dtype=torch.float64)).to(DEV)
    return q, k, v, gamma


def ref_with_grads(q, k, v, gamma, dout, **kw):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, gamma)]
    out = reference.masa(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, dout.double())


def close(got, want, tol, what):
    torch.testing.assert_close(got.double(), want.double(), atol=tol[0], rtol=tol[1], msg=lambda m: f"{what}: {m}")


SHAPES = [
    (2, 3, 5, 7, 8, 8),      # on-chip kernels in every pass
    (1, 2, 13, 11, 40, 24),  # full form N = 143: flash, 2 accumulators per lane, dv != d
    (1, 2, 3, 150, 16, 16),  # rows of 150 tokens: the W pass takes the flash kernels (1 per lane)
    (1, 1, 13, 12, 100, 72),  # full form N = 156 > 128: flash, 4 accumulators per lane
    (1, 1, 11, 13, 256, 200),  # widest head dims: flash with 8 accumulators per lane, > 48 KiB smem
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_and_gradients_vs_reference(shape, decomposed, dtype):
    q, k, v, gamma = make(*shape, dtype=dtype, seed=hash((shape, decomposed)) % 1000)
    gamma = gamma.requires_grad_()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = vitattn.masa(qr, kr, vr, gamma, decomposed=decomposed, backend="cuda")
    assert out.dtype == dtype and out.shape == v.shape and out.is_contiguous()
    dout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7)).to(DEV, dtype)
    grads = torch.autograd.grad(out, (qr, kr, vr, gamma), dout)
    want, wgrads = ref_with_grads(q, k, v, gamma, dout, decomposed=decomposed)
    assert_close(out, want, dtype, "out")
    for name, g, w in zip(("dq", "dk", "dv", "dgamma"), grads, wgrads):
        close(g, w, GRAD_TOL[dtype], name)


@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("H,W", [(6, 5), (12, 13)])
def test_strided_inputs(decomposed, H, W):
    q, k, v, gamma = make(2, 3, H, W, 12, 7, seed=3)
    q_nc = noncontiguous(q).requires_grad_()
    k_perm = k.permute(0, 2, 3, 1, 4).contiguous().permute(0, 3, 1, 2, 4).requires_grad_()
    v_t = v.transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()
    out = vitattn.masa(q_nc, k_perm, v_t, gamma, decomposed=decomposed, backend="cuda")
    dout = noncontiguous(torch.randn_like(out))
    g = torch.autograd.grad(out, (q_nc, k_perm, v_t), dout)
    want, wg = ref_with_grads(q, k, v, gamma, dout, decomposed=decomposed)
    assert_close(out, want, torch.float32, "out")
    for name, a, b in zip(("dq", "dk", "dv"), g, wg):
        close(a, b, GRAD_TOL[torch.float32], name)


@pytest.mark.parametrize("axis", [None, "w", "h"])
def test_raw_pass_matches_torch_backend(axis):
    q, k, v, gamma = make(2, 2, 7, 10, 6, 5, seed=11)
    lg = torch.log(gamma).float()
    out, lse = _cuda.pass_fwd(q, k, v, lg, 0.3, axis)
    out_t, lse_t = torch_impl.pass_fwd(q, k, v, lg, 0.3, axis)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 7, 10)
    assert_close(out, out_t, torch.float32, "out")
    assert_close(lse, lse_t, torch.float32, "lse")
    dout = torch.randn_like(out)
    got = _cuda.pass_bwd(dout, q, k, v, out, lse, lg, 0.3, axis)
    want = torch_impl.pass_bwd(dout, q, k, v, out_t, lse_t, lg, 0.3, axis)
    for name, g, w in zip(("dq", "dk", "dv", "dlog_gamma"), got, want):
        close(g, w, GRAD_TOL[torch.float32], name)


def test_kernel_families():
    assert ext.C.masa_cuda_kernel_family(56, 16, 16, False) == "onchip"
    assert ext.C.masa_cuda_kernel_family(56, 32, 32, True) == "onchip"
    assert ext.C.masa_cuda_kernel_family(196, 32, 32, False) == "flash"


@pytest.mark.parametrize("gamma,mag", [(1.0, 1.0), (1e-6, 1.0), (0.9, 6.0)])
def test_numerical_stability(gamma, mag):
    q, k, v, _ = make(1, 2, 12, 13, 16, 16, mag=mag, seed=5)
    for decomposed in (False, True):
        out = vitattn.masa(q, k, v, gamma, decomposed=decomposed, backend="cuda")
        want = reference.masa(q.double(), k.double(), v.double(), gamma, decomposed=decomposed)
        assert torch.isfinite(out).all()
        assert_close(out, want, torch.float32, "out")


def test_deterministic():
    q, k, v, gamma = make(2, 2, 12, 13, 16, 16, seed=4)
    gamma = gamma.requires_grad_()

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = vitattn.masa(*leaves, gamma, backend="cuda")
        return (out, *torch.autograd.grad(out.square().sum(), (*leaves, gamma)))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_compile_fullgraph():
    q, k, v, _ = make(1, 2, 5, 6, 8, 8, seed=8)
    fn = lambda q, k, v: vitattn.masa(q, k, v, 0.8, decomposed=True, backend="cuda")
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    assert_close(out, reference.masa(q.double(), k.double(), v.double(), 0.8, decomposed=True), torch.float32, "compiled")


def test_unsupported_calls_are_refused_with_a_reason():
    q, k, v, gamma = make(1, 2, 4, 5, 8, 8)
    with pytest.raises(BackendUnavailableError, match="float64"):
        vitattn.masa(q.double(), k.double(), v.double(), gamma, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors"):
        vitattn.masa(q.cpu(), k.cpu(), v.cpu(), gamma.cpu(), backend="cuda")
    qw, kw, vw, _ = make(1, 1, 2, 2, 300, 8)
    with pytest.raises(BackendUnavailableError, match="head dims"):
        vitattn.masa(qw, kw, vw, 0.9, backend="cuda")
    lg = torch.log(gamma).float()
    with pytest.raises(RuntimeError, match="axis"):
        ext.C.masa_cuda_fwd(q, k, v, lg, 0.5, 3)
    with pytest.raises(RuntimeError, match="log_gamma"):
        ext.C.masa_cuda_fwd(q, k, v, lg[:1], 0.5, 0)
