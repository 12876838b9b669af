"""DynaMixer dynamic mixing in PyTorch: the shared compress step and the "torch" backend.

Tensors are 5-D here: x (N0, N1, N2, L, C), the leading dims indexing independent rows
(the public op pads or flattens to three). The op splits into

* compress (token-wise linear, shared by every backend):  R = x W_c^T + b_c, (…, L, S*d)
* mix (the backend's part):  per row and segment s, Z = R_s W_g^T + b_g as (L, L) [i, j],
  P = softmax over i, y[j, c] = sum_i P[i, j] x[i, c] over the segment's channels.

The forward keeps R and the per-column log-sum-exp of Z (fp32, fp64 for fp64 inputs);
the backward recomputes P from them. The torch backend works on chunks of rows so no
(rows, S, L, L) tensor exists for all rows at once.

Token-wise tensors (R, y, dx) are laid out in x's storage order when x is a permuted
dense tensor (e.g. a transposed (B, H, W, C) grid), so the token-wise GEMMs run on
plain 2-D views without copying x.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..._dtypes import acc_dtype
from ..._tiles import dense_elems

# elements of one chunk's (rows, S, L, L) logits block: 2**22 fp32 values is 16 MiB


# ---------------------------------------------------------------- token-wise layout


def token_order(x: Tensor) -> Optional[List[int]]:
    """Permutation of the non-channel dims that makes x contiguous, or None if there is none."""
    n = x.dim() - 1
    order = sorted(range(n), key=lambda k: -x.stride(k))  # stable: ties keep logical order
    return order if x.permute(*order, n).is_contiguous() else None


def _inverse(order: List[int]) -> List[int]:
    inv = [0] * len(order)
    for pos, k in enumerate(order):
        inv[k] = pos
    return inv


def empty_tokenwise(x: Tensor, last: int, dtype: torch.dtype) -> Tensor:
    """A tensor of shape x.shape[:-1] + (last,) laid out in x's token storage order.

    Used by the real kernels and by the fake (meta) functions alike, so both agree on strides.
    """
    n = x.dim() - 1
    order = token_order(x) or list(range(n))
    buf = x.new_empty([x.shape[k] for k in order] + [last], dtype=dtype)
    return buf.permute(*_inverse(order), n)


def rows2d(t: Tensor, order: Optional[List[int]]) -> Tensor:
    """(tokens, features) view of t, tokens enumerated in the given order (copy if not a view)."""
    n = t.dim() - 1
    order = order or list(range(n))
    return t.permute(*order, n).reshape(-1, t.shape[-1])


# ---------------------------------------------------------------- compress (shared)


def compress_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """R = x W^T + b, token-wise, written in x's storage order; dtype of x."""
    order = token_order(x)
    r = empty_tokenwise(x, weight.shape[0], x.dtype)
    x2, r2 = rows2d(x, order), rows2d(r, order)  # r2 is a view of r (r is laid out in that order)
    if bias is None:
        torch.mm(x2, weight.t(), out=r2)
    else:
        torch.addmm(bias, x2, weight.t(), out=r2)
    return r


def compress_bwd(x: Tensor, dx_mix: Tensor, d_r: Tensor, weight: Tensor, need_bias: bool):
    """Gradients of compress plus the mixing path: dx = dx_mix + dR W, dW = dR^T x, db = sum dR."""
    order = token_order(x)
    dt = x.dtype
    x2 = rows2d(x, order)
    dr2 = rows2d(d_r, order).to(dt)
    dx = empty_tokenwise(x, x.shape[-1], dt)
    dx2 = rows2d(dx, order)
    torch.addmm(rows2d(dx_mix, order).to(dt), dr2, weight, out=dx2)
    dw = dr2.t().mm(x2)
    db = dr2.sum(0, dtype=acc_dtype(dt)).to(dt) if need_bias else None
    return dx, dw, db


# ---------------------------------------------------------------- the "torch" backend (mix)


def _chunks(rows: int, S: int, L: int, dtype: torch.dtype):
    step = max(1, dense_elems(dtype, 4) // (S * L * L))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def _segment_r(r: Tensor, S: int, acc: torch.dtype) -> Tensor:
    """(c, L, S*d) -> (c, S, L*d), flat index i*d + k."""
    c, L, SD = r.shape
    return r.to(acc).reshape(c, L, S, SD // S).transpose(1, 2).reshape(c, S, -1)


def _segment_x(x: Tensor, S: int, acc: torch.dtype) -> Tensor:
    """(c, L, C) -> (c, S, L, C/S)."""
    c, L, C = x.shape
    return x.to(acc).reshape(c, L, S, C // S).transpose(1, 2)


def _probs(r_s: Tensor, wg: Tensor, bg: Optional[Tensor], lse: Optional[Tensor]):
    c, S, _ = r_s.shape
    L = lse.shape[-1] if lse is not None else int(round(wg.shape[0] ** 0.5))
    z = F.linear(r_s, wg, bg).reshape(c, S, L, L)
    if lse is None:
        lse = torch.logsumexp(z, dim=-2)
    return torch.exp(z - lse[:, :, None, :]), lse


def mix_fwd(x: Tensor, r: Tensor, wg: Tensor, bg: Optional[Tensor], S: int) -> Tuple[Tensor, Tensor]:
    """y (x's layout, x.dtype) and lse (N0, N1, N2, S, L) in the accumulation dtype."""
    *lead, L, C = x.shape
    acc = acc_dtype(x.dtype)
    xr, rr = x.reshape(-1, L, C), r.reshape(-1, L, r.shape[-1])
    rows = xr.shape[0]
    wg_a, bg_a = wg.to(acc), None if bg is None else bg.to(acc)
    y_flat = torch.empty(rows, L, C, device=x.device, dtype=x.dtype)
    lse = torch.empty(rows, S, L, device=x.device, dtype=acc)
    for a, b in _chunks(rows, S, L, acc):
        p, lse_c = _probs(_segment_r(rr[a:b], S, acc), wg_a, bg_a, None)
        y = p.transpose(-1, -2) @ _segment_x(xr[a:b], S, acc)  # (c, S, L_j, C/S)
        y_flat[a:b] = y.transpose(1, 2).reshape(b - a, L, C).to(x.dtype)
        lse[a:b] = lse_c
    y_out = empty_tokenwise(x, C, x.dtype)
    y_out.copy_(y_flat.view(x.shape))
    return y_out, lse.view(*lead, S, L)


def mix_bwd(dy: Tensor, x: Tensor, r: Tensor, wg: Tensor, bg: Optional[Tensor], lse: Tensor, S: int):
    """dx_mix (like x, x.dtype), dR (like r, acc dtype), dW_g, db_g (acc dtype) of mix_fwd."""
    *lead, L, C = x.shape
    acc = acc_dtype(x.dtype)
    xr, rr, dyr = x.reshape(-1, L, C), r.reshape(-1, L, r.shape[-1]), dy.reshape(-1, L, C)
    rows = xr.shape[0]
    lse_r = lse.reshape(rows, S, L)
    wg_a, bg_a = wg.to(acc), None if bg is None else bg.to(acc)
    dxm = torch.empty(rows, L, C, device=x.device, dtype=x.dtype)
    dr = torch.empty(rows, L, r.shape[-1], device=x.device, dtype=acc)
    dwg = torch.zeros(wg.shape, device=x.device, dtype=acc)
    dbg = torch.zeros(wg.shape[0], device=x.device, dtype=acc)
    for a, b in _chunks(rows, S, L, acc):
        c = b - a
        r_s = _segment_r(rr[a:b], S, acc)
        p, _ = _probs(r_s, wg_a, bg_a, lse_r[a:b])
        xs, dys = _segment_x(xr[a:b], S, acc), _segment_x(dyr[a:b], S, acc)
        dp = xs @ dys.transpose(-1, -2)  # (c, S, L_i, L_j)
        dz = p * (dp - (p * dp).sum(-2, keepdim=True))  # softmax over i, per column j
        dxm[a:b] = (p @ dys).transpose(1, 2).reshape(c, L, C).to(x.dtype)
        dz2 = dz.reshape(c, S, L * L)
        dr[a:b] = (dz2 @ wg_a).reshape(c, S, L, -1).transpose(1, 2).reshape(c, L, -1)
        dwg += dz2.reshape(-1, L * L).t() @ r_s.reshape(-1, r_s.shape[-1])
        dbg += dz2.sum((0, 1))
    return dxm.view(x.shape), dr.view(r.shape), dwg, dbg
