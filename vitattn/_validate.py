"""Argument checks shared by the public ops. Every message names the argument."""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import _env

from ._dtypes import FLOAT_DTYPES  # noqa: F401  (re-exported for the ops' checks)

# Checks that read tensor values (gamma in (0, 1], permutations, marginals):
#   CPU tensors: checked on the host, raising ValueError with the offending values.
#   CUDA tensors: by default checked ON THE DEVICE (torch._assert_async): no host
#     synchronisation, so CUDA-graph capture and asynchronous execution are kept; a bad value
#     fails as a device-side assertion at the next synchronisation. set_value_checks("eager")
#     checks CUDA tensors on the host instead (one synchronisation per new tensor; each
#     tensor is checked once and remembered until it is modified).
#   set_value_checks(False) / VITATTN_CHECK_VALUES=0 turns them off. They are skipped while
#   torch.compile or torch.export traces (values are unknown there).
_MODE = "default" if _env.check_values() else "off"
_SEEN = WeakIdKeyDictionary()  # tensor -> {check name: tensor._version when it passed}


def set_value_checks(enabled) -> None:
    """Value checks: True (default: host on CPU, device-side on CUDA), "eager" (host
    everywhere, one sync per new CUDA tensor) or False (off); env VITATTN_CHECK_VALUES."""
    global _MODE
    if enabled == "eager":
        _MODE = "eager"
    elif isinstance(enabled, bool):
        _MODE = "default" if enabled else "off"
    else:
        raise ValueError(f"set_value_checks: enabled must be True, False or 'eager', got {enabled!r}")


def value_checks_enabled() -> bool:
    return _MODE != "off" and not (torch.compiler.is_compiling() or torch.compiler.is_exporting())


def _remembered(t: torch.Tensor) -> bool:
    # inference tensors (made under torch.inference_mode) have no version counter, so a
    # passed check cannot be tied to their contents: they are checked on every call
    return not t.is_inference()


def trust(t: torch.Tensor, check: str) -> torch.Tensor:
    """Record that t passes `check` (for tensors vitattn made itself, e.g. random_permutation)."""
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()  # no checks run there
    if not tracing and _remembered(t):
        _SEEN.setdefault(t, {})[check] = t._version
    return t


def is_trusted(t: torch.Tensor, check: str) -> bool:
    if not _remembered(t):
        return False
    seen = _SEEN.get(t)
    return seen is not None and seen.get(check) == t._version


def check_values(op: str, check: str, t: torch.Tensor, bad: Callable[[torch.Tensor], torch.Tensor],
                 message: Callable[[torch.Tensor], str], *, always_on_cpu: bool = False) -> None:
    """Raise ValueError(message(t)) when bad(t) (a bool tensor) has a True element.

    Runs per the value-check mode (see above) and at most once per tensor version;
    always_on_cpu: also with value checks off on CPU tensors (where a bad value would make a
    kernel read out of bounds)."""
    if not value_checks_enabled():
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
        if not (always_on_cpu and t.device.type == "cpu" and not tracing):
            return
    if is_trusted(t, check):
        return
    with torch.no_grad():
        if t.device.type == "cpu" or _MODE == "eager":
            if bool(bad(t).any()):
                raise ValueError(message(t))
        else:
            torch._assert_async(bad(t).any().logical_not(), f"{op}: {check} failed (see vitattn.set_value_checks('eager') "
                                               "for a host-side message)")
            return  # a device-side check proves nothing yet: do not remember it
    if _remembered(t):
        _SEEN.setdefault(t, {})[check] = t._version


def tensor(op: str, name: str, x, ndim: Optional[int] = None, *, min_ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def attention_inputs(op: str, q, k, v, layout: str) -> None:
    """q, k (..., d) and v (..., dv) of one attention op: tensors of len(layout) dims, one
    floating dtype and device, k shaped like q, v like q but for its last dim, d >= 1.
    layout names the dims for messages, e.g. "B, heads, N, d"."""
    ndim = len(layout.split(","))
    tensor(op, "q", q, ndim)
    tensor(op, "k", k, ndim)
    tensor(op, "v", v, ndim)
    floating(op, "q", q)
    same_dtype(op, "q", q, k=k, v=v)
    same_device(op, "q", q, k=k, v=v)
    shape_eq(op, "k", k.shape, q.shape, f"it must match q's ({layout})")
    if tuple(v.shape[:-1]) != tuple(q.shape[:-1]):
        raise ValueError(f"{op}: v must have shape {tuple(q.shape[:-1]) + ('dv',)} to match q, got {tuple(v.shape)}")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: q and k need a feature dim d >= 1 (the default scale is d ** -0.5), "
                         f"got shape {tuple(q.shape)}")


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
