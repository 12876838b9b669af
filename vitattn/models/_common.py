"""Helpers shared by the model definitions: local-checkpoint loading and optional timm registration.

No network access anywhere: ``pretrained`` is a local file path (or False/None).
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, Dict, Mapping, Optional

import torch
from torch import nn

from ..nn._backend import check_backend
from ._features import check_feature_kwargs

# Keys under which training scripts (DeiT/timm/RMT/SReT style) nest the weights in a checkpoint.
_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "module")

# Arguments timm's create_model passes to every entrypoint; our constructors do not use them.
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


# the ImageNet normalisation every model here was trained with (timm's IMAGENET_DEFAULT_*)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrained_cfg(name: str, model: nn.Module) -> Dict[str, Any]:
    """timm's per-model data configuration (read by timm.data.resolve_model_data_config)."""
    size = getattr(model, "img_size", 224)
    return dict(architecture=name, input_size=(3, size, size), fixed_input_size=name.startswith("dynamixer"),
                interpolation="bicubic", crop_pct=0.9, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                num_classes=getattr(model, "num_classes", 0), classifier="head")


def channels_last_images(x: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) in channels-last memory, for a convolutional stem (a no-op when they
    already are).

    oneDNN convolves NHWC data in place, while NCHW data is reordered into its blocked layout and
    the result back at every convolution of the stem; the stem's output is then channels-last as
    well, so the (B, H, W, C) tokens the stages read are a view of it, not a copy.
    """
    return x.contiguous(memory_format=torch.channels_last)


def _extract_state_dict(obj: Any, path: str) -> Dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint (plain state_dict or one nested under a known key)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"load_pretrained: path {path!r} does not hold a state_dict (got {type(obj).__name__})")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
    else:
        for key in _NESTED_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return _extract_state_dict(obj[key], path)
        raise ValueError(
            f"load_pretrained: path {path!r} holds a dict with keys {sorted(map(str, obj))[:8]} but neither "
            f"tensors nor a nested state_dict under one of {_NESTED_KEYS}"
        )
    # weights saved from a DistributedDataParallel / DataParallel wrapper
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_pretrained(model: nn.Module, path) -> nn.Module:
    """Load a local checkpoint into ``model`` with strict=True and return the model.

    ``path`` is a file written by ``torch.save`` holding a state_dict, or a dict with the
    state_dict under "model" / "state_dict" (official training scripts), optionally with the
    "module." prefix of DistributedDataParallel. Only tensors are unpickled (weights_only).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pretrained: model must be a torch.nn.Module, got {type(model).__name__}")
    sd = _read_state_dict(path, "load_pretrained")
    model.load_state_dict(sd, strict=True)
    return model


def _read_state_dict(path, who: str) -> Dict[str, torch.Tensor]:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{who}: path must be a local file path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{who}: path {path!r} is not an existing file (no network download is done)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return _extract_state_dict(obj, path)


def _has_prefix(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def load_features_checkpoint(model: nn.Module, path) -> nn.Module:
    """Load a local checkpoint into a feature model (``features_only=True``) and return the model.

    The checkpoint may hold the feature model's own state_dict, a detector's / segmentor's
    (its ``backbone.`` keys are taken, the rest ignored), or the classification model's: then
    the keys under ``model.checkpoint_skip`` (the head, and stages the feature model does not
    run) are dropped and the modules under ``model.checkpoint_may_lack`` (RMT's extra_norms)
    keep their values, as the official detection configs load classification weights. Every
    other key must match in name and shape; otherwise RuntimeError names the keys.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_features_checkpoint: model must be a torch.nn.Module, got {type(model).__name__}")
    sd = _read_state_dict(path, "load_features_checkpoint")
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    skip = tuple(getattr(model, "checkpoint_skip", ()))
    own = model.state_dict()
    dropped = [k for k in sd if k not in own and _has_prefix(k, skip)]
    for k in dropped:
        del sd[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    # only a classification checkpoint (it had head keys) may lack the feature model's extra modules
    may_lack = tuple(getattr(model, "checkpoint_may_lack", ())) if dropped else ()
    bad_missing = [k for k in missing if not _has_prefix(k, may_lack)]
    if bad_missing or unexpected:
        raise RuntimeError(
            f"load_features_checkpoint: {os.fspath(path)!r} does not fit {type(model).__name__}: "
            f"missing keys {bad_missing[:10]}{' ...' if len(bad_missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
        )
    # shapes are checked by load_state_dict; missing keys here are only the allowed ones
    model.load_state_dict(sd, strict=not missing)
    return model


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability ``drop_prob``
    and rescale the kept ones by 1 / (1 - drop_prob); identity in eval mode. No parameters."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= float(drop_prob) < 1.0:
            raise ValueError(f"DropPath: drop_prob must lie in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # one Bernoulli draw per sample, broadcast over the other dimensions
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def check_attn_backend(name: str, attn_backend, op: str) -> str:
    """Validate a model's attn_backend argument at construction against the backends of the op
    the model runs (``vitattn.backends(op)``; the op itself would reject it only at forward)."""
    return check_backend(name, attn_backend, op, arg="attn_backend")


def build(name: str, cls: Callable[..., nn.Module], pretrained, cfg: Dict[str, Any], kwargs: Dict[str, Any],
          features_cls: Optional[Callable[..., nn.Module]] = None) -> nn.Module:
    """Construct ``cls(**cfg, **kwargs)`` (kwargs override cfg) and load ``pretrained`` if it is a path.

    timm's ``features_only=True`` (with ``out_indices``) builds ``features_cls`` instead, with
    the same configuration; a classification checkpoint then loads with its head dropped
    (:func:`load_features_checkpoint`). ``num_classes`` / ``global_pool`` are ignored there.
    """
    for k in _TIMM_ONLY_KWARGS:
        kwargs.pop(k, None)
    features_only, out_indices = check_feature_kwargs(name, kwargs)
    if pretrained is True:
        raise ValueError(
            f"{name}: pretrained=True would need a download; pass the path of a local checkpoint instead"
        )
    if pretrained not in (False, None) and (isinstance(pretrained, bool)
                                            or not isinstance(pretrained, (str, os.PathLike))):
        raise TypeError(
            f"{name}: pretrained must be False, None or a local checkpoint path, got {type(pretrained).__name__}"
        )
    if pretrained not in (False, None) and not os.path.isfile(os.fspath(pretrained)):
        # fail before paying for the construction
        raise ValueError(
            f"{name}: pretrained path {os.fspath(pretrained)!r} is not an existing file (no network download is done)"
        )
    if features_only:
        if features_cls is None:
            raise ValueError(f"{name}: features_only=True is not supported by this model")
        for k in ("num_classes", "global_pool"):
            kwargs.pop(k, None)
        if out_indices is not None:
            kwargs["out_indices"] = out_indices
        model = features_cls(**{**cfg, **kwargs})
        if pretrained not in (False, None):
            load_features_checkpoint(model, pretrained)
    else:
        model = cls(**{**cfg, **kwargs})
        if pretrained not in (False, None):
            load_pretrained(model, pretrained)
    model.pretrained_cfg = pretrained_cfg(name, model)
    return model


def maybe_register_timm(fn: Callable) -> Callable:
    """Decorator: also register ``fn`` in timm's model registry when timm is importable.

    timm stays optional: without it this is a no-op. A name timm already knows is left to
    timm (with a warning) rather than overwritten. Returns ``fn`` unchanged.
    """
    try:
        from timm.models import is_model, register_model as timm_register
    except Exception:  # timm absent or too old: nothing to do
        return fn
    try:
        if is_model(fn.__name__):
            warnings.warn(f"vitattn: timm already has a model named {fn.__name__!r}; not registering ours")
            return fn

        @functools.wraps(fn)
        def entry(pretrained=False, **kwargs):
            # timm passes its own pretrained_cfg arguments; build() drops them
            return fn(pretrained=pretrained, **kwargs)

        timm_register(entry)
    except Exception as exc:  # a timm API change must not break `import vitattn.models`
        warnings.warn(f"vitattn: could not register {fn.__name__!r} with timm: {exc!r}")
    return fn
