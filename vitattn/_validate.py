"""Argument checks shared by the public ops. Every message names the argument."""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Data-dependent checks (value ranges, permutation validity) read tensor values and so
# synchronise with the GPU. They run in eager mode unless VITATTN_CHECK_VALUES=0; they
# are skipped while torch.compile traces (values are unknown there).
_CHECK_VALUES = os.environ.get("VITATTN_CHECK_VALUES", "1") not in ("0", "", "false", "False")


def set_value_checks(enabled: bool) -> None:
    """Turn the data-dependent argument checks on or off (default on; env VITATTN_CHECK_VALUES)."""
    global _CHECK_VALUES
    _CHECK_VALUES = bool(enabled)


def value_checks_enabled() -> bool:
    if not _CHECK_VALUES:
        return False
    try:
        return not torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return True


def tensor(op: str, name: str, x, ndim: Optional[int] = None, *, min_ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def floating(op: str, name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )


def same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; they must match")


def same_device(op: str, ref_name: str, ref: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{op}: {name} is on {x.device} but {ref_name} is on {ref.device}; they must match")


def shape_eq(op: str, name: str, got: Sequence[int], want: Sequence[int], what: str = "") -> None:
    if tuple(got) != tuple(want):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{op}: {name} must have shape {tuple(want)}{extra}, got {tuple(got)}")


def positive_float(op: str, name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{op}: {name} must be a number, got {type(x).__name__}")
    x = float(x)
    if not x > 0 or x != x or x == float("inf"):
        raise ValueError(f"{op}: {name} must be a finite number > 0, got {x}")
    return x


def positive_int(op: str, name: str, x, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(x).__name__}")
    if x < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {x}")
    return x


def scale_arg(op: str, scale, d: int) -> float:
    if scale is None:
        return float(d) ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return scale


def one_of(op: str, name: str, x, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    if x not in allowed:
        raise ValueError(f"{op}: {name} must be one of {allowed}, got {x!r}")
