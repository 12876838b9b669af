"""PyTorch backend for MaSA (the "torch" backend): dense math under a memory budget.

Both forms reduce to one primitive, *grid attention*: Z independent problems, each attending
over the N = Y * X tokens of a Y x X grid with the decay log(gamma) * (|dy| + |dx|). The full
form is Z = B*heads, (Y, X) = (H, W); a decomposed axis pass is Z = B*heads*rows, (Y, X) = (1, L).

The problems are solved with the dense operations the official RMT code uses -- the decay
bias, one batched GEMM adding the logits to it (the scale folded in), one fused softmax, one
batched GEMM for the output -- on as many whole problems at once as fit
VITATTN_DENSE_BUDGET_MB (vitattn._tiles.problem_blocks), and on row blocks of one problem
above it, so no N x N tensor beyond the budget exists. The per-row log-sum-exp comes from the
softmax's own output at the row maximum (p = 1 / rowsum there), not from a second exponential
pass; the backward recomputes the probabilities with the same fused softmax (rows normalised by
their sum: exact even where exp(s - lse) would lose precision at large logits) and uses
softmax's fused backward.
"""

from __future__ import annotations


import torch

from ..._dtypes import acc_dtype
from ..._tiles import dense_elems, problem_blocks
from .._dense import block_backward, lse_from_softmax, probs_times_values

# dense intermediates alive at once per block (logits, probabilities, their gradient)
_DENSE_TENSORS = 3


def _distance(Y: int, X: int, device, dtype):
    """A function (r0, r1) -> (r1 - r0, N) Manhattan distances of query rows r0..r1 to every
    token; the whole N x N matrix is built once when it fits the budget, else row blocks."""
    n = torch.arange(Y * X, device=device)
    yy, xx = (n // X).to(dtype), (n % X).to(dtype)

    def rows(r0: int, r1: int) -> torch.Tensor:
        return (yy[r0:r1, None] - yy[None]).abs_().add_((xx[r0:r1, None] - xx[None]).abs_())

    N = Y * X
    if N * N <= dense_elems(dtype, _DENSE_TENSORS):
        full = rows(0, N)
        return lambda r0, r1: full[r0:r1]
    return rows


def _probabilities(qb, kb, lgb, dist, scale: float):
    """softmax(lg * dist + scale * qb kb^T) of a block of problems, and the logits."""
    s = lgb[:, None, None] * dist  # the decay bias, then the logits added into it
    s.baddbmm_(qb, kb.transpose(1, 2), alpha=scale)
    return torch.softmax(s, dim=-1), s


def grid_attention_fwd(q, k, v, log_gamma, Y: int, X: int, scale: float):
    """q, k: (Z, N, d); v: (Z, N, dv); log_gamma: (Z,) -> out (Z, N, dv) in q.dtype, lse (Z, N) fp32/fp64."""
    Z, N, _ = q.shape
    acc = acc_dtype(q.dtype)
    dist = _distance(Y, X, q.device, acc)
    lg = log_gamma.to(acc)
    out = torch.empty(Z, N, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(Z, N, device=q.device, dtype=acc)
    for z0, z1, m0, m1 in problem_blocks(Z, N, N, acc, _DENSE_TENSORS):
        p, s = _probabilities(q[z0:z1, m0:m1].to(acc), k[z0:z1].to(acc), lg[z0:z1], dist(m0, m1), scale)
        lse[z0:z1, m0:m1] = lse_from_softmax(p, s)
        del s
        probs_times_values(p, v[z0:z1], out[z0:z1, m0:m1])
    return out, lse


def grid_attention_bwd(dout, q, k, v, out, lse, log_gamma, Y: int, X: int, scale: float):
    """Gradients (dq, dk, dv, dlog_gamma[Z]) of grid_attention_fwd; dq/dk/dv in the input dtypes
    (out and lse are not needed: the probabilities are recomputed and softmax's backward forms
    rowsum(dP * P))."""
    Z, N, _ = q.shape
    acc = acc_dtype(q.dtype)
    dist = _distance(Y, X, q.device, acc)
    lg = log_gamma.to(acc)
    dq = torch.empty(Z, N, q.shape[-1], device=q.device, dtype=acc)
    dk = torch.empty(Z, N, k.shape[-1], device=q.device, dtype=acc)
    dv = torch.empty(Z, N, v.shape[-1], device=q.device, dtype=acc)
    dlg = torch.zeros(Z, device=q.device, dtype=acc)
    for z0, z1, m0, m1 in problem_blocks(Z, N, N, acc, _DENSE_TENSORS):
        qb, kb, vb = q[z0:z1, m0:m1].to(acc), k[z0:z1].to(acc), v[z0:z1].to(acc)
        dob = dout[z0:z1, m0:m1].to(acc)
        dist_b = dist(m0, m1)
        p, s = _probabilities(qb, kb, lg[z0:z1], dist_b, scale)
        del s
        # the first row block of these problems starts dk and dv
        ds = block_backward(p, qb, kb, vb, dob, scale, dq[z0:z1, m0:m1], dk[z0:z1], dv[z0:z1], first=m0 == 0)
        del p
        # dL/dlog_gamma of each problem: sum(dS * distance), as one matrix-vector product
        dlg[z0:z1] += ds.reshape(z1 - z0, -1) @ dist_b.reshape(-1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlg


# ---------------------------------------------------------------- the whole op from axis passes
#
# A pass attends within problems of a (B, heads, H, W, .) grid along `axis`:
#   None: the full H x W grid (Z = B*heads problems, (Y, X) = (H, W));
#   "w":  along W inside every row (Z = B*heads*H, (Y, X) = (1, W));
#   "h":  along H inside every column (Z = B*heads*W, (Y, X) = (1, H)).
# Backends that implement one pass (pass_fwd(q, k, v, log_gamma, scale, axis) -> (out, lse),
# pass_bwd(dout, q, k, v, out, lse, log_gamma, scale, axis) -> (dq, dk, dv, dlog_gamma))
# get the whole op's contract from TwoPass.


def _problems(t: torch.Tensor, axis):
    """t (B, heads, H, W, f) -> (Z, N, f) problems of the pass, and the problems per (b, head)."""
    B, heads, H, W, f = t.shape
    if axis is None:
        return t.reshape(B * heads, H * W, f), 1
    if axis == "w":
        return t.reshape(B * heads * H, W, f), H
    return t.transpose(2, 3).reshape(B * heads * W, H, f), W


def _grid(t: torch.Tensor, shape, axis) -> torch.Tensor:
    """Inverse of _problems for a (Z, N, f) result; contiguous."""
    B, heads, H, W = shape[:4]
    if axis == "h":
        return t.reshape(B, heads, W, H, -1).transpose(2, 3).contiguous()
    return t.reshape(B, heads, H, W, -1)


def _yx(shape, axis):
    H, W = shape[2], shape[3]
    return (H, W) if axis is None else (1, W if axis == "w" else H)


def pass_fwd(q, k, v, log_gamma, scale: float, axis):
    """One attention pass of the "torch" backend -> (out, lse) on the (B, heads, H, W) grid."""
    B, heads = q.shape[:2]
    (qz, R), (kz, _), (vz, _) = _problems(q, axis), _problems(k, axis), _problems(v, axis)
    lg = log_gamma.repeat_interleave(R).repeat(B)
    out, lse = grid_attention_fwd(qz, kz, vz, lg, *_yx(q.shape, axis), scale)
    return _grid(out, q.shape, axis), _grid(lse[..., None], q.shape, axis)[..., 0]


def pass_bwd(dout, q, k, v, out, lse, log_gamma, scale: float, axis):
    B, heads = q.shape[:2]
    prob = lambda t: _problems(t, axis)[0]
    R = _problems(q, axis)[1]
    lg = log_gamma.repeat_interleave(R).repeat(B)
    dq, dk, dv, dlg = grid_attention_bwd(prob(dout), prob(q), prob(k), prob(v), prob(out),
                                         prob(lse[..., None])[..., 0], lg, *_yx(q.shape, axis), scale)
    return (_grid(dq, q.shape, axis), _grid(dk, k.shape, axis), _grid(dv, v.shape, axis),
            dlg.reshape(B, heads, R).sum(dim=(0, 2)))


class TwoPass:
    """The whole-op backend contract (vitattn/ops/masa/backends.py) from one-pass functions:
    full form = one pass over the grid; decomposed = the "w" pass, then the "h" pass over its
    output, and backward in reverse with the two passes' dq, dk and dlog_gamma summed."""

    def __init__(self, fwd, bwd):
        self.pass_fwd, self.pass_bwd = fwd, bwd

    def fwd(self, q, k, v, log_gamma, scale: float, decomposed: bool):
        if not decomposed:
            out, lse = self.pass_fwd(q, k, v, log_gamma, scale, None)
            return out, out.new_empty((0,)), lse, lse.new_empty((0,))
        v_mid, lse_w = self.pass_fwd(q, k, v, log_gamma, scale, "w")
        out, lse_h = self.pass_fwd(q, k, v_mid, log_gamma, scale, "h")
        return out, v_mid, lse_w, lse_h

    def bwd(self, dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h, scale: float, decomposed: bool):
        if not decomposed:
            return self.pass_bwd(dout, q, k, v, out, lse_w, log_gamma, scale, None)
        dq_h, dk_h, dv_mid, dlg_h = self.pass_bwd(dout, q, k, v_mid, out, lse_h, log_gamma, scale, "h")
        dq_w, dk_w, dv, dlg_w = self.pass_bwd(dv_mid, q, k, v, v_mid, lse_w, log_gamma, scale, "w")
        acc = acc_dtype(q.dtype)
        dq = (dq_h.to(acc) + dq_w.to(acc)).to(q.dtype)
        dk = (dk_h.to(acc) + dk_w.to(acc)).to(k.dtype)
        return dq, dk, dv, dlg_h.to(acc) + dlg_w.to(acc)


TORCH = TwoPass(pass_fwd, pass_bwd)
