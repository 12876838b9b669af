"""The models' linear layers: ``linear`` and ``Linear``, F.linear with the GEMM chosen per machine.

Why: on CPUs where MKL does not run its AVX-512 code (it picks its code path by CPU vendor),
F.linear's fp32 sgemm reaches a fraction of the core's FMA limit, while oneDNN, which picks
its code path by instruction set, reaches most of it. Measured on the 2-core AMD EPYC (Zen 5,
AVX-512) this project develops on, one thread, the token-projection shapes of RMT-T
(M = 25088 tokens, K x N = 64 x 64 ... 768 x 256): F.linear 45-115 GFLOP/s, oneDNN 156-254
GFLOP/s against a measured FMA peak of about 270; below about 2^20 multiply-adds oneDNN's
fixed cost (~10 us a call) loses. On a Zen 3 EPYC with AVX2 (MKL's AVX2 sgemm) oneDNN is no
better: forward 1.09x F.linear (geometric mean, 0.97-1.49x), forward+backward 0.88x, so F.linear
stays there (benchmarks/results/bench_linear.md has the table and its command).

Which GEMM runs (``cpu_linear_choice()`` says it, with the reason):

* ``VITATTN_CPU_LINEAR=aten``: always F.linear.
* ``VITATTN_CPU_LINEAR=onednn``: oneDNN for every eligible call; raises if this build of
  PyTorch has no oneDNN linear.
* ``auto`` (default): oneDNN where it was measured faster -- an x86 CPU with AVX-512 whose
  vendor is not Intel (MKL's non-AVX-512 path) -- and F.linear elsewhere.

An eligible call: CPU tensors, all float32, no CPU autocast, at least 2^20 multiply-adds, and
plain eager mode (not under torch.compile, torch.export, a dispatch mode, a functorch transform
or a JIT trace, and no tensor subclass but nn.Parameter). Every other call is F.linear, so
compiled and exported graphs hold an ordinary ``aten.linear``. The oneDNN path has its own
backward (both GEMMs through oneDNN, the bias gradient a sum); it is once differentiable,
which every model's training needs; fp64 gradchecks run F.linear.

``Linear`` is an ``nn.Linear`` (same parameters, state_dict, init and isinstance) whose
forward calls ``linear``.
"""

from __future__ import annotations

import functools
import platform
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import _env
from ..ops._library import plain_eager

__all__ = ["Linear", "linear", "cpu_linear_choice"]

# below this many multiply-adds (M K N) oneDNN's fixed per-call cost outweighs its faster GEMM
MIN_MACS = 1 << 20


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def _onednn_missing() -> Optional[str]:
    """Why this build cannot run the oneDNN linear, or None when it can."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this PyTorch build has no torch.ops.mkldnn._linear_pointwise"
    return None


@functools.lru_cache(maxsize=None)
def _auto_choice() -> Tuple[str, str]:
    missing = _onednn_missing()
    if missing:
        return "aten", missing
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "aten", f"oneDNN was not measured faster on {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return "aten", f"oneDNN was measured faster only with AVX-512 (this CPU: {torch.backends.cpu.get_cpu_capability()})"
    vendor = _cpu_vendor()
    if vendor in ("GenuineIntel", ""):
        return "aten", f"MKL runs its AVX-512 sgemm on this CPU (vendor {vendor or 'unknown'})"
    return "onednn", f"AVX-512 CPU of vendor {vendor}: MKL takes its non-AVX-512 sgemm, oneDNN does not"


def cpu_linear_choice() -> Tuple[str, str]:
    """("onednn" or "aten", why) for eligible fp32 CPU calls, from VITATTN_CPU_LINEAR and the machine."""
    setting = _env.cpu_linear()
    if setting == "aten":
        return "aten", "VITATTN_CPU_LINEAR=aten"
    if setting == "onednn":
        missing = _onednn_missing()
        if missing:
            raise RuntimeError(f"VITATTN_CPU_LINEAR=onednn cannot run: {missing}")
        return "onednn", "VITATTN_CPU_LINEAR=onednn"
    return _auto_choice()


def _onednn_mm(x2d: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x2d @ weight.T (+ bias) through oneDNN; it takes strided operands (transposed views too)."""
    return torch.ops.mkldnn._linear_pointwise(x2d, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x2d, weight)
        return _onednn_mm(x2d, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x2d, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn_mm(dy, weight.t().contiguous(), None)  # dy @ W
        if ctx.needs_input_grad[1]:
            dw = _onednn_mm(dy.t(), x2d.t(), None)  # dy^T @ x
        if ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dw, db


def _eligible(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if bias is not None and bias.dtype != torch.float32:
        return False
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return False  # F.linear raises its own error for a mismatch
    if x.numel() * weight.shape[0] < MIN_MACS:
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return plain_eager((x, weight, bias))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias), through oneDNN where cpu_linear_choice() picks it (module docstring)."""
    if not _eligible(x, weight, bias) or cpu_linear_choice()[0] != "onednn":
        return F.linear(x, weight, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    out = _OneDNNLinear.apply(x2d, weight, bias) if needs_grad else _onednn_mm(x2d, weight, bias)
    return out.view(*lead, weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose forward is :func:`linear` (the same parameters, state_dict and init)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
