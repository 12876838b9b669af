"""Backend selection shared by every op.

Each op folder (vitattn/ops/<op>/backends.py) lists its backends, each a :class:`Backend`:
a name, a static rank, a *can-run check* ``check(ctx, auto) -> None | reason`` and a
``load()`` that returns the implementation (imported only when the backend is first used,
so ``import vitattn`` does not import Triton). ``ctx`` is a plain
dict the op builds from its arguments (device, dtype, sizes).

``backend="auto"`` walks the backends in preference order and takes the first whose check
passes. The order is the static ranks, except where the op's committed measurements
(vitattn/ops/<op>/measured.json, written by ``benchmarks/bench_<op>.py --update-ranking``)
rank the backends for this device type and shape class. A backend named explicitly that
cannot run raises :class:`BackendUnavailableError` with its reason; an unknown name is a
ValueError. ``VITATTN_BACKEND`` (vitattn/_env.py) overrides "auto".
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from . import _env, _extension, _triton

log = logging.getLogger("vitattn.dispatch")

_AUTO_CACHE_SIZE = 4096  # distinct call signatures remembered per op before starting over

# the public ops, by the names explain(), VITATTN_BACKEND and error messages use
OPS = ("masa", "sinkhorn", "ot_aggregate", "ot_attention", "group_attention", "dynamixer",
       "depthwise_conv2d_nhwc")

Check = Callable[[Dict[str, Any], bool], Optional[str]]


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this call."""


@dataclass
class Backend:
    """One way to run an op. ``check(ctx, auto)`` returns None when it can serve the call, or
    a sentence saying why not (``auto`` is True when judging an automatic choice: some
    backends can run but should not be picked for speed). ``load()`` returns the object the
    op calls (see the contract in the op's backends.py)."""

    name: str
    rank: int
    check: Check
    load: Callable[[], Any]
    _impl: Any = field(default=None, repr=False)

    def impl(self) -> Any:
        if self._impl is None:
            self._impl = self.load()
        return self._impl


class Verdict(NamedTuple):
    backend: str
    can_run: bool
    reason: str


class Explanation:
    """What ``vitattn.explain`` returns: the backends in the order "auto" tries them, each with
    whether it can run the call and why (not). Iterating gives :class:`Verdict` rows;
    printing gives a table; ``chosen`` is what "auto" picks (None if nothing can run)."""

    def __init__(self, op: str, rows: List[Verdict], note: str = ""):
        self.op = op
        self.rows = rows
        self.note = note
        self.chosen = next((r.backend for r in rows if r.can_run), None)

    def __iter__(self) -> Iterator[Verdict]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Verdict:
        return self.rows[i]

    def reasons(self) -> Dict[str, Optional[str]]:
        """{backend: None if it can run, else the reason it cannot}."""
        return {r.backend: None if r.can_run else r.reason for r in self.rows}

    def __str__(self) -> str:
        width = max([len("backend")] + [len(r.backend) for r in self.rows])
        lines = [f"{self.op}: backends in the order 'auto' tries them"
                 + (f" ({self.note})" if self.note else ""),
                 f"  {'backend':<{width}}  can run  reason"]
        for r in self.rows:
            mark = "yes" if r.can_run else "no"
            star = "  <- auto" if r.backend == self.chosen else ""
            lines.append(f"  {r.backend:<{width}}  {mark:<7}  {r.reason}{star}")
        return "\n".join(lines)

    __repr__ = __str__


class Dispatcher:
    """The backends of one op (one dispatcher may serve several public functions)."""

    def __init__(self, op: str, backends: Sequence[Backend], names: Sequence[str],
                 shape_class: Optional[Callable[[Dict[str, Any]], str]] = None,
                 measured_path: Optional[str] = None):
        self.op = op
        self.backends: Dict[str, Backend] = {b.name: b for b in backends}
        # every name backend= accepts, "auto" first (a backend may be unavailable here)
        self.names = tuple(names)
        missing = set(self.backends) - set(self.names)
        if missing:
            raise ValueError(f"{op}: backends {sorted(missing)} are not among the accepted names {self.names}")
        self.shape_class = shape_class
        self._measured_path = measured_path
        # read now, not while torch.compile traces a call (file access breaks its graph)
        self._measured: Dict[str, Any] = {}
        if measured_path and os.path.exists(measured_path):
            with open(measured_path) as f:
                self._measured = json.load(f)
        self._override_cache: Dict[Tuple[str, str], Optional[str]] = {}
        self._auto_cache: Dict[Any, str] = {}  # (op, ctx items) -> the backend "auto" chose
        self._static = sorted(self.backends.values(), key=lambda b: b.rank)

    # ------------------------------------------------------------ ordering

    def measured(self) -> Dict[str, Any]:
        """The committed measurements ({device type: {shape class: [backends, fastest first]}})."""
        return self._measured

    def ordered(self, ctx: Dict[str, Any]) -> List[Backend]:
        """Backends in the order "auto" tries them for this call."""
        if self.shape_class is None or not self._measured:
            return self._static
        table = self._measured.get(ctx["device"].type)
        if not table:
            return self._static
        ranked = table.get(self.shape_class(ctx))
        if not ranked:
            return self._static
        first = [self.backends[n] for n in ranked if n in self.backends]
        return first + [b for b in self._static if b.name not in ranked]

    # ------------------------------------------------------------ checks

    def reason(self, name: str, ctx: Dict[str, Any], auto: bool = False) -> Optional[str]:
        b = self.backends.get(name)
        if b is None:
            return "it is not part of this installation"
        try:
            return b.check(ctx, auto)
        except Exception as exc:  # a broken check must not hide the other backends
            return f"its can-run check failed: {exc!r}"

    def explain(self, ctx: Dict[str, Any], op: Optional[str] = None) -> Explanation:
        op = op or self.op
        rows = []
        for b in self.ordered(ctx):
            why = self.reason(b.name, ctx, auto=True)
            rows.append(Verdict(b.name, why is None, "can run" if why is None else why))
        shown = {r.backend for r in rows}
        rows += [Verdict(n, False, "it is not part of this installation")
                 for n in self.names if n != "auto" and n not in shown]
        override, _ = self._override(op)
        note = f"VITATTN_BACKEND selects {override!r}" if override else ""
        return Explanation(op, rows, note)

    # ------------------------------------------------------------ choice

    def _override(self, op: str) -> Tuple[Optional[str], Optional[str]]:
        raw = _env.text("VITATTN_BACKEND")
        key = (op, raw)
        if key not in self._override_cache:
            chosen, warning = _env.backend_override(op, self.names, OPS)
            if warning:
                warnings.warn(warning, stacklevel=4)
            self._override_cache[key] = chosen
        return self._override_cache[key], None

    def choose(self, requested: Any, ctx: Dict[str, Any], op: Optional[str] = None) -> str:
        """The backend that runs this call (see the module docstring)."""
        op = op or self.op
        if not isinstance(requested, str):
            raise TypeError(f"{op}: backend must be a string, got {type(requested).__name__}")
        via_env = False
        if requested == "auto":
            forced, _ = self._override(op)
            if forced is not None:
                requested, via_env = forced, True
        if requested not in self.names:
            raise ValueError(f"{op}: unknown backend {requested!r}; backend must be one of {self.names}")
        if requested != "auto":
            why = self.reason(requested, ctx, auto=False)
            if why is not None:
                src = " (chosen by the environment variable VITATTN_BACKEND)" if via_env else ""
                raise BackendUnavailableError(f"{op}: backend {requested!r}{src} cannot run: {why}")
            return requested
        # the walk depends on ctx alone (checks are pure; the environment was read above): a
        # model calls an op with a few shapes over and over, so the answer is kept per ctx
        key = None
        if not _compiling():
            try:
                key = (op, tuple(ctx.items()))
                hit = self._auto_cache.get(key)
            except TypeError:  # an unhashable value (symbolic sizes): walk every time
                key = hit = None
            if hit is not None:
                return hit
        reasons = []
        for b in self.ordered(ctx):
            why = self.reason(b.name, ctx, auto=True)
            if why is None:
                if reasons and not _compiling() and log.isEnabledFor(logging.DEBUG):
                    log.debug("%s: auto chose %r after skipping %s", op, b.name, "; ".join(reasons))
                if key is not None:
                    if len(self._auto_cache) >= _AUTO_CACHE_SIZE:
                        self._auto_cache.clear()
                    self._auto_cache[key] = b.name
                return b.name
            reasons.append(f"{b.name}: {why}")
        raise BackendUnavailableError(f"{op}: no backend can run this call: " + "; ".join(reasons))

    def impl(self, name: str) -> Any:
        return self.backends[name].impl()


def _compiling() -> bool:
    # logging calls break torch.compile graphs; the choice is traced, not logged, there
    return torch.compiler.is_compiling()


# ---------------------------------------------------------------- can-run checks shared by the ops


def any_device(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    """The "torch" backends run wherever PyTorch does."""
    return None


def triton_check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    """Triton kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (explicit only)."""
    why = _triton.why_unavailable()
    if why:
        return why
    dev = ctx["device"]
    if dev.type == "cuda":
        if str(ctx["dtype"]) == "torch.float64":
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


def head_dims_check(limit: int) -> Check:
    """A check of the head dims (ctx["d"], ctx["dv"]) <= limit, to combine with another."""

    def check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
        if max(ctx["d"], ctx["dv"]) > limit:
            return f"head dims up to {limit} are supported, got d={ctx['d']}, dv={ctx['dv']}"
        return None

    return check


def all_of(*checks: Check) -> Check:
    """A check that passes when every check passes, giving the first reason otherwise."""

    def check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
        for c in checks:
            why = c(ctx, auto)
            if why is not None:
                return why
        return None

    return check


def cpu_extension_check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    """The C++ CPU kernels of vitattn._C: CPU tensors and a loadable extension."""
    if ctx["device"].type != "cpu":
        return f"the C++ CPU kernels need CPU tensors, got device type {ctx['device'].type!r}"
    return _extension.why_unavailable() or None


def compiled_kernels_check(what: str, names: Sequence[str]) -> Check:
    """A check that the loaded vitattn._C has the entry points ``names`` (an older build may lack
    an op's kernels; ``what`` names them in the reason). Looked up on the first call only, so a
    later call traced by torch.compile reads no module attributes. Combine it after
    cpu_extension_check / cuda_extension_check, which say when there is no extension at all."""
    missing: List[Optional[str]] = [None]  # "" once found present

    def check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
        if missing[0] is None:
            ops = _extension.ops()
            missing[0] = "" if all(hasattr(ops, name) for name in names) else (
                f"the loaded vitattn._C was built without the {what} ({names[0]}); rebuild it "
                "(`pip install --no-build-isolation -e .`)")
        return missing[0] or None

    return check


def cuda_extension_check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    """The CUDA kernels of vitattn._C: CUDA tensors and an extension built with them."""
    if ctx["device"].type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got device type {ctx['device'].type!r}"
    why = _extension.why_unavailable()
    if why:
        return why
    if not _extension.has_cuda():
        return ("vitattn._C was built without its CUDA kernels (at build time torch had no CUDA "
                "or nvcc was not found)")
    return None
