"""Backend selection shared by every op.

Each op owns one :class:`Dispatcher`. Backends are registered in order of
preference together with a *can-run check*: a function of the call's context
that returns ``None`` when the backend can serve the call, or a sentence that
says why it cannot. ``backend="auto"`` takes the first backend whose check
passes; an explicitly named backend that cannot run raises with its reason.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

log = logging.getLogger("vitattn.dispatch")

# ctx is a plain dict built by the op (devices, dtypes, sizes, ...).
# ``auto`` tells the check whether it is judging an automatic choice: some
# backends (the Triton interpreter) can run but should never be picked for speed.
Check = Callable[[Dict[str, Any], bool], Optional[str]]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@dataclass
class _Backend:
    name: str
    check: Check
    rank: int
    impl: Any = None


class Dispatcher:
    def __init__(self, op: str, known: Tuple[str, ...]):
        self.op = op
        # every name the user may pass, registered or not (e.g. "cuda" without the extension)
        self.known = tuple(known)
        self._backends: Dict[str, _Backend] = {}

    def register(self, name: str, check: Check, rank: int, impl: Any = None) -> None:
        """Register (or replace) a backend; lower rank is preferred by "auto".

        impl is whatever the op calls once this backend is chosen (see each op module).
        """
        if name not in self.known:
            raise ValueError(f"{self.op}: backend {name!r} is not one of {self.known}")
        self._backends[name] = _Backend(name, check, rank, impl)

    def register_impl(self, name: str, impl: Any, check: Check, rank: int) -> None:
        """register() in the argument order the op modules use: plug in a backend's implementation."""
        self.register(name, check, rank, impl)

    def impl(self, name: str) -> Any:
        return self._backends[name].impl

    def _ordered(self) -> List[_Backend]:
        return sorted(self._backends.values(), key=lambda b: b.rank)

    def reason(self, name: str, ctx: Dict[str, Any], auto: bool = False) -> Optional[str]:
        b = self._backends.get(name)
        if b is None:
            return _missing_reason(name)
        try:
            return b.check(ctx, auto)
        except Exception as exc:  # a broken check must not hide the other backends
            return f"its can-run check failed: {exc!r}"

    def explain(self, ctx: Dict[str, Any]) -> List[Tuple[str, Optional[str]]]:
        """Every known backend in preference order with None (can run) or the reason it cannot."""
        seen = [(b.name, self.reason(b.name, ctx, auto=True)) for b in self._ordered()]
        names = {n for n, _ in seen}
        seen += [(n, _missing_reason(n)) for n in self.known if n not in names and n != "auto"]
        return seen

    def explain_registered(self) -> List[Tuple[str, int]]:
        """Registered backends and their ranks, in preference order."""
        return [(b.name, b.rank) for b in self._ordered()]

    def choose(self, requested: Any, ctx: Dict[str, Any]) -> str:
        if not isinstance(requested, str):
            raise TypeError(f"{self.op}: backend must be a string, got {type(requested).__name__}")
        forced = os.environ.get("VITATTN_BACKEND")
        if requested == "auto" and forced:
            requested = forced
        if requested not in self.known:
            raise ValueError(
                f"{self.op}: unknown backend {requested!r}; expected one of {self.known}"
            )
        if requested != "auto":
            why = self.reason(requested, ctx, auto=False)
            if why is not None:
                raise BackendUnavailableError(f"{self.op}: backend {requested!r} cannot run: {why}")
            return requested
        reasons = []
        for b in self._ordered():
            why = self.reason(b.name, ctx, auto=True)
            if why is None:
                if reasons and not _compiling() and log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: auto chose %r after skipping %s", self.op, b.name, "; ".join(reasons))
                return b.name
            reasons.append(f"{b.name}: {why}")
        raise BackendUnavailableError(f"{self.op}: no backend can run this call: " + "; ".join(reasons))


def _compiling() -> bool:
    # logging calls break torch.compile graphs; the choice is traced, not logged, there
    import torch

    return torch.compiler.is_compiling()


_MISSING: Dict[str, str] = {}


def set_missing_reason(name: str, why: str) -> None:
    """Record why a backend never registered (e.g. the compiled extension failed to import)."""
    _MISSING[name] = why


def _missing_reason(name: str) -> str:
    return _MISSING.get(name, "it is not built into this installation")


# ---------------------------------------------------------------- common checks

def triton_reason(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    """Shared can-run check for Triton kernels: CUDA tensors, or CPU tensors under the interpreter."""
    from . import _triton

    if not _triton.available():
        return _triton.why_unavailable()
    dev = ctx["device"]
    if dev.type == "cuda":
        if ctx["dtype"] == _float64():
            return "float64 is supported by the Triton kernels only under TRITON_INTERPRET=1"
        return None
    if dev.type == "cpu":
        if not _triton.interpreting():
            return ("the tensors are on the CPU and TRITON_INTERPRET=1 was not set before "
                    "vitattn was imported (Triton kernels need CUDA tensors otherwise)")
        if auto:
            return "the Triton interpreter is a testing tool, never chosen automatically"
        return None
    return f"Triton kernels do not run on device type {dev.type!r}"


def triton_head_dims_reason(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    """triton_reason plus the head-dim limit (d, dv <= 256) of the attention kernels."""
    why = triton_reason(ctx, auto)
    if why is None and max(ctx["d"], ctx["dv"]) > 256:
        why = f"head dims up to 256 are supported, got d={ctx['d']}, dv={ctx['dv']}"
    return why


def _float64():
    import torch

    return torch.float64


def torch_reason(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    return None
