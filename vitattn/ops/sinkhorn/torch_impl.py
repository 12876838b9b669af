"""Memory-bounded PyTorch backend for Sinkhorn OT aggregation (the "torch" backend).

Problems (one per (batch, head), or per leading index of a scores tensor) are processed
in chunks whose (chunk, n, m) intermediates hold about VITATTN_DENSE_BUDGET_MB / 4. The forward
keeps only the column potentials g_t of every iteration (O(iters * m) per problem); the
row potentials are a function of the previous column potentials
(f_t = log a - LSE_j(K + g_{t-1})) and are recomputed. The backward is the exact
gradient of the unrolled loop, written out by hand and run in reverse:

    R_t = exp(K + g_{t-1} + f_t - log a)   (row-softmax, rows sum to 1)
    C_t = exp(K + f_t + g_t - log b)       (column-softmax, columns sum to 1)
    P   = exp(K + f_T + g_T),  W = dP * P
    dK = W,  df_T = rowsum W,  dg_T = colsum W
    for t = T..1:  dK -= C_t * dg_t;  df_t -= C_t dg_t;         dlog b += dg_t
                   dK -= R_t * df_t;  dg_{t-1} = -R_t^T df_t;   dlog a += df_t

Scores come from one of two sources: a dense (Z, n, m) tensor (``sinkhorn``) or
``filter * (x . ref^T)`` formed per chunk (``ot_aggregate`` / ``ot_attention``), so the
latter never stores more than one chunk of scores.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._dtypes import acc_dtype
from ..._tiles import dense_elems



def _chunks(Z: int, n: int, m: int, dtype: torch.dtype):
    zc = max(1, dense_elems(dtype, 4) // max(1, n * m))
    for z0 in range(0, Z, zc):
        yield z0, min(Z, z0 + zc)


def _iterate(K: Tensor, la: Tensor, lb: Tensor, iters: int) -> Tuple[Tensor, Tensor]:
    """Run the loop on K (zc, n, m); return (G (zc, iters, m) of g_1..g_T, f_T (zc, n))."""
    zc, n, m = K.shape
    G = K.new_empty(zc, iters, m)
    g = K.new_zeros(zc, m)
    f = None
    for t in range(iters):
        f = la - torch.logsumexp(K + g[:, None, :], dim=-1)
        g = lb - torch.logsumexp(K + f[:, :, None], dim=-2)
        G[:, t] = g
    return G, f


def _row_pot(K: Tensor, g_prev: Tensor, la: Tensor) -> Tensor:
    return la - torch.logsumexp(K + g_prev[:, None, :], dim=-1)


def _unroll_bwd(K: Tensor, W: Tensor, G: Tensor, la: Tensor, lb: Tensor):
    """Reverse pass of the loop. K, W (zc, n, m); G (zc, T, m). Returns dK, dla (zc, n), dlb (zc, m)."""
    zc, n, m = K.shape
    iters = G.shape[1]
    dK = W.clone()
    df = W.sum(-1)
    dg = W.sum(-2)
    dla = torch.zeros_like(df)
    dlb = torch.zeros_like(dg)
    zero = K.new_zeros(zc, m)
    for t in range(iters - 1, -1, -1):
        g_prev = G[:, t - 1] if t > 0 else zero
        f = _row_pot(K, g_prev, la)
        C = torch.exp(K + f[:, :, None] + (G[:, t] - lb)[:, None, :])
        Cdg = C * dg[:, None, :]
        dK -= Cdg
        df = df - Cdg.sum(-1)
        dlb += dg
        R = torch.exp(K + g_prev[:, None, :] + (f - la)[:, :, None])
        Rdf = R * df[:, :, None]
        dK -= Rdf
        dla += df
        dg = -Rdf.sum(-2)
        df = torch.zeros_like(df)
    return dK, dla, dlb


# ---------------------------------------------------------------- sinkhorn (dense scores)


def sinkhorn_fwd(S: Tensor, la: Tensor, lb: Tensor, eps: float, iters: int) -> Tuple[Tensor, Tensor]:
    """S (Z, n, m), la (Z, n), lb (Z, m) (accumulation dtype) -> plan (Z, n, m) in S.dtype, G (Z, iters, m)."""
    Z, n, m = S.shape
    acc = acc_dtype(S.dtype)
    P = torch.empty(Z, n, m, device=S.device, dtype=S.dtype)
    G = torch.empty(Z, iters, m, device=S.device, dtype=acc)
    for z0, z1 in _chunks(Z, n, m, acc):
        K = S[z0:z1].to(acc) / eps
        Gc, f = _iterate(K, la[z0:z1], lb[z0:z1], iters)
        G[z0:z1] = Gc
        P[z0:z1] = torch.exp(K + f[:, :, None] + Gc[:, -1][:, None, :]).to(S.dtype)
    return P, G


def sinkhorn_bwd(dP: Tensor, S: Tensor, la: Tensor, lb: Tensor, G: Tensor, eps: float):
    """Gradients (dS in S.dtype, dla (Z, n), dlb (Z, m) in the accumulation dtype)."""
    Z, n, m = S.shape
    acc = acc_dtype(S.dtype)
    dS = torch.empty(Z, n, m, device=S.device, dtype=S.dtype)
    dla = torch.empty(Z, n, device=S.device, dtype=acc)
    dlb = torch.empty(Z, m, device=S.device, dtype=acc)
    iters = G.shape[1]
    for z0, z1 in _chunks(Z, n, m, acc):
        K = S[z0:z1].to(acc) / eps
        g_prev = G[z0:z1, iters - 2] if iters > 1 else K.new_zeros(z1 - z0, m)
        f = _row_pot(K, g_prev, la[z0:z1])
        P = torch.exp(K + f[:, :, None] + G[z0:z1, -1][:, None, :])
        dK, dla[z0:z1], dlb[z0:z1] = _unroll_bwd(K, dP[z0:z1].to(acc) * P, G[z0:z1], la[z0:z1], lb[z0:z1])
        dS[z0:z1] = (dK / eps).to(S.dtype)
    return dS, dla, dlb


# ---------------------------------------------------------------- ot_aggregate / ot_attention


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def _scores(x: Tensor, ref: Tensor, filt: Optional[Tensor], heads: int, z0: int, z1: int, acc) -> Tensor:
    """filter * (x . ref^T) for the flattened problems z0:z1 of x (Z, n, d); ref (heads, m, d)."""
    idx = torch.arange(z0, z1, device=x.device) % heads
    S = torch.bmm(x[z0:z1].to(acc), ref[idx].to(acc).transpose(1, 2))
    return S if filt is None else S * filt.to(acc)


def _marginals(n: int, m: int, zc: int, device, acc):
    la = torch.full((zc, n), float(m) / n, device=device, dtype=acc).log_()
    lb = torch.zeros(zc, m, device=device, dtype=acc)
    return la, lb


def ot_fwd(x: Tensor, ref: Tensor, v: Tensor, filt: Optional[Tensor], eps: float, iters: int, attention: bool):
    """x (B, heads, n, d), ref (heads, m, d), v (B, heads, n, dv) -> (out, z, G).

    out: (B, heads, m, dv) for aggregation or (B, heads, n, dv) for attention, in x.dtype;
    z: the aggregate (B, heads, m, dv) in the accumulation dtype (attention only, else empty);
    G: (B, heads, iters, m) column potentials.
    """
    B, heads, n, d = x.shape
    m, dv = ref.shape[1], v.shape[-1]
    acc = acc_dtype(x.dtype)
    xf, vf = _flat(x), _flat(v)
    Z = xf.shape[0]
    G = torch.empty(Z, iters, m, device=x.device, dtype=acc)
    zbuf = torch.empty(Z, m, dv, device=x.device, dtype=acc) if attention else x.new_empty((0,), dtype=acc)
    out = torch.empty(Z, n if attention else m, dv, device=x.device, dtype=x.dtype)
    for z0, z1 in _chunks(Z, n, m, acc):
        K = _scores(xf, ref, filt, heads, z0, z1, acc) / eps
        la, lb = _marginals(n, m, z1 - z0, x.device, acc)
        Gc, f = _iterate(K, la, lb, iters)
        G[z0:z1] = Gc
        T = torch.exp(K + f[:, :, None] + Gc[:, -1][:, None, :])
        if filt is not None:
            T = T * filt.to(acc)
        z = torch.bmm(T.transpose(1, 2), vf[z0:z1].to(acc))
        if attention:
            zbuf[z0:z1] = z
            out[z0:z1] = ((n / m) * torch.bmm(T, z)).to(x.dtype)
        else:
            out[z0:z1] = z.to(x.dtype)
    G = G.reshape(B, heads, iters, m)
    if attention:
        zbuf = zbuf.reshape(B, heads, m, dv)
    return out.reshape(B, heads, -1, dv), zbuf, G


def ot_bwd(dout: Tensor, x: Tensor, ref: Tensor, v: Tensor, filt: Optional[Tensor], z: Tensor, G: Tensor,
           eps: float, attention: bool):
    """Gradients (dx, dref, dv) of ot_fwd, in the input dtypes."""
    B, heads, n, d = x.shape
    m, dv = ref.shape[1], v.shape[-1]
    acc = acc_dtype(x.dtype)
    xf, vf, dof = _flat(x), _flat(v), _flat(dout)
    Gf = G.reshape(-1, G.shape[-2], m)
    zf = z.reshape(-1, m, dv) if attention else None
    Z = xf.shape[0]
    iters = Gf.shape[1]
    dx = torch.empty(Z, n, d, device=x.device, dtype=acc)
    dvv = torch.empty(Z, n, dv, device=x.device, dtype=acc)
    dref_per = torch.zeros(Z, m, d, device=x.device, dtype=acc)
    c = n / m
    for z0, z1 in _chunks(Z, n, m, acc):
        idx = torch.arange(z0, z1, device=x.device) % heads
        K = _scores(xf, ref, filt, heads, z0, z1, acc) / eps
        la, lb = _marginals(n, m, z1 - z0, x.device, acc)
        g_prev = Gf[z0:z1, iters - 2] if iters > 1 else K.new_zeros(z1 - z0, m)
        f = _row_pot(K, g_prev, la)
        P = torch.exp(K + f[:, :, None] + Gf[z0:z1, -1][:, None, :])
        T = P if filt is None else P * filt.to(acc)
        vb, dob = vf[z0:z1].to(acc), dof[z0:z1].to(acc)
        if attention:
            # out = c T zeta, zeta = T^T v: dzeta = c T^T dout, dT = c dout zeta^T + v dzeta^T
            dzeta = c * torch.bmm(T.transpose(1, 2), dob)
            dT = c * torch.bmm(dob, zf[z0:z1].transpose(1, 2)) + torch.bmm(vb, dzeta.transpose(1, 2))
            dvv[z0:z1] = torch.bmm(T, dzeta)
        else:
            dT = torch.bmm(vb, dob.transpose(1, 2))
            dvv[z0:z1] = torch.bmm(T, dob)
        dP = dT if filt is None else dT * filt.to(acc)
        dK, _, _ = _unroll_bwd(K, dP * P, Gf[z0:z1], la, lb)
        dS = dK / eps
        if filt is not None:
            dS = dS * filt.to(acc)
        dx[z0:z1] = torch.bmm(dS, ref[idx].to(acc))
        dref_per[z0:z1] = torch.bmm(dS.transpose(1, 2), xf[z0:z1].to(acc))
    dref = dref_per.reshape(B, heads, m, d).sum(0)
    return (dx.reshape(x.shape).to(x.dtype), dref.to(ref.dtype), dvv.reshape(v.shape).to(v.dtype))
