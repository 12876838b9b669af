"""Whether the Triton kernels can be used, without importing Triton.

Triton is imported only when a Triton backend first runs (``kernels()``), so that
``import vitattn`` stays cheap on machines that never use it. TRITON_INTERPRET=1 must be
set before the kernels are defined: Triton reads it when @triton.jit runs.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Optional

from . import _env

_IMPORT_ERROR: Optional[str] = None


def _installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# looked up once, at import: finding a module is cheap, importing Triton is not
_INSTALLED = _installed()


def why_unavailable() -> str:
    """"" when Triton can be used, else why not (a missing or broken install)."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    return "" if _INSTALLED else "triton is not installed (pip install triton)"


def available() -> bool:
    return not why_unavailable()


def interpreting() -> bool:
    """True when the Triton kernels run on CPU tensors (TRITON_INTERPRET=1 at import time)."""
    return _INTERPRET and available()


def kernels(name: str) -> ModuleType:
    """vitattn.kernels.<name> (the first call imports Triton); ImportError with the reason."""
    global _IMPORT_ERROR
    why = why_unavailable()
    if why:
        raise ImportError(why)
    try:
        return importlib.import_module(f"{__package__}.kernels.{name}")
    except ImportError as exc:
        if "triton" in str(exc).lower():
            _IMPORT_ERROR = f"triton cannot be imported ({exc.__class__.__name__}: {exc})"
        raise


_INTERPRET = _env.triton_interpret()
