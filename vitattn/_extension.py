"""Loads the compiled extension vitattn._C (csrc/) when vitattn is imported (under a
millisecond: it only maps the library; doing it then keeps file access out of code that
torch.compile traces).

The C++ / CUDA kernels register themselves as ``torch.ops.vitattn_C.*`` when the library
loads. Without a usable build, ``C`` / ``ops()`` raise ImportError with the reason, and the
"cpu" / "cuda" backends' can-run checks report it. Nothing else lives here: each op's
adapters (vitattn/ops/<op>/backends.py) call the kernels.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the repository "
               "(a C++ compiler and ninja are needed; VITATTN_NO_EXT=1 skips it)")

_module: Any = None
_error: Optional[str] = None


def _load() -> None:
    global _module, _error
    if _module is not None or _error is not None:
        return
    try:
        _module = importlib.import_module(f"{__package__}._C")
    except ImportError as exc:  # not built, or built against another torch
        _error = f"the compiled extension vitattn._C cannot be imported ({exc}); {_BUILD_HINT}"


def why_unavailable() -> str:
    _load()
    return _error or ""


def available() -> bool:
    return not why_unavailable()


def module() -> Any:
    """The pybind11 module vitattn._C (module-level helpers such as cpu_isa())."""
    _load()
    if _module is None:
        raise ImportError(_error)
    return _module


def ops() -> Any:
    """torch.ops.vitattn_C, with the kernels registered (loads the library)."""
    module()
    import torch

    return torch.ops.vitattn_C


def has_cuda() -> bool:
    return available() and bool(getattr(_module, "with_cuda", False))


def status() -> str:
    """One line for `python -m vitattn.info`: what was built, or why nothing was."""
    if not available():
        return f"absent: {_error}"
    cuda = "built" if has_cuda() else "not built (torch without CUDA or no nvcc at build time)"
    return f"loaded (CPU kernels: {_module.cpu_isa()}; CUDA kernels: {cuda})"


class _Lazy:
    """vitattn._extension.C: the extension module; attribute access raises ImportError with
    the reason when it is unavailable."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(module(), name)

    def __repr__(self) -> str:
        return "<vitattn._C>" if available() else f"<vitattn._C missing: {_error}>"


C = _Lazy()
_load()
