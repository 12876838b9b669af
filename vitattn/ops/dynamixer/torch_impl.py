"""DynaMixer dynamic mixing in PyTorch: the shared compress step and the "torch" backend.

Tensors are 5-D here: x (N0, N1, N2, L, C), the leading dims indexing independent rows
(the public op pads or flattens to three). The op splits into

* compress (token-wise linear, shared by every backend):  R = x W_c^T + b_c, (…, L, S*d)
* mix (the backend's part):  per row and segment s, Z = R_s W_g^T + b_g as (L, L) [i, j],
  P = softmax over i, y[j, c] = sum_i P[i, j] x[i, c] over the segment's channels.

The forward keeps R and the per-column log-sum-exp of Z (fp32, fp64 for fp64 inputs);
the torch backend's backward recomputes P from R. It computes densely while the
(rows, S, L, L) intermediates fit VITATTN_DENSE_BUDGET_MB and in chunks of rows above it.

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
#
# Dense while the intermediates fit VITATTN_DENSE_BUDGET_MB (the whole call at once, as the
# naive code does it), in chunks of rows above it. The logits are (..., S, L_i, L_j) and the
# softmax over i runs along dim -2: PyTorch vectorises that kernel (and its fused backward)
# along the contiguous j, which for L = 16 is several times faster than a last-dim softmax
# of 16 elements. y = P^T x_s is a batched matmul with a transposed operand (no copy of P).
# The backward recomputes P from R.


def _chunks(rows: int, S: int, L: int, dtype: torch.dtype) -> List[Tuple[int, int]]:
    # the backward holds four (c, S, L, L) tensors at once (logits, P, dP, dZ)
    step = max(1, dense_elems(dtype, 4) // (S * L * L))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _segment_r(r: Tensor, S: int, acc: torch.dtype) -> Tensor:
    """(..., L, S*d) -> (..., S, L*d), flat index i*d + k."""
    *lead, L, SD = r.shape
    return r.to(acc).reshape(*lead, L, S, SD // S).transpose(-3, -2).reshape(*lead, S, L * (SD // S))


def _split_channels(t: Tensor, S: int) -> Tensor:
    """(..., L, C) -> (..., S, L, C/S) (a view where the channels allow it)."""
    *lead, L, C = t.shape
    return t.reshape(*lead, L, S, C // S).transpose(-3, -2)


def _mix_fwd_block(x: Tensor, r: Tensor, wg: Tensor, bg: Optional[Tensor], S: int, acc: torch.dtype):
    """y (..., S, L_j, C/S) and lse (..., S, L_j) of rows (..., L, C)."""
    *lead, L, _ = x.shape
    z = F.linear(_segment_r(r, S, acc), wg, bg).view(-1, S, L, L)  # 4-D: PyTorch's kernels prefer it
    p = torch.softmax(z, dim=-2)
    # log sum_i exp z = max_i z - log max_i p (max_i p >= 1/L: its log is accurate), no exp pass
    lse = (z.amax(-2) - p.amax(-2).log()).view(*lead, S, L)
    return torch.matmul(p.view(*lead, S, L, L).transpose(-1, -2), _split_channels(x.to(acc), S)), lse


def _mix_bwd_block(dy: Tensor, x: Tensor, r: Tensor, wg: Tensor, bg: Optional[Tensor], S: int, acc: torch.dtype):
    """dx_mix (..., S, L_i, C/S), dR (..., S, L_i, d), and the rows' sums of dW_g and db_g."""
    *lead, L, _ = x.shape
    r_s = _segment_r(r, S, acc)
    p = torch.softmax(F.linear(r_s, wg, bg).view(-1, S, L, L), dim=-2)
    xs, dys = _split_channels(x.to(acc), S), _split_channels(dy.to(acc), S)
    dp = torch.matmul(xs, dys.transpose(-1, -2)).view(-1, S, L, L)  # (rows, S, L_i, L_j)
    dz = torch._softmax_backward_data(dp, p, -2, p.dtype).reshape(-1, L * L)
    dxm = torch.matmul(p.view(*lead, S, L, L), dys)
    dr = torch.mm(dz, wg).view(*lead, S, L, -1)
    r2 = r_s.reshape(-1, r_s.shape[-1])
    return dxm, dr, dz.t().mm(r2), dz.sum(0)


def mix_fwd(x: Tensor, r: Tensor, wg: Tensor, bg: Optional[Tensor], S: int) -> Tuple[Tensor, Tensor]:
    """y (x's layout, x.dtype) and lse (N0, N1, N2, S, L) in the accumulation dtype."""
    *lead, L, C = x.shape
    acc = acc_dtype(x.dtype)
    rows = x.numel() // (L * C)
    wg, bg = wg.to(acc), None if bg is None else bg.to(acc)
    y = empty_tokenwise(x, C, x.dtype)
    y_seg = y.view(*lead, L, S, C // S)  # empty_tokenwise keeps the channels contiguous
    chunks = _chunks(rows, S, L, acc)
    if len(chunks) == 1:  # dense: the whole call at once, on x's own layout
        yb, lse = _mix_fwd_block(x, r, wg, bg, S, acc)
        y_seg.copy_(yb.transpose(-3, -2))
        return y, lse
    x3, r3 = x.reshape(rows, L, C), r.reshape(rows, L, r.shape[-1])
    y3 = torch.empty(rows, L, S, C // S, device=x.device, dtype=x.dtype)
    lse = torch.empty(rows, S, L, device=x.device, dtype=acc)
    for a, b in chunks:
        yb, lse[a:b] = _mix_fwd_block(x3[a:b], r3[a:b], wg, bg, S, acc)
        y3[a:b] = yb.transpose(1, 2)
    y_seg.copy_(y3.view(y_seg.shape))
    return y, lse.view(*lead, S, L)


def mix_bwd(dy: Tensor, x: Tensor, r: Tensor, wg: Tensor, bg: Optional[Tensor], lse: Tensor, S: int):
    """dx_mix (x's layout, x.dtype), dR (r's layout, acc dtype), dW_g, db_g (acc dtype) of mix_fwd.

    P is recomputed from R (the softmax of the same logits), so lse is not read."""
    *lead, L, C = x.shape
    acc = acc_dtype(x.dtype)
    rows = x.numel() // (L * C)
    SD = r.shape[-1]
    wg, bg = wg.to(acc), None if bg is None else bg.to(acc)
    dxm, dr = empty_tokenwise(x, C, x.dtype), empty_tokenwise(x, SD, acc)
    dxm_seg, dr_seg = dxm.view(*lead, L, S, C // S), dr.view(*lead, L, S, SD // S)
    chunks = _chunks(rows, S, L, acc)
    if len(chunks) == 1:
        dxm_b, dr_b, dwg, dbg = _mix_bwd_block(dy, x, r, wg, bg, S, acc)
        dxm_seg.copy_(dxm_b.transpose(-3, -2))
        dr_seg.copy_(dr_b.transpose(-3, -2))
    else:
        x3, r3, dy3 = x.reshape(rows, L, C), r.reshape(rows, L, SD), dy.reshape(rows, L, C)
        dxm3 = torch.empty(rows, L, S, C // S, device=x.device, dtype=x.dtype)
        dr3 = torch.empty(rows, L, S, SD // S, device=x.device, dtype=acc)
        dwg = torch.zeros(L * L, wg.shape[1], device=x.device, dtype=acc)
        dbg = torch.zeros(L * L, device=x.device, dtype=acc)
        for a, b in chunks:
            dxm_b, dr_b, dw_b, db_b = _mix_bwd_block(dy3[a:b], x3[a:b], r3[a:b], wg, bg, S, acc)
            dxm3[a:b], dr3[a:b] = dxm_b.transpose(1, 2), dr_b.transpose(1, 2)
            dwg += dw_b
            dbg += db_b
        dxm_seg.copy_(dxm3.view(dxm_seg.shape))
        dr_seg.copy_(dr3.view(dr_seg.shape))
    return dxm, dr, dwg, dbg
