"""Model definitions built on the vitattn ops.

``create_model(name, **kwargs)`` and ``list_models()``; the constructors themselves are
attributes of this package (``vitattn.models.rmt_s``), their modules imported on first use.

Every model is also registered with timm's registry when timm is importable, at the import
of this package and without importing the model modules or building a model:
``import vitattn.models; timm.create_model("rmt_t", features_only=True)`` works.
"""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List

from ._common import maybe_register_timm
from ._registry import _MODELS, register_model  # noqa: F401

# every model by name -> the module that defines it (the registry's complete list before any
# of those modules is imported; a test checks it against what the modules register)
_MODEL_MODULES: Dict[str, str] = {
    **{n: "rmt" for n in ("rmt_t", "rmt_s", "rmt_b", "rmt_l")},
    **{n: "sret" for n in ("sret_t", "sret_lt", "sret_s")},
    **{n: "dynamixer" for n in ("dynamixer_s", "dynamixer_m", "dynamixer_l")},
    **{n: "setformer" for n in ("setformer_mini", "setformer_tiny", "setformer_small", "setformer_base")},
}
_MODULES = tuple(dict.fromkeys(_MODEL_MODULES.values()))


def _load_all() -> None:
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")


def _load(name: str) -> None:
    if name in _MODEL_MODULES:
        importlib.import_module(f"{__name__}.{_MODEL_MODULES[name]}")
    else:
        _load_all()


def list_models() -> List[str]:
    return sorted(_MODEL_MODULES)


def create_model(name: str, **kwargs):
    """Build a registered model; ``pretrained=PATH`` loads a local checkpoint (no network).

    ``features_only=True`` (with optional ``out_indices``) builds the model's feature
    extractor (timm's convention): its forward returns a list of NCHW maps, and
    ``model.feature_info`` describes them."""
    if not isinstance(name, str):
        raise TypeError(f"create_model: name must be a string, got {type(name).__name__}")
    if name not in _MODEL_MODULES:
        raise ValueError(f"create_model: unknown model {name!r}; name must be one of {sorted(_MODEL_MODULES)}")
    _load(name)
    return _MODELS[name](**kwargs)


def _lazy_entry(name: str) -> Callable:
    """A timm entrypoint for ``name`` that imports the model's module only when called."""

    def entry(pretrained=False, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__module__ = __name__  # timm files the model under this (already imported) module
    entry.__doc__ = f"vitattn model {name!r} (vitattn.models.{_MODEL_MODULES[name]}); see vitattn.models.create_model."
    return entry


def _register_with_timm() -> None:
    try:  # once: a missing (or broken) timm is not retried per model
        import timm.models  # noqa: F401
    except Exception:
        return
    for name in _MODEL_MODULES:
        maybe_register_timm(_lazy_entry(name))


_register_with_timm()


def __getattr__(attr: str):
    if attr in _MODEL_MODULES:
        _load(attr)
        return _MODELS[attr]
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
