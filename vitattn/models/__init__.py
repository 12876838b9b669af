"""Model definitions built on the vitattn ops.

``create_model(name, **kwargs)`` and ``list_models()``; the constructors themselves are
attributes of this package (``vitattn.models.rmt_s``), imported on first use.
"""

from __future__ import annotations

import importlib
from typing import List

from ._registry import _MODELS, register_model  # noqa: F401

# every module that defines models; imported lazily so `import vitattn` stays light
_MODULES = ("rmt", "sret", "dynamixer", "setformer")


def _load_all() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


def list_models() -> List[str]:
    _load_all()
    return sorted(_MODELS)


def create_model(name: str, **kwargs):
    """Build a registered model; ``pretrained=PATH`` loads a local checkpoint (no network)."""
    if not isinstance(name, str):
        raise TypeError(f"create_model: name must be a string, got {type(name).__name__}")
    _load_all()
    if name not in _MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; name must be one of {sorted(_MODELS)}")
    return _MODELS[name](**kwargs)


def __getattr__(attr: str):
    _load_all()
    if attr in _MODELS:
        return _MODELS[attr]
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
