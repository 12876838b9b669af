"""MaSA in standard PyTorch ops, for ONNX export (see vitattn/ops/_onnx.py).

Decomposed form: the two axis passes of the op (along W inside every row, then along H
inside every column over the first pass's output); the largest intermediate is
(B, heads, H, W, W) logits -- never N x N -- and rows are blocked above the dense budget.
Full form: the whole-grid logits of a block of grid rows at a time, with the decay added
as |dr| + |dc| broadcast over a (rows, W, H, W) view, so no N x N distance constant is
stored in the exported model; one block while the (heads, N, N) logits fit the budget.
Computes in the accumulation dtype (fp32; fp64 for fp64 inputs) like every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._dtypes import acc_dtype
from .._onnx import abs_diff, cat, row_blocks


def _axis_pass(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, scale: float) -> Tensor:
    """Attention along the last token dim L of (B, heads, R, L, .) inside each of the R rows."""
    heads, R, L = q.shape[1], q.shape[2], q.shape[3]
    decay = log_gamma[:, None, None, None] * abs_diff(L, q.device, q.dtype)  # (heads, 1, L, L)
    outs = []
    for r0, r1 in row_blocks(R, heads * L * L, q.dtype):
        s = torch.matmul(q[:, :, r0:r1], k[:, :, r0:r1].transpose(-1, -2)) * scale + decay
        outs.append(torch.matmul(torch.softmax(s, dim=-1), v[:, :, r0:r1]))
    return cat(outs, 2)


def _full(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, scale: float) -> Tensor:
    B, heads, H, W, d = q.shape
    N = H * W
    qf = q.reshape(B, heads, N, d)
    kt = k.reshape(B, heads, N, d).transpose(-1, -2)
    vf = v.reshape(B, heads, N, v.shape[-1])
    dr, dc = abs_diff(H, q.device, q.dtype), abs_diff(W, q.device, q.dtype)
    lg = log_gamma[:, None, None, None, None]
    outs = []
    for r0, r1 in row_blocks(H, heads * W * N, q.dtype):  # blocks of whole grid rows
        rows = r1 - r0
        s = torch.matmul(qf[:, :, r0 * W:r1 * W], kt) * scale  # (B, heads, rows*W, N)
        # decay of query (r, c) to key (r', c'): log(gamma) * (|r - r'| + |c - c'|)
        decay = lg * (dr[r0:r1, None, :, None] + dc[None, :, None, :])  # (heads, rows, W, H, W)
        s = (s.reshape(B, heads, rows, W, H, W) + decay).reshape(B, heads, rows * W, N)
        outs.append(torch.matmul(torch.softmax(s, dim=-1), vf))
    return cat(outs, 2).reshape(B, heads, H, W, v.shape[-1])


def masa(q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, scale: float, decomposed: bool) -> Tensor:
    """The op's output (B, heads, H, W, dv) in q's dtype; log_gamma (heads,) as op.py makes it."""
    if q.numel() == 0 or v.numel() == 0:  # an empty batch, grid or value width
        return q.new_zeros(q.shape[:-1] + v.shape[-1:])
    acc = acc_dtype(q.dtype)
    qf, kf, vf, lg = q.to(acc), k.to(acc), v.to(acc), log_gamma.to(acc)
    if not decomposed:
        return _full(qf, kf, vf, lg, scale).to(q.dtype)
    v_mid = _axis_pass(qf, kf, vf, lg, scale)  # along W inside every row
    t = lambda x: x.transpose(2, 3)
    return t(_axis_pass(t(qf), t(kf), t(v_mid), lg, scale)).to(q.dtype)  # along H inside every column
