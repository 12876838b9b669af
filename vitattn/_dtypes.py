"""Dtype helpers shared by every op: the accumulation dtype and autocast."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)



def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_inputs(*tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """Under torch.autocast, the floating inputs in the autocast dtype (custom ops are not cast
    by autocast itself); otherwise the inputs unchanged.

    Applied first in every public op, before validation: under autocast, mixed input dtypes
    (an fp32 parameter next to a bf16 activation, a float64 buffer) are expected and the op
    runs in the autocast dtype. Non-tensors and integer tensors pass through (validation
    still rejects what it must).
    torch.library.register_autocast does not fit: it casts to a dtype fixed at registration,
    while autocast's dtype is chosen by the caller.
    """
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    dev = first.device.type
    if dev not in ("cuda", "cpu") or not torch.is_autocast_enabled(dev):
        return tensors
    low = torch.get_autocast_dtype(dev)
    return tuple(t.to(low) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
