"""Dense softmax-attention blocks shared by the "torch" backends (MaSA, group attention).

Each backend forms its own logits s and probabilities p = softmax(s) for a block of problems
and query rows (MaSA adds its decay bias); what follows is the same for both and lives here.
"""

from __future__ import annotations

import torch


def lse_from_softmax(p: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Per-row log-sum-exp of the logits s from softmax(s) = p: at the row maximum
    p = exp(0) / rowsum, so lse = max + log(rowsum) = max - log(p there) (no second
    exponential pass)."""
    mx, at = s.max(dim=-1, keepdim=True)
    return (mx - torch.log(p.gather(-1, at)))[..., 0]


def probs_times_values(p: torch.Tensor, vb: torch.Tensor, ob: torch.Tensor) -> None:
    """ob = p @ vb, written into ob (a slice of the output) without a temporary where it can."""
    if p.dtype == ob.dtype and ob.is_contiguous():
        torch.bmm(p, vb, out=ob)
    else:
        ob.copy_(torch.bmm(p, vb.to(p.dtype)))


def block_backward(p, qb, kb, vb, dob, scale: float, dq_b, dk_b, dv_b, first: bool) -> torch.Tensor:
    """Gradients of out = softmax(scale q k^T + bias) v for one block (all in the accumulation
    dtype): writes dq_b, starts (first row block of these problems) or adds to dk_b and dv_b,
    and returns dS, the gradient of the logits (softmax's fused backward forms rowsum(dP * P))."""
    if first:
        torch.bmm(p.transpose(1, 2), dob, out=dv_b)
    else:
        dv_b.baddbmm_(p.transpose(1, 2), dob)
    ds = torch._softmax_backward_data(torch.bmm(dob, vb.transpose(1, 2)), p, -1, p.dtype)
    torch.bmm(ds, kb, out=dq_b)
    dq_b.mul_(scale)
    if first:
        torch.baddbmm(dk_b, ds.transpose(1, 2), qb, beta=0.0, alpha=scale, out=dk_b)
    else:
        dk_b.baddbmm_(ds.transpose(1, 2), qb, alpha=scale)
    return ds
