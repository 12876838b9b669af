"""Sinkhorn, ot_aggregate and ot_attention in standard PyTorch ops, for ONNX export (see
vitattn/ops/_onnx.py).

The op's fixed-count loop unrolled in the log domain: from zero potentials, ``iters`` times
``f = log a - LSE_j(K + g)`` then ``g = log b - LSE_i(K + f)`` with K = S / eps, and the
plan ``exp(K + f + g)``; every LSE is max-shifted. ot_aggregate / ot_attention form the
scores ``filter * (x . ref^T)`` per (batch, head) -- (n, m) per problem, linear in the token
count -- and are split into blocks of heads above the dense budget.
Computes in the accumulation dtype (fp32; fp64 for fp64 inputs) like every backend.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._dtypes import acc_dtype
from .._onnx import cat, logsumexp, row_blocks


def _potentials(K: Tensor, la, lb, iters: int) -> Tuple[Tensor, Tensor]:
    """(f_T, g_T) of the loop on K (..., n, m); la (..., n) / lb (..., m) tensors or floats."""
    f = la - logsumexp(K, -1)  # the first row update, from g = 0
    g = lb - logsumexp(K + f.unsqueeze(-1), -2)
    for _ in range(iters - 1):
        f = la - logsumexp(K + g.unsqueeze(-2), -1)
        g = lb - logsumexp(K + f.unsqueeze(-1), -2)
    return f, g


def sinkhorn(S: Tensor, la: Tensor, lb: Tensor, eps: float, iters: int) -> Tensor:
    """S (Z, n, m); la (Z, n), lb (Z, m) log marginals in the accumulation dtype -> plan in S's dtype."""
    K = S.to(acc_dtype(S.dtype)) / eps
    f, g = _potentials(K, la, lb, iters)
    return torch.exp(K + f.unsqueeze(-1) + g.unsqueeze(-2)).to(S.dtype)


def ot(x: Tensor, ref: Tensor, v: Tensor, pos_filter: Optional[Tensor], eps: float, iters: int,
       attention: bool) -> Tensor:
    """x (B, heads, n, d), ref (heads, m, d), v (B, heads, n, dv), pos_filter (n, m) or None
    -> (B, heads, m, dv) (aggregate) or (B, heads, n, dv) (attention) in x's dtype."""
    B, heads, n, _ = x.shape
    m = ref.shape[1]
    acc = acc_dtype(x.dtype)
    filt = None if pos_filter is None else pos_filter.to(acc)
    la = math.log(m / n)  # every row carries mass m/n, every reference mass 1
    outs = []
    for h0, h1 in row_blocks(heads, n * m, acc):
        S = torch.matmul(x[:, h0:h1].to(acc), ref[h0:h1].to(acc).transpose(-1, -2))  # (B, h, n, m)
        if filt is not None:
            S = S * filt
        K = S / eps
        f, g = _potentials(K, la, 0.0, iters)
        T = torch.exp(K + f.unsqueeze(-1) + g.unsqueeze(-2))
        if filt is not None:
            T = T * filt
        vb = v[:, h0:h1].to(acc)
        z = torch.matmul(T.transpose(-1, -2), vb)  # (B, h, m, dv)
        outs.append((float(n) / m) * torch.matmul(T, z) if attention else z)
    return cat(outs, 1).to(x.dtype)
