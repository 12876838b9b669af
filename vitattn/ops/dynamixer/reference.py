"""Dense PyTorch reference for DynaMixer's dynamic mixing (DynaMixerOp without its ``out`` projection).

Readable ground truth following the official op step by step: it materialises the
(…, S, L, L) logits and probabilities. Computes in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dtypes import acc_dtype


def dynamixer(x, compress_weight, compress_bias, generate_weight, generate_bias, segments: int) -> torch.Tensor:
    """x (..., L, C) -> (..., L, C); see vitattn.dynamixer for the math."""
    *lead, L, C = x.shape
    S = segments
    d = compress_weight.shape[0] // S
    acc = acc_dtype(x.dtype)
    cast = lambda t: None if t is None else t.to(acc)
    xf = x.to(acc)
    # compress: (..., L, S*d) -> (..., S, L*d), flat index i*d + k inside each segment
    r = F.linear(xf, cast(compress_weight), cast(compress_bias))
    r = r.reshape(*lead, L, S, d).movedim(-2, -3).reshape(*lead, S, L * d)
    # generate: (..., S, L, L) indexed [i, j]; softmax over i (the official Softmax(dim=-2))
    z = F.linear(r, cast(generate_weight), cast(generate_bias)).reshape(*lead, S, L, L)
    p = torch.softmax(z, dim=-2)
    # mix: y[j, s*C/S + c] = sum_i x[i, s*C/S + c] * p[s, i, j]
    xs = xf.reshape(*lead, L, S, C // S).movedim(-3, -1)  # (..., S, C/S, L)
    y = torch.matmul(xs, p)  # (..., S, C/S, L)
    return y.movedim(-1, -3).reshape(*lead, L, C).to(x.dtype)
