"""Memory-bounded PyTorch backend for group attention (the "torch" backend).

The tokens are gathered once into permuted order (one copy of q, k, v, as SReT
does), the Z = B * heads * groups problems of n = N / groups tokens are solved a
chunk at a time so that the logits blocks fit VITATTN_DENSE_BUDGET_MB, and the
results are scattered back into the original order. Forward returns per-token
log-sum-exp statistics (original token order); backward recomputes the
probabilities from them.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..._dtypes import acc_dtype
from ..._tiles import problem_blocks


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


def group_attention_fwd(q, k, v, perm: Optional[torch.Tensor], groups: int, scale: float):
    """-> out (B, heads, N, dv) in q.dtype, lse (B, heads, N) fp32/fp64, original token order."""
    acc = acc_dtype(q.dtype)
    qp, kp, vp = (_gather(t, perm, groups) for t in (q, k, v))
    Z, n, _ = qp.shape
    out = torch.empty(Z, n, vp.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(Z, n, device=q.device, dtype=acc)
    for z0, z1, m0, m1 in problem_blocks(Z, n, n, acc):
        s = torch.bmm(qp[z0:z1, m0:m1].to(acc), kp[z0:z1].to(acc).transpose(1, 2)) * scale
        m = torch.logsumexp(s, dim=-1)
        out[z0:z1, m0:m1] = torch.bmm(torch.exp(s - m[..., None]), vp[z0:z1].to(acc)).to(q.dtype)
        lse[z0:z1, m0:m1] = m
    return _scatter(out, perm, q.shape), _scatter(lse[..., None], perm, q.shape)[..., 0]


def group_attention_bwd(dout, q, k, v, out, lse, perm: Optional[torch.Tensor], groups: int, scale: float):
    """Gradients (dq, dk, dv) of group_attention_fwd in the input dtypes."""
    acc = acc_dtype(q.dtype)
    qp, kp, vp, dop = (_gather(t, perm, groups) for t in (q, k, v, dout))
    lsep = _gather(lse[..., None], perm, groups)[..., 0]
    # delta_i = rowsum(dO_i * O_i) is per token, so it is formed before the gather
    deltap = _gather((dout.to(acc) * out.to(acc)).sum(-1, keepdim=True), perm, groups)[..., 0]
    Z, n, _ = qp.shape
    dq = torch.empty(Z, n, q.shape[-1], device=q.device, dtype=acc)
    dk = torch.zeros(Z, n, k.shape[-1], device=q.device, dtype=acc)
    dv = torch.zeros(Z, n, v.shape[-1], device=q.device, dtype=acc)
    for z0, z1, m0, m1 in problem_blocks(Z, n, n, acc):
        qb, kb, vb = qp[z0:z1, m0:m1].to(acc), kp[z0:z1].to(acc), vp[z0:z1].to(acc)
        dob = dop[z0:z1, m0:m1].to(acc)
        s = torch.bmm(qb, kb.transpose(1, 2)) * scale
        p = torch.exp(s - lsep[z0:z1, m0:m1, None].to(acc))
        dv[z0:z1] += torch.bmm(p.transpose(1, 2), dob)
        ds = p * (torch.bmm(dob, vb.transpose(1, 2)) - deltap[z0:z1, m0:m1, None])
        dq[z0:z1, m0:m1] = scale * torch.bmm(ds, kb)
        dk[z0:z1] += scale * torch.bmm(ds.transpose(1, 2), qb)
    return (_scatter(dq, perm, q.shape).to(q.dtype), _scatter(dk, perm, q.shape).to(k.dtype),
            _scatter(dv, perm, q.shape).to(v.dtype))
