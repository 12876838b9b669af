"""Whether the Triton kernels can be used, decided once at import time.

TRITON_INTERPRET=1 must be set before the kernels are defined (before vitattn is
imported): Triton reads it when @triton.jit runs.
"""

from __future__ import annotations

import os

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    _ERR = None
except Exception as exc:  # ImportError, or a broken install
    _ERR = f"triton cannot be imported ({exc.__class__.__name__}: {exc})"


def available() -> bool:
    return _ERR is None


def why_unavailable() -> str:
    return _ERR or ""


def interpreting() -> bool:
    """True when the kernels were defined under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    return _INTERPRET and _ERR is None
