"""Helpers shared by the op tests."""

from __future__ import annotations

import torch

import vitattn
from vitattn import _triton

HAS_CUDA = torch.cuda.is_available()
# Triton is testable on CUDA tensors, or on CPU tensors under the interpreter.
TRITON_DEVICE = "cuda" if HAS_CUDA else ("cpu" if _triton.interpreting() else None)

# (atol, rtol) for comparing against an fp64 reference
TOL = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


def backends_for(device: str):
    """Backends to test on a device: every registered one that can run there by name."""
    out = ["torch"]
    if TRITON_DEVICE == device:
        out.append("triton")
    return out


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, non-contiguous storage (a strided view into a larger buffer)."""
    big = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)
    big.normal_()
    big[..., 0] = t
    return big[..., 0].requires_grad_(t.requires_grad)


def assert_close(got, want, dtype, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
