"""RMT as a backbone of MMDetection / MMSegmentation configs.

Importing this module (``custom_imports = dict(imports=["vitattn.models.openmmlab"])`` in a
config) registers :class:`VitattnRMT` under that name in every OpenMMLab model registry that is
importable (mmdet / mmseg 3.x ``registry.MODELS``, 2.x / 0.x ``models.builder.BACKBONES``).
Nothing is required: without mmdet / mmseg the import registers nothing.

``VitattnRMT`` is :class:`vitattn.models.rmt.RMT` (the official backbone's arguments and
state_dict, ``norm_eval``, vitattn.masa) plus OpenMMLab's weight loading: ``init_cfg=
dict(type="Pretrained", checkpoint=PATH)`` (3.x) or ``pretrained=PATH`` loads a local
classification checkpoint with its head dropped, or a backbone / detector / segmentor one,
when the runner calls ``init_weights()``.
"""

from __future__ import annotations

import importlib
from typing import List, Optional

from .rmt import RMT, load_backbone_checkpoint

__all__ = ["VitattnRMT", "register"]


class VitattnRMT(RMT):
    """:class:`RMT` with OpenMMLab's ``init_cfg`` / ``pretrained`` weight loading."""

    def __init__(self, *args, init_cfg: Optional[dict] = None, pretrained: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if init_cfg is not None and not (isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained"
                                         and isinstance(init_cfg.get("checkpoint"), str)):
            raise ValueError(f"VitattnRMT: init_cfg must be None or dict(type='Pretrained', checkpoint=PATH), "
                             f"got {init_cfg!r}")
        if pretrained is not None and not isinstance(pretrained, str):
            raise TypeError(f"VitattnRMT: pretrained must be a path or None, got {type(pretrained).__name__}")
        self.init_cfg = init_cfg
        self.pretrained = pretrained if pretrained is not None else (init_cfg or {}).get("checkpoint")

    def init_weights(self, pretrained=None) -> None:
        path = pretrained if pretrained is not None else self.pretrained
        if path is not None:
            load_backbone_checkpoint(self, path)


def register(name: str = "VitattnRMT") -> List[str]:
    """Register :class:`VitattnRMT` in every importable OpenMMLab registry; returns where."""
    done = []
    for module, attr in (("mmdet.registry", "MODELS"), ("mmseg.registry", "MODELS"),
                         ("mmdet.models.builder", "BACKBONES"), ("mmseg.models.builder", "BACKBONES")):
        try:
            registry = getattr(importlib.import_module(module), attr)
        except Exception:  # that package (or that version's registry) is not installed
            continue
        if name not in getattr(registry, "module_dict", {}):
            registry.register_module(name=name, module=VitattnRMT)
        done.append(f"{module}.{attr}")
    return done


REGISTERED = register()
