"""Model registry: constructors register themselves by name."""

from __future__ import annotations

from typing import Callable, Dict

_MODELS: Dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    """Decorator: make ``fn`` (a constructor taking **kwargs) available to create_model by its name."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn
