"""DynaMixer's dynamic mixing in standard PyTorch ops, for ONNX export (see
vitattn/ops/_onnx.py).

Per row of L tokens: compress R = x W_c^T + b_c (in x's dtype, as the op's shared compress
step), Z = R_s W_g^T + b_g as (S, L, L) per row, softmax over i, y = mixing of the
segment's channels. All rows at once: the (rows, S, L, L) intermediates grow linearly with
the token count (L is fixed by the model), and not blocking keeps the batch dimension free
for dynamic-batch export. Mixing in the accumulation dtype (fp32; fp64 for fp64 inputs).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._dtypes import acc_dtype


def dynamixer(x: Tensor, compress_weight: Tensor, compress_bias: Optional[Tensor], generate_weight: Tensor,
              generate_bias: Optional[Tensor], segments: int) -> Tensor:
    """x (..., L, C) -> (..., L, C) in x's dtype; see vitattn.dynamixer for the math."""
    L, C = x.shape[-2:]
    S = segments
    d = compress_weight.shape[0] // S
    acc = acc_dtype(x.dtype)
    x3 = x.reshape(-1, L, C)
    r = F.linear(x3, compress_weight, compress_bias).to(acc)  # (rows, L, S*d)
    r = r.reshape(-1, L, S, d).transpose(1, 2).reshape(-1, S, L * d)  # flat index i*d + k
    bg = None if generate_bias is None else generate_bias.to(acc)
    z = F.linear(r, generate_weight.to(acc), bg).reshape(-1, S, L, L)  # [i, j]
    p = torch.softmax(z, dim=-2)  # over i
    xs = x3.to(acc).reshape(-1, L, S, C // S).permute(0, 2, 3, 1)  # (rows, S, C/S, L_i)
    y = torch.matmul(xs, p)  # (rows, S, C/S, L_j)
    return y.permute(0, 3, 1, 2).reshape(x.shape).to(x.dtype)
