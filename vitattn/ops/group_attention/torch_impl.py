"""PyTorch backend for group attention (the "torch" backend): dense math under a memory budget.

The tokens are gathered once into permuted order (one copy of q, k, v, as SReT does) and the
Z = B * heads * groups problems of n = N / groups tokens are solved with the same dense
operations the official code uses -- one batched GEMM for the logits (the scale folded into
it), one fused softmax, one batched GEMM for the output -- on as many whole problems at once
as fit VITATTN_DENSE_BUDGET_MB (vitattn._tiles.problem_blocks; rows of one problem above
it). The results are scattered back into the original order. The forward's per-token
log-sum-exp (max + log of the row sum) comes from the softmax's own output at the row's
maximum (p = 1 / rowsum there), not from a second exponential pass; the backward recomputes
the probabilities with the same fused softmax (rows normalised by their sum: exact even where
exp(s - lse) would lose precision at large logits) and uses softmax's fused backward.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._dtypes import acc_dtype
from ..._tiles import problem_blocks
from .._dense import block_backward, lse_from_softmax, probs_times_values

# dense intermediates alive at once per block (logits, probabilities, their gradient, slack)
_DENSE_TENSORS = 3


def _gather(x: torch.Tensor, perm: Optional[torch.Tensor], groups: int) -> torch.Tensor:
    """(B, heads, N, f) -> (B * heads * groups, n, f), tokens in permuted order."""
    B, H, N, f = x.shape
    if perm is not None:
        x = x.index_select(2, perm)
    return x.reshape(B * H * groups, N // groups, f)


def _scatter(xp: torch.Tensor, perm: Optional[torch.Tensor], shape) -> torch.Tensor:
    """Inverse of _gather: (Z, n, f) in permuted order -> (B, heads, N, f) in original order."""
    B, H, N = shape[:3]
    xp = xp.reshape(B, H, N, -1)
    if perm is None:
        return xp
    out = torch.empty_like(xp)
    out.index_copy_(2, perm, xp)
    return out


def _probabilities(qb: torch.Tensor, kb: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * qb kb^T) over the keys: one GEMM with the scale folded in, one softmax."""
    s = torch.baddbmm(qb.new_empty(()).expand(qb.shape[0], qb.shape[1], kb.shape[1]), qb, kb.transpose(1, 2),
                      beta=0.0, alpha=scale)
    return torch.softmax(s, dim=-1), s


def group_attention_fwd(q, k, v, perm: Optional[torch.Tensor], groups: int, scale: float):
    """-> out (B, heads, N, dv) in q.dtype, lse (B, heads, N) fp32/fp64, original token order."""
    acc = acc_dtype(q.dtype)
    qp, kp, vp = (_gather(t, perm, groups) for t in (q, k, v))
    Z, n, _ = qp.shape
    out = torch.empty(Z, n, vp.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(Z, n, device=q.device, dtype=acc)
    for z0, z1, m0, m1 in problem_blocks(Z, n, n, acc, _DENSE_TENSORS):
        p, s = _probabilities(qp[z0:z1, m0:m1].to(acc), kp[z0:z1].to(acc), scale)
        lse[z0:z1, m0:m1] = lse_from_softmax(p, s)
        del s
        probs_times_values(p, vp[z0:z1], out[z0:z1, m0:m1])
    return _scatter(out, perm, q.shape), _scatter(lse[..., None], perm, q.shape)[..., 0]


def group_attention_bwd(dout, q, k, v, out, lse, perm: Optional[torch.Tensor], groups: int, scale: float):
    """Gradients (dq, dk, dv) of group_attention_fwd in the input dtypes (out and lse are not
    needed: the probabilities are recomputed and softmax's backward forms rowsum(dP * P))."""
    acc = acc_dtype(q.dtype)
    qp, kp, vp, dop = (_gather(t, perm, groups) for t in (q, k, v, dout))
    Z, n, _ = qp.shape
    dq = torch.empty(Z, n, q.shape[-1], device=q.device, dtype=acc)
    dk = torch.empty(Z, n, k.shape[-1], device=q.device, dtype=acc)
    dv = torch.empty(Z, n, v.shape[-1], device=q.device, dtype=acc)
    for z0, z1, m0, m1 in problem_blocks(Z, n, n, acc, _DENSE_TENSORS):
        qb, kb, vb = qp[z0:z1, m0:m1].to(acc), kp[z0:z1].to(acc), vp[z0:z1].to(acc)
        dob = dop[z0:z1, m0:m1].to(acc)
        p, s = _probabilities(qb, kb, scale)
        del s
        # the first row block of these problems starts dk and dv
        block_backward(p, qb, kb, vb, dob, scale, dq[z0:z1, m0:m1], dk[z0:z1], dv[z0:z1], first=m0 == 0)
    return (_scatter(dq, perm, q.shape).to(q.dtype), _scatter(dk, perm, q.shape).to(k.dtype),
            _scatter(dv, perm, q.shape).to(v.dtype))
