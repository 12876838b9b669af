"""DynaMixer modules on the fused op: ``DynaMixerOp`` and ``DynaMixerBlock``.

Class, argument and parameter names follow the official DynaMixer code
(ziyuwwang/DynaMixer, models/dynamixer.py and models/utils.py) so its state_dicts load
unchanged: ``compress``, ``generate``, ``out`` in the op; ``mix_h``, ``mix_w``, ``mlp_c``,
``reweight.fc1/fc2``, ``proj`` in the block. The dynamic mixing runs through
:func:`vitattn.dynamixer`; ``backend`` is passed to it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import dynamixer
from ._backend import check_backend
from ._linear import Linear
from .mlp import Mlp


class DynaMixerOp(nn.Module):
    """Dynamic mixing of the L tokens of (..., L, dim) inputs, followed by the ``out`` projection.

    seq_len must equal L. num_head is the number of channel segments S (dim % num_head == 0);
    reduced_dim is d, the per-segment width of ``compress``.
    """

    def __init__(self, dim: int, seq_len: int, num_head: int, reduced_dim: int = 2, backend: str = "auto"):
        super().__init__()
        if dim % num_head != 0:
            raise ValueError(f"DynaMixerOp: dim={dim} must be divisible by num_head={num_head}")
        check_backend("DynaMixerOp", backend, "dynamixer")
        self.dim = dim
        self.seq_len = seq_len
        self.num_head = num_head
        self.reduced_dim = reduced_dim
        self.backend = backend
        # creation order as in the official module, so a seeded init gives the same weights
        self.out = Linear(dim, dim)
        self.compress = Linear(dim, num_head * reduced_dim)
        self.generate = Linear(seq_len * reduced_dim, seq_len * seq_len)

    def mix(self, x: Tensor) -> Tensor:
        """The dynamic mixing alone (no ``out`` projection)."""
        return dynamixer(x, self.compress.weight, self.compress.bias, self.generate.weight,
                         self.generate.bias, self.num_head, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.mix(x))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, seq_len={self.seq_len}, num_head={self.num_head}, "
                f"reduced_dim={self.reduced_dim}, backend={self.backend!r}")


class DynaMixerBlock(nn.Module):
    """The official token-mixing block on (B, H, W, C): mixing along H, along W and across
    channels, combined with a per-channel softmax reweighting, then ``proj``.

    Signature of the official block (latest version, with ``reduced_dim``), plus ``backend``.

    qk_scale and attn_drop are accepted for signature compatibility and unused (as upstream).
    The H pass hands the op a transposed view; nothing is copied for it.
    """

    def __init__(self, dim, resolution=32, num_head=8, reduced_dim=2, qkv_bias=False, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0, backend: str = "auto"):
        super().__init__()
        self.resolution = resolution
        self.num_head = num_head
        self.mix_h = DynaMixerOp(dim, resolution, num_head, reduced_dim=reduced_dim, backend=backend)
        self.mix_w = DynaMixerOp(dim, resolution, num_head, reduced_dim=reduced_dim, backend=backend)
        self.mlp_c = Linear(dim, dim, bias=qkv_bias)
        self.reweight = Mlp(dim, dim // 4, dim * 3)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"DynaMixerBlock: x must be (B, H, W, C), got shape {tuple(x.shape)}")
        B, H, W, C = x.shape
        h = self.mix_h(x.transpose(1, 2)).transpose(1, 2)  # mix along H: (B, W, H, C) view
        w = self.mix_w(x)
        c = self.mlp_c(x)
        # mean(h + w + c) as the sum of three means: three read-only passes, no (B, H, W, C) temporaries
        a = h.mean(dim=(1, 2)) + w.mean(dim=(1, 2)) + c.mean(dim=(1, 2))  # (B, C)
        a = self.reweight(a).reshape(B, C, 3).permute(2, 0, 1).softmax(dim=0)[:, :, None, None, :]
        # h * a0 + w * a1 + c * a2 summed in that order into one fresh tensor: three passes and one
        # allocation instead of five of each (the products' inputs, not the sum, are what autograd saves)
        x = torch.mul(h, a[0]).addcmul_(w, a[1]).addcmul_(c, a[2])
        return self.proj_drop(self.proj(x))
