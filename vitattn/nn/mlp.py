"""The models' MLP (fc1 -> activation -> dropout -> fc2 -> dropout, the official timm-style
``Mlp`` of SReT, DynaMixer and our SeTformer; parameter names fc1/fc2) and the GELU they and
RMT's FFN apply to fc1's output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops._library import plain_eager
from ._linear import Linear


def gelu_fresh(h: Tensor) -> Tensor:
    """Exact (erf) GELU of h, an intermediate the caller made and owns (a linear layer's
    output). Where no backward is recorded through h (inference) and the call is plain eager,
    h is overwritten in place: no second activation-sized buffer, whose fresh pages cost more
    than the GELU itself at stage-1 sizes (RMT-T batch 8: ~6% of inference). Elsewhere
    F.gelu, so compiled, exported and training graphs are unchanged."""
    if (torch.is_grad_enabled() and h.requires_grad) or not plain_eager((h,)):
        return F.gelu(h)
    return torch.ops.aten.gelu_(h)


def activation(act: nn.Module, h: Tensor) -> Tensor:
    """act(h) for h a fresh intermediate: an exact nn.GELU module without hooks runs
    gelu_fresh; any other module (or a hooked GELU) is called as a module."""
    if type(act) is nn.GELU and act.approximate == "none" and not act._forward_hooks and \
            not act._forward_pre_hooks:
        return gelu_fresh(h)
    return act(h)


class Mlp(nn.Module):
    """fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(activation(self.act, self.fc1(x)))))
