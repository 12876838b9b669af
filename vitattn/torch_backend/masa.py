"""Memory-bounded PyTorch backend for MaSA (the "torch" backend).

Flash-attention math in plain PyTorch: logits are formed one block of queries
(and one chunk of problems) at a time, so no N x N tensor exists for large N.
Forward returns per-row log-sum-exp statistics; backward recomputes the
probabilities from them.

Both forms reduce to one primitive, *grid attention*: Z independent problems,
each attending over the N = Y * X tokens of a Y x X grid with the decay
log(gamma) * (|dy| + |dx|). The full form is Z = B*heads, (Y, X) = (H, W); a
decomposed axis pass is Z = B*heads*rows, (Y, X) = (1, L).
"""

from __future__ import annotations

from typing import Tuple

import torch

# Elements of one logits block (chunk of problems x query block x N keys); 2**22
# fp32 elements is 16 MiB per intermediate.
BLOCK_ELEMS = 1 << 22


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coords(Y: int, X: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    n = torch.arange(Y * X, device=device)
    return (n // X).to(dtype), (n % X).to(dtype)


def _blocks(Z: int, N: int):
    """Yield (z0, z1, m0, m1) tiles whose logits block has at most ~BLOCK_ELEMS elements."""
    per_problem = N * N
    if per_problem <= BLOCK_ELEMS:
        zc = max(1, BLOCK_ELEMS // per_problem)
        for z0 in range(0, Z, zc):
            yield z0, min(Z, z0 + zc), 0, N
    else:
        mc = max(1, BLOCK_ELEMS // N)
        for z in range(Z):
            for m0 in range(0, N, mc):
                yield z, z + 1, m0, min(N, m0 + mc)


def grid_attention_fwd(q, k, v, log_gamma, Y: int, X: int, scale: float):
    """q, k: (Z, N, d); v: (Z, N, dv); log_gamma: (Z,) -> out (Z, N, dv) in q.dtype, lse (Z, N) fp32/fp64."""
    Z, N, _ = q.shape
    acc = _acc(q.dtype)
    yy, xx = _coords(Y, X, q.device, acc)
    lg = log_gamma.to(acc)
    out = torch.empty(Z, N, v.shape[-1], device=q.device, dtype=q.dtype)
    lse = torch.empty(Z, N, device=q.device, dtype=acc)
    for z0, z1, m0, m1 in _blocks(Z, N):
        qb, kb, vb = q[z0:z1, m0:m1].to(acc), k[z0:z1].to(acc), v[z0:z1].to(acc)
        dist = (yy[m0:m1, None] - yy[None]).abs() + (xx[m0:m1, None] - xx[None]).abs()
        s = torch.baddbmm(lg[z0:z1, None, None] * dist, qb, kb.transpose(1, 2), alpha=scale)
        # normalise by the row sum, not by exp(-lse): lse ~ 1e4 carries a rounding error of
        # ~1e-3 in fp32 that would mis-scale the output (and the backward's rowsum(dO * O))
        mx = s.amax(dim=-1, keepdim=True)
        e = torch.exp(s - mx)
        l = e.sum(dim=-1, keepdim=True)
        out[z0:z1, m0:m1] = (torch.bmm(e, vb) / l).to(q.dtype)
        lse[z0:z1, m0:m1] = (mx + torch.log(l)).squeeze(-1)
    return out, lse


def grid_attention_bwd(dout, q, k, v, out, lse, log_gamma, Y: int, X: int, scale: float):
    """Gradients (dq, dk, dv, dlog_gamma[Z]) of grid_attention_fwd; dq/dk/dv in the input dtypes."""
    Z, N, _ = q.shape
    acc = _acc(q.dtype)
    yy, xx = _coords(Y, X, q.device, acc)
    lg = log_gamma.to(acc)
    delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (Z, N): rowsum(dO * O)
    dq = torch.empty(Z, N, q.shape[-1], device=q.device, dtype=acc)
    dk = torch.zeros(Z, N, k.shape[-1], device=q.device, dtype=acc)
    dv = torch.zeros(Z, N, v.shape[-1], device=q.device, dtype=acc)
    dlg = torch.zeros(Z, device=q.device, dtype=acc)
    for z0, z1, m0, m1 in _blocks(Z, N):
        qb, kb, vb = q[z0:z1, m0:m1].to(acc), k[z0:z1].to(acc), v[z0:z1].to(acc)
        dob = dout[z0:z1, m0:m1].to(acc)
        dist = (yy[m0:m1, None] - yy[None]).abs() + (xx[m0:m1, None] - xx[None]).abs()
        s = torch.baddbmm(lg[z0:z1, None, None] * dist, qb, kb.transpose(1, 2), alpha=scale)
        p = torch.exp(s - lse[z0:z1, m0:m1, None].to(acc))
        dv[z0:z1] += torch.bmm(p.transpose(1, 2), dob)
        ds = p * (torch.bmm(dob, vb.transpose(1, 2)) - delta[z0:z1, m0:m1, None])
        dq[z0:z1, m0:m1] = scale * torch.bmm(ds, kb)
        dk[z0:z1] += scale * torch.bmm(ds.transpose(1, 2), qb)
        dlg[z0:z1] += (ds * dist).sum((1, 2))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dlg
