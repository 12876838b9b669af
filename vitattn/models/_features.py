"""timm's feature-extraction conventions for the vitattn models, without depending on timm.

* :class:`FeatureInfo`: per returned level a dict ``num_chs`` / ``reduction`` / ``module``;
  ``channels()``, ``reduction()``, ``module_name()``, ``get_dicts()`` as timm's class.
* :func:`take_indices`: timm's meaning of ``indices`` / ``out_indices`` (an int n = the last n
  levels; a sequence = those levels, negative ones counted from the end).
* :class:`IntermediatesMixin`: ``forward_intermediates`` for a classification model that
  yields its per-stage maps through ``_iter_levels``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor

Indices = Union[int, Sequence[int], None]


class FeatureInfo:
    """Describes the maps a feature model returns (timm's ``FeatureInfo`` interface).

    ``levels``: one dict per level the model can produce (``num_chs``, ``reduction``,
    ``module``); ``out_indices``: the levels it returns, in order.
    """

    def __init__(self, levels: List[Dict], out_indices: Sequence[int]):
        self.info = [dict(d, index=i) for i, d in enumerate(levels)]
        self.out_indices = tuple(out_indices)

    def _sel(self, idx):
        chosen = [self.info[i] for i in self.out_indices]
        if idx is None:
            return chosen
        if isinstance(idx, (list, tuple)):
            return [chosen[i] for i in idx]
        return chosen[idx]

    def get(self, key: str, idx=None):
        sel = self._sel(idx)
        return [d[key] for d in sel] if isinstance(sel, list) else sel[key]

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx=None):
        sel = self._sel(idx)
        pick = (lambda d: dict(d)) if keys is None else (lambda d: {k: d[k] for k in keys})
        return [pick(d) for d in sel] if isinstance(sel, list) else pick(sel)

    def channels(self, idx=None):
        return self.get("num_chs", idx)

    def reduction(self, idx=None):
        return self.get("reduction", idx)

    def module_name(self, idx=None):
        return self.get("module", idx)

    def __getitem__(self, item):
        return self.info[self.out_indices[item]] if isinstance(item, int) else [
            self.info[i] for i in self.out_indices[item]]

    def __len__(self) -> int:
        return len(self.out_indices)

    def __repr__(self) -> str:
        return f"FeatureInfo(channels={self.channels()}, reduction={self.reduction()})"


def take_indices(num_levels: int, indices: Indices, name: str = "indices") -> List[int]:
    """timm's rule: None = every level, an int n = the last n levels, a sequence = those levels
    (negative values count from the end). Returns sorted, non-negative, distinct indices."""
    if indices is None:
        return list(range(num_levels))
    if isinstance(indices, bool):
        raise TypeError(f"{name} must be an int or a sequence of ints, got bool")
    if isinstance(indices, int):
        if not 0 < indices <= num_levels:
            raise ValueError(f"{name}={indices}: as an int it counts the last levels, 1..{num_levels}")
        return list(range(num_levels - indices, num_levels))
    try:
        seq = list(indices)
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {type(indices).__name__}") from None
    out = []
    for i in seq:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"{name} must hold ints, got {type(i).__name__}")
        if not -num_levels <= i < num_levels:
            raise ValueError(f"{name}: level {i} does not exist (the model has {num_levels} levels)")
        out.append(i % num_levels)
    if not out:
        raise ValueError(f"{name} must name at least one level")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} names a level twice: {seq}")
    if out != sorted(out):
        raise ValueError(f"{name} must be in increasing order (levels are produced in order), got {seq}")
    return out


class IntermediatesMixin:
    """``forward_intermediates`` in timm's form for a classification model that implements

    * ``feature_levels()``: the level dicts of :class:`FeatureInfo` (every stage);
    * ``_forward_levels(x, take, last)``: runs the stem and stages 0..last, returns
      ``(maps, x)``: the NCHW maps of the levels in ``take`` and the last stage's output;
    * ``_finish(x)``: the rest of ``forward_features`` (the pooled features the head takes).
    """

    def feature_levels(self) -> List[Dict]:  # pragma: no cover - every model overrides it
        raise NotImplementedError

    @property
    def feature_info(self) -> FeatureInfo:
        levels = self.feature_levels()
        return FeatureInfo(levels, range(len(levels)))

    def forward_intermediates(self, x: Tensor, indices: Indices = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """Per-stage NCHW maps (timm's API). Returns the list of maps if ``intermediates_only``,
        else ``(features, maps)`` with ``features`` what ``forward_features`` returns (so
        ``model.forward_head(features)`` gives the logits). ``stop_early`` skips the stages after
        the last requested one (only with ``intermediates_only``). ``norm`` is accepted for timm's
        signature; these models have no per-stage norm, so it changes nothing."""
        if output_fmt != "NCHW":
            raise ValueError(f"{type(self).__name__}: output_fmt must be 'NCHW', got {output_fmt!r}")
        n = len(self.feature_levels())
        take = take_indices(n, indices)
        last = take[-1] if (stop_early and intermediates_only) else n - 1
        maps, x = self._forward_levels(x, take, last)
        if intermediates_only:
            return maps
        return self._finish(x), maps


def drop_head_keys(state_dict: Dict[str, Tensor], head_prefixes: Sequence[str]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Split a classification state_dict into (the rest, the dropped head keys)."""
    kept, dropped = {}, []
    for k, v in state_dict.items():
        if any(k == p or k.startswith(p + ".") for p in head_prefixes):
            dropped.append(k)
        else:
            kept[k] = v
    return kept, dropped


def check_feature_kwargs(name: str, kwargs: Dict) -> Tuple[bool, Indices]:
    """Pop timm's features_only / out_indices / feature_cls from a constructor's kwargs."""
    features_only = kwargs.pop("features_only", False)
    out_indices = kwargs.pop("out_indices", None)
    feature_cls = kwargs.pop("feature_cls", None)
    if not isinstance(features_only, bool):
        raise TypeError(f"{name}: features_only must be a bool, got {type(features_only).__name__}")
    if feature_cls not in (None, "list", "getter"):
        raise ValueError(f"{name}: feature_cls {feature_cls!r} is not supported (the feature model returns a list)")
    if out_indices is not None and not features_only:
        raise ValueError(f"{name}: out_indices is only meaningful with features_only=True")
    return features_only, out_indices


__all__ = ["FeatureInfo", "IntermediatesMixin", "take_indices", "drop_head_keys", "check_feature_kwargs"]
