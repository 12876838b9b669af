"""The one check of a module's backend argument, shared by vitattn.nn and vitattn.models."""

from __future__ import annotations


def check_backend(owner: str, value, op: str, arg: str = "backend") -> str:
    """``value`` must name one of the backends of the vitattn op ``op`` (``vitattn.backends(op)``,
    "auto" included): checked when the module is built, not first at its forward."""
    import vitattn

    if not isinstance(value, str):
        raise TypeError(f"{owner}: {arg} must be a string, got {type(value).__name__}")
    allowed = vitattn.backends(op)
    if value not in allowed:
        raise ValueError(f"{owner}: {arg} must be one of the {op} op's backends {allowed}, got {value!r}")
    return value
