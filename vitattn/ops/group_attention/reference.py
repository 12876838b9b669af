"""Dense PyTorch reference for SReT group / permuted attention.

Readable ground truth written the way the official SReT code computes it: the
tokens are copied into permuted order with an index, split into ``groups``
contiguous chunks, every chunk attends to itself through a materialised
(groups, N/groups, N/groups) logits tensor, and the result is copied back into
the original order with the inverse permutation. Never use it for speed.
"""

from __future__ import annotations

import torch

from ..._dtypes import acc_dtype


def group_attention(q, k, v, groups: int, *, perm=None, scale=None) -> torch.Tensor:
    """q, k: (B, heads, N, d); v: (B, heads, N, dv); see vitattn.group_attention for the math."""
    B, heads, N, d = q.shape
    n = N // groups
    acc = acc_dtype(q.dtype)
    scale = d ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if perm is not None:
        # SReT: x = x[:, idx, :] (a permuted copy of every token)
        qf, kf, vf = qf[:, :, perm], kf[:, :, perm], vf[:, :, perm]
    qg = qf.reshape(B, heads, groups, n, d)
    kg = kf.reshape(B, heads, groups, n, d)
    vg = vf.reshape(B, heads, groups, n, -1)
    attn = torch.softmax((qg @ kg.transpose(-1, -2)) * scale, dim=-1)
    out = (attn @ vg).reshape(B, heads, N, -1)
    if perm is not None:
        # SReT: inverse = argsort(idx); x = x[:, inverse, :]
        out = out[:, :, torch.argsort(perm)]
    return out.to(q.dtype)
