"""Group attention in standard PyTorch ops, for ONNX export (see vitattn/ops/_onnx.py).

The tokens are gathered into permuted order with index_select, every group of n = N / groups
tokens attends to itself -- (n, n) logits per group, query rows blocked above the dense
budget -- and the result is gathered back with the inverse permutation (made by one
scatter; folded into a constant when perm is a buffer). Computes in the accumulation dtype
(fp32; fp64 for fp64 inputs) like every backend.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._dtypes import acc_dtype
from .._onnx import cat, row_blocks


def _inverse(perm: Tensor) -> Tensor:
    return torch.zeros_like(perm).scatter(0, perm, torch.arange(perm.shape[0], device=perm.device,
                                                                   dtype=perm.dtype))


def group_attention(q: Tensor, k: Tensor, v: Tensor, perm: Optional[Tensor], groups: int, scale: float) -> Tensor:
    """q, k (B, heads, N, d), v (B, heads, N, dv) -> (B, heads, N, dv) in q's dtype."""
    B, heads, N, d = q.shape
    dv = v.shape[-1]
    if q.numel() == 0 or v.numel() == 0:  # an empty batch, token set or value width
        return q.new_zeros((B, heads, N, dv))
    n = N // groups
    acc = acc_dtype(q.dtype)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if perm is not None:
        qf, kf, vf = (t.index_select(2, perm) for t in (qf, kf, vf))
    qg = qf.reshape(B, heads, groups, n, d)
    kt = kf.reshape(B, heads, groups, n, d).transpose(-1, -2)
    vg = vf.reshape(B, heads, groups, n, dv)
    outs = []
    for r0, r1 in row_blocks(n, heads * groups * n, acc):
        s = torch.matmul(qg[:, :, :, r0:r1], kt) * scale
        outs.append(torch.matmul(torch.softmax(s, dim=-1), vg))
    out = cat(outs, 3).reshape(B, heads, N, dv)
    if perm is not None:
        out = out.index_select(2, _inverse(perm))
    return out.to(q.dtype)
