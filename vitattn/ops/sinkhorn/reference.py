"""Dense PyTorch reference for Sinkhorn optimal-transport aggregation (OTKE / SeTformer).

Readable ground truth, differentiable by plain autograd through every iteration:

* :func:`sinkhorn` is the log-domain loop of issue 3, written out literally:
  zero potentials, then ``iters`` times the row update
  ``f = log a - LSE_j(S/eps + g)`` followed by the column update
  ``g = log b - LSE_i(S/eps + f)``, returning ``exp(S/eps + f + g)``.
* :func:`ot_aggregate` / :func:`ot_attention` follow OTKE's ``OTKernel``
  (claying/OTK, ``multihead_attn`` with ``log_domain=True``): scores ``x . ref^T``,
  multiplied by the position filter, Sinkhorn with row mass m/n and column mass 1,
  the plan multiplied by the filter again, then ``out_j = sum_i T_ij v_i``.
* :func:`otkernel` reproduces the ``OTKernel`` module's forward (one input shared
  by all heads, output ``(batch, m, heads * d)``) and :func:`otk_position_filter`
  its ``get_position_filter`` for 1-D and 2-D inputs, so the public helpers can be
  checked against the official layout.

Everything materialises (n, m) matrices per problem and keeps every iteration for
autograd: never use it for large problems.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..._dtypes import acc_dtype


def sinkhorn(scores: Tensor, *, eps: float = 0.1, iters: int = 10, a: Optional[Tensor] = None,
             b: Optional[Tensor] = None) -> Tensor:
    """Entropic OT plan of (..., n, m) scores with row marginal a (..., n) and column marginal b (..., m)."""
    n, m = scores.shape[-2:]
    acc = acc_dtype(scores.dtype)
    K = scores.to(acc) / eps
    log_a = torch.log(a.to(acc)) if a is not None else torch.full((n,), -math.log(n), dtype=acc, device=scores.device)
    log_b = torch.log(b.to(acc)) if b is not None else torch.full((m,), -math.log(m), dtype=acc, device=scores.device)
    g = torch.zeros(K.shape[:-2] + (m,), dtype=acc, device=scores.device)
    f = None
    for _ in range(iters):
        f = log_a - torch.logsumexp(K + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(K + f.unsqueeze(-1), dim=-2)
    return torch.exp(K + f.unsqueeze(-1) + g.unsqueeze(-2)).to(scores.dtype)


def ot_plan(x: Tensor, ref: Tensor, *, eps: float = 0.1, iters: int = 10,
            pos_filter: Optional[Tensor] = None) -> Tensor:
    """OTKE's transport plan T (B, heads, n, m) between tokens x (B, heads, n, d) and references ref (heads, m, d).

    Returned in the accumulation dtype (fp32, or fp64 for fp64 inputs), filter applied.
    """
    n, m = x.shape[-2], ref.shape[-2]
    acc = acc_dtype(x.dtype)
    S = torch.einsum("bhnd,hmd->bhnm", x.to(acc), ref.to(acc))
    if pos_filter is not None:
        S = pos_filter.to(acc) * S
    # OTKE: every row carries mass m/n, every reference mass 1
    a = torch.full((n,), m / n, dtype=acc, device=x.device)
    b = torch.ones((m,), dtype=acc, device=x.device)
    T = sinkhorn(S, eps=eps, iters=iters, a=a, b=b)
    if pos_filter is not None:
        T = pos_filter.to(acc) * T
    return T


def ot_aggregate(x: Tensor, ref: Tensor, v: Optional[Tensor] = None, *, eps: float = 0.1, iters: int = 10,
                 pos_filter: Optional[Tensor] = None) -> Tensor:
    """(B, heads, m, dv): out_j = sum_i T_ij v_i with OTKE's plan T (v defaults to x)."""
    v = x if v is None else v
    T = ot_plan(x, ref, eps=eps, iters=iters, pos_filter=pos_filter)
    return (T.transpose(-1, -2) @ v.to(T.dtype)).to(x.dtype)


def ot_attention(x: Tensor, ref: Tensor, v: Optional[Tensor] = None, *, eps: float = 0.1, iters: int = 10,
                 pos_filter: Optional[Tensor] = None) -> Tensor:
    """(B, heads, n, dv): tokens -> references -> tokens, (n/m) T (T^T v) with the same plan T."""
    v = x if v is None else v
    n, m = x.shape[-2], ref.shape[-2]
    T = ot_plan(x, ref, eps=eps, iters=iters, pos_filter=pos_filter)
    z = T.transpose(-1, -2) @ v.to(T.dtype)
    return ((n / m) * (T @ z)).to(x.dtype)


# ---------------------------------------------------------------- OTKE's module layout


def otk_position_filter(input_shape, out_size: int, sigma: float = 0.1, device=None,
                        dtype=torch.float32) -> Tensor:
    """OTKernel.get_position_filter with position_encoding="gaussian", as an (n, out_size) matrix.

    input_shape is (n,) for a sequence or (H, W) for a grid; for a grid out_size must be a
    square s*s and the filter is the product of a row and a column filter, coordinates
    counted from 1 (OTKE's 2-D convention; its 1-D filter counts from 0).
    """
    if len(input_shape) == 1:
        n = input_shape[0]
        i = torch.arange(n, dtype=torch.float64).view(-1, 1) / n
        j = torch.arange(out_size, dtype=torch.float64).view(1, -1) / out_size
        return torch.exp(-((i - j) / sigma) ** 2).to(device=device, dtype=dtype)
    H, W = input_shape
    s = int(math.isqrt(out_size))
    r = torch.arange(1, H + 1, dtype=torch.float64).view(-1, 1) / H
    c = torch.arange(1, W + 1, dtype=torch.float64).view(-1, 1) / W
    q = torch.arange(1, s + 1, dtype=torch.float64).view(1, -1) / s
    fr = torch.exp(-((r - q) / sigma) ** 2)  # (H, s)
    fc = torch.exp(-((c - q) / sigma) ** 2)  # (W, s)
    filt = fr.view(H, 1, s, 1) * fc.view(1, W, 1, s)
    return filt.reshape(H * W, s * s).to(device=device, dtype=dtype)


def otkernel(inp: Tensor, weight: Tensor, *, eps: float = 0.1, max_iter: int = 10,
             position_filter: Optional[Tensor] = None) -> Tensor:
    """OTKernel.forward (log domain, no mask): inp (batch, n, d) shared by every head,
    weight (heads, m, d) -> (batch, m, heads * d) with the heads of a reference side by side."""
    batch, n, d = inp.shape
    heads, m, _ = weight.shape
    x = inp.unsqueeze(1).expand(batch, heads, n, d)
    T = ot_plan(x, weight, eps=eps, iters=max_iter, pos_filter=position_filter)  # (batch, heads, n, m)
    out = T.transpose(-1, -2) @ inp.to(T.dtype).unsqueeze(1)  # (batch, heads, m, d)
    return out.permute(0, 2, 1, 3).reshape(batch, m, heads * d).to(inp.dtype)
