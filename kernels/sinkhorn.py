"""Triton kernels for log-domain Sinkhorn and OTKE aggregation (issue 3).

One program owns one problem (one (batch, head), or one leading index of a scores
tensor) and runs every iteration in a single launch, streaming the n x m scores in
tiles of BLOCK_N rows by all (<= 256) columns. The column potential g (m floats)
lives in registers; one sweep over the rows does a whole iteration, because the row
update of a tile needs only g_{t-1} and its rows, and the new row potentials f_t of
the tile feed an online (running max / running sum) column log-sum-exp that yields
g_t at the end of the sweep. The last sweep also accumulates, with the same running
rescale, sum_i exp(K_ij + f_i) v_i, which is the aggregate up to exp(g_j).

Scores come either from a dense (Z, n, m) tensor (FROM_X=False, ``sinkhorn``) or are
recomputed per tile as filter * (x . ref^T) (FROM_X=True, ``ot_*``), so nothing of
size n x m is ever written by the ot kernels. MODE selects the output:
0 the plan, 1 the aggregate (m, dv), 2 attention (n/m) T (T^T v) (one more sweep).

The forward saves only g_1..g_T (O(iters * m) per problem); f_t is recomputed from
g_{t-1}. The backward is the exact gradient of the unrolled loop (see
vitattn/torch_backend/sinkhorn.py for the recurrence): one sweep to form
W = dP * P and dg_T, then one sweep per iteration in reverse, each rebuilding its
tile of scores, the column-softmax C_t and row-softmax R_t, and adding its share of
dK to dS (dense mode) or to dx / dref (x mode). Gradient buffers are owned by one
program each and updated in a fixed order: no atomics, deterministic.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

NEG = tl.constexpr(float("-inf"))

# Under TRITON_INTERPRET=1 every call of a @triton.jit device function re-patches
# triton.language (about 1 ms per call), which dominated the test time. There the
# helpers below run as plain Python functions inside the kernel, which has already
# patched the language; compiled kernels get ordinary @triton.jit device functions.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device(fn):
    return fn if _INTERPRET else triton.jit(fn)


# Reductions: tl.sum / tl.max are themselves jit functions (same per-call cost under the
# interpreter); there they go straight to tl.reduce with Triton's own combine functions,
# which the interpreter maps onto numpy.
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", None)
_MAX_COMBINE = getattr(tl.standard, "_elementwise_max", None)

if _INTERPRET and _SUM_COMBINE is not None and _MAX_COMBINE is not None:
    def _rsum(x, AXIS):
        return tl.reduce(x, AXIS, _SUM_COMBINE)

    def _rmax(x, AXIS):
        return tl.reduce(x, AXIS, _MAX_COMBINE)
else:
    @triton.jit
    def _rsum(x, AXIS: tl.constexpr):
        return tl.sum(x, AXIS)

    @triton.jit
    def _rmax(x, AXIS: tl.constexpr):
        return tl.max(x, AXIS)


# ---------------------------------------------------------------- tile helpers


@_device
def _row_tile(base, s_r, s_c, offs_r, offs_c, R, C, ACC: tl.constexpr):
    ptrs = base + offs_r[:, None] * s_r + offs_c[None, :] * s_c
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@_device
def _store_tile(base, s_r, s_c, offs_r, offs_c, R, C, val, ADD: tl.constexpr):
    ptrs = base + offs_r[:, None] * s_r + offs_c[None, :] * s_c
    mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
    if ADD:
        val = val + tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=mask)


@_device
def _scores(s_base, s_sn, s_sm, x_t, ref, f_base, s_fn, s_fm, offs_n, offs_m, N, M, inv_eps,
            FROM_X: tl.constexpr, HAS_F: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """(K, F): K = F * S / eps for a tile of rows (F = 1 without a filter)."""
    if FROM_X:
        s = tl.dot(x_t, tl.trans(ref), input_precision=PREC, out_dtype=ACC)
    else:
        s = _row_tile(s_base, s_sn, s_sm, offs_n, offs_m, N, M, ACC)
    if HAS_F:
        filt = _row_tile(f_base, s_fn, s_fm, offs_n, offs_m, N, M, ACC)
    else:
        filt = tl.full(s.shape, 1.0, ACC)
    return filt * s * inv_eps, filt


@_device
def _row_pot(K, g, la, col_ok):
    """f = log a - LSE_j(K + g) for a tile of rows (padded columns excluded)."""
    z = tl.where(col_ok[None, :], K + g[None, :], NEG)
    mx = _rmax(z, 1)
    return la - (mx + tl.log(_rsum(tl.exp(z - mx[:, None]), 1)))


@_device
def _masked_exp(arg, ok):
    """exp on the valid entries, 0 on padding (whose potentials are meaningless and may overflow)."""
    return tl.exp(tl.where(ok, arg, NEG))


# ---------------------------------------------------------------- forward


@triton.jit
def _fwd_kernel(
    S, X, REF, V, FILT, OUT, ZB, G, LA, LB,
    s_sz, s_sn, s_sm,
    s_xb, s_xh, s_xn, s_xd,
    s_rh, s_rm, s_rd,
    s_vb, s_vh, s_vn, s_vd,
    s_fn, s_fm,
    s_ob, s_oh, s_or, s_oc,
    s_lz, s_ln, s_bz, s_bm,
    HEADS, N, M, D, DV, ITERS, SCAL,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    FROM_X: tl.constexpr, HAS_F: tl.constexpr, MODE: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # 1/eps and n/m come from a tensor so fp64 runs keep them exact (float args are fp32)
    inv_eps = tl.load(SCAL).to(ACC)
    c_att = tl.load(SCAL + 1).to(ACC)
    b = pid // HEADS
    h = pid % HEADS
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_m < M
    s_base = S + pid * s_sz
    x_base = X + b * s_xb + h * s_xh
    v_base = V + b * s_vb + h * s_vh
    la_base = LA + pid * s_lz
    lb = tl.load(LB + pid * s_bz + offs_m * s_bm, mask=col_ok, other=0.0).to(ACC)
    if FROM_X:
        ref = _row_tile(REF + h * s_rh, s_rm, s_rd, offs_m, offs_d, M, D, ACC)
    else:
        ref = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    g_base = G + pid * ITERS * M

    g_prev = tl.zeros([BLOCK_M], ACC)
    g = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    # the last sweep's column statistics are read after the loop: define them before it
    cmax = tl.full([BLOCK_M], NEG, ACC)
    csum = tl.zeros([BLOCK_M], ACC)
    for t in range(ITERS):
        g_prev = g
        cmax = tl.full([BLOCK_M], NEG, ACC)
        csum = tl.zeros([BLOCK_M], ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
        # only the last sweep aggregates (a runtime flag: one loop body for every sweep)
        last = t == ITERS - 1
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            row_ok = offs_n < N
            if FROM_X:
                x_t = _row_tile(x_base, s_xn, s_xd, offs_n, offs_d, N, D, ACC)
            else:
                x_t = tl.zeros([BLOCK_N, BLOCK_D], ACC)
            K, filt = _scores(s_base, s_sn, s_sm, x_t, ref, FILT, s_fn, s_fm, offs_n, offs_m, N, M,
                              inv_eps, FROM_X, HAS_F, ACC, PREC)
            la = tl.load(la_base + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
            f = _row_pot(K, g_prev, la, col_ok)
            zc = tl.where(row_ok[:, None], K + f[:, None], NEG)
            new = tl.maximum(cmax, _rmax(zc, 0))
            alpha = tl.exp(cmax - new)
            p = tl.exp(zc - new[None, :])
            csum = csum * alpha + _rsum(p, 0)
            if MODE != 0:
                if last:
                    v_t = _row_tile(v_base, s_vn, s_vd, offs_n, offs_dv, N, DV, ACC)
                    acc = acc * alpha[:, None] + tl.dot(tl.trans(p * filt), v_t, input_precision=PREC,
                                                        out_dtype=ACC)
            cmax = new
        g = lb - (cmax + tl.log(csum))
        tl.store(g_base + t * M + offs_m, g, mask=col_ok)

    o_base = OUT + b * s_ob + h * s_oh
    if MODE == 1:
        # out_j = exp(g_j + cmax_j) acc_j = b_j / csum_j * acc_j
        z = acc * (tl.exp(lb) / csum)[:, None]
        _store_tile(o_base, s_or, s_oc, offs_m, offs_dv, M, DV, z, False)
    else:
        if MODE == 2:
            z = acc * (tl.exp(lb) / csum)[:, None]
            _store_tile(ZB + pid * M * DV, DV, 1, offs_m, offs_dv, M, DV, z, False)
        # one more sweep writes the plan (MODE 0) or (n/m) T z (MODE 2)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            row_ok = offs_n < N
            if FROM_X:
                x_t = _row_tile(x_base, s_xn, s_xd, offs_n, offs_d, N, D, ACC)
            else:
                x_t = tl.zeros([BLOCK_N, BLOCK_D], ACC)
            K, filt = _scores(s_base, s_sn, s_sm, x_t, ref, FILT, s_fn, s_fm, offs_n, offs_m, N, M,
                              inv_eps, FROM_X, HAS_F, ACC, PREC)
            la = tl.load(la_base + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
            f = _row_pot(K, g_prev, la, col_ok)
            P = _masked_exp(K + f[:, None] + g[None, :], row_ok[:, None] & col_ok[None, :])
            if MODE == 0:
                _store_tile(o_base, s_or, s_oc, offs_n, offs_m, N, M, P, False)
            else:
                T = tl.where(col_ok[None, :], P * filt, 0.0)
                o = tl.dot(T, z, input_precision=PREC, out_dtype=ACC) * c_att
                _store_tile(o_base, s_or, s_oc, offs_n, offs_dv, N, DV, o, False)


# ---------------------------------------------------------------- backward


@_device
def _emit(dK, filt, inv_eps, x_t, ref, dref, ds_base, s_dn, s_dm, dx_base, s_gn, s_gd,
          offs_n, offs_m, offs_d, N, M, D,
          FIRST: tl.constexpr, FROM_X: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Add a tile's dK to the gradients: dS (dense) or dx and the dref accumulator (x mode)."""
    dS = dK * filt * inv_eps
    if FROM_X:
        dx = tl.dot(dS, ref, input_precision=PREC, out_dtype=ACC)
        if FIRST:
            _store_tile(dx_base, s_gn, s_gd, offs_n, offs_d, N, D, dx, False)
        else:
            _store_tile(dx_base, s_gn, s_gd, offs_n, offs_d, N, D, dx, True)
        dref += tl.dot(tl.trans(dS), x_t, input_precision=PREC, out_dtype=ACC)
    else:
        if FIRST:
            _store_tile(ds_base, s_dn, s_dm, offs_n, offs_m, N, M, dS, False)
        else:
            _store_tile(ds_base, s_dn, s_dm, offs_n, offs_m, N, M, dS, True)
    return dref


@triton.jit
def _bwd_kernel(
    S, X, REF, V, FILT, DOUT, ZB, G, LA, LB,
    DS, DX, DVB, DREF, DF0, DLA, DLB,
    s_sz, s_sn, s_sm,
    s_xb, s_xh, s_xn, s_xd,
    s_rh, s_rm, s_rd,
    s_vb, s_vh, s_vn, s_vd,
    s_fn, s_fm,
    s_ob, s_oh, s_or, s_oc,
    s_lz, s_ln, s_bz, s_bm,
    HEADS, N, M, D, DV, ITERS, SCAL,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    FROM_X: tl.constexpr, HAS_F: tl.constexpr, MODE: tl.constexpr, MARG: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # 1/eps and n/m come from a tensor so fp64 runs keep them exact (float args are fp32)
    inv_eps = tl.load(SCAL).to(ACC)
    c_att = tl.load(SCAL + 1).to(ACC)
    b = pid // HEADS
    h = pid % HEADS
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_m < M
    s_base = S + pid * s_sz
    x_base = X + b * s_xb + h * s_xh
    v_base = V + b * s_vb + h * s_vh
    do_base = DOUT + b * s_ob + h * s_oh
    la_base = LA + pid * s_lz
    # gradient buffers are contiguous, one slab per program
    ds_base = DS + pid * N * M
    dx_base = DX + pid * N * D
    dv_base = DVB + pid * N * DV
    df0_base = DF0 + pid * N
    dla_base = DLA + pid * N
    lb = tl.load(LB + pid * s_bz + offs_m * s_bm, mask=col_ok, other=0.0).to(ACC)
    if FROM_X:
        ref = _row_tile(REF + h * s_rh, s_rm, s_rd, offs_m, offs_d, M, D, ACC)
    else:
        ref = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    g_base = G + pid * ITERS * M
    g_T = tl.load(g_base + (ITERS - 1) * M + offs_m, mask=col_ok, other=0.0)
    # scalar conditions are applied with tl.where (loads read a valid row either way)
    g_Tm1 = tl.load(g_base + tl.maximum(ITERS - 2, 0) * M + offs_m, mask=col_ok, other=0.0)
    g_Tm1 = tl.where(ITERS > 1, g_Tm1, 0.0)
    dref = tl.zeros([BLOCK_M, BLOCK_D], ACC)

    # ---- attention: dzeta = c T^T dout needs a full sweep first; zeta was saved
    dzeta = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    zeta = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    if MODE == 2:
        zeta = _row_tile(ZB + pid * M * DV, DV, 1, offs_m, offs_dv, M, DV, ACC)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            row_ok = offs_n < N
            if FROM_X:
                x_t = _row_tile(x_base, s_xn, s_xd, offs_n, offs_d, N, D, ACC)
            else:
                x_t = tl.zeros([BLOCK_N, BLOCK_D], ACC)
            K, filt = _scores(s_base, s_sn, s_sm, x_t, ref, FILT, s_fn, s_fm, offs_n, offs_m, N, M,
                              inv_eps, FROM_X, HAS_F, ACC, PREC)
            la = tl.load(la_base + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
            f = _row_pot(K, g_Tm1, la, col_ok)
            T = _masked_exp(K + f[:, None] + g_T[None, :], row_ok[:, None] & col_ok[None, :]) * filt
            do_t = _row_tile(do_base, s_or, s_oc, offs_n, offs_dv, N, DV, ACC)
            dzeta += tl.dot(tl.trans(T), do_t, input_precision=PREC, out_dtype=ACC)
        dzeta = dzeta * c_att
    dout_z = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    if MODE == 1:
        dout_z = _row_tile(do_base, s_or, s_oc, offs_m, offs_dv, M, DV, ACC)

    # ---- sweep 0: W = dP * P, its row sums (df_T seed) and column sums (dg_T), dv
    dg = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        tile_ok = row_ok[:, None] & col_ok[None, :]
        if FROM_X:
            x_t = _row_tile(x_base, s_xn, s_xd, offs_n, offs_d, N, D, ACC)
        else:
            x_t = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        K, filt = _scores(s_base, s_sn, s_sm, x_t, ref, FILT, s_fn, s_fm, offs_n, offs_m, N, M,
                          inv_eps, FROM_X, HAS_F, ACC, PREC)
        la = tl.load(la_base + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
        f = _row_pot(K, g_Tm1, la, col_ok)
        P = _masked_exp(K + f[:, None] + g_T[None, :], tile_ok)
        if MODE == 0:
            dP = _row_tile(DOUT + pid * s_ob, s_or, s_oc, offs_n, offs_m, N, M, ACC)
        else:
            v_t = _row_tile(v_base, s_vn, s_vd, offs_n, offs_dv, N, DV, ACC)
            if MODE == 1:
                dT = tl.dot(v_t, tl.trans(dout_z), input_precision=PREC, out_dtype=ACC)
                dv_t = tl.dot(P * filt, dout_z, input_precision=PREC, out_dtype=ACC)
            else:
                do_t = _row_tile(do_base, s_or, s_oc, offs_n, offs_dv, N, DV, ACC)
                dT = c_att * tl.dot(do_t, tl.trans(zeta), input_precision=PREC, out_dtype=ACC)
                dT += tl.dot(v_t, tl.trans(dzeta), input_precision=PREC, out_dtype=ACC)
                dv_t = tl.dot(P * filt, dzeta, input_precision=PREC, out_dtype=ACC)
            _store_tile(dv_base, DV, 1, offs_n, offs_dv, N, DV, dv_t, False)
            dP = dT * filt
        W = tl.where(tile_ok, dP * P, 0.0)
        dg += _rsum(W, 0)
        tl.store(df0_base + offs_n, _rsum(W, 1), mask=row_ok)
        dref = _emit(W, filt, inv_eps, x_t, ref, dref, ds_base, M, 1, dx_base, D, 1,
                     offs_n, offs_m, offs_d, N, M, D, True, FROM_X, ACC, PREC)
    tl.debug_barrier()

    # ---- one sweep per iteration, last to first
    dlb = tl.zeros([BLOCK_M], ACC)
    for tt in range(ITERS):
        t = ITERS - 1 - tt
        g_t = tl.load(g_base + t * M + offs_m, mask=col_ok, other=0.0)
        g_p = tl.load(g_base + tl.maximum(t - 1, 0) * M + offs_m, mask=col_ok, other=0.0)
        g_p = tl.where(t > 0, g_p, 0.0)
        dg_prev = tl.zeros([BLOCK_M], ACC)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            row_ok = offs_n < N
            tile_ok = row_ok[:, None] & col_ok[None, :]
            if FROM_X:
                x_t = _row_tile(x_base, s_xn, s_xd, offs_n, offs_d, N, D, ACC)
            else:
                x_t = tl.zeros([BLOCK_N, BLOCK_D], ACC)
            K, filt = _scores(s_base, s_sn, s_sm, x_t, ref, FILT, s_fn, s_fm, offs_n, offs_m, N, M,
                              inv_eps, FROM_X, HAS_F, ACC, PREC)
            la = tl.load(la_base + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
            f = _row_pot(K, g_p, la, col_ok)
            # column-softmax of the column update t and row-softmax of the row update t
            C = _masked_exp(K + f[:, None] + (g_t - lb)[None, :], tile_ok)
            R = _masked_exp(K + g_p[None, :] + (f - la)[:, None], tile_ok)
            Cdg = C * dg[None, :]
            seed = tl.load(df0_base + offs_n, mask=row_ok, other=0.0)
            df = tl.where(t == ITERS - 1, seed, 0.0) - _rsum(Cdg, 1)
            Rdf = R * df[:, None]
            dg_prev -= _rsum(Rdf, 0)
            if MARG:
                old = tl.load(dla_base + offs_n, mask=row_ok, other=0.0)
                tl.store(dla_base + offs_n, tl.where(t < ITERS - 1, old, 0.0) + df, mask=row_ok)
            dref = _emit(-(Cdg + Rdf), filt, inv_eps, x_t, ref, dref, ds_base, M, 1, dx_base, D, 1,
                         offs_n, offs_m, offs_d, N, M, D, False, FROM_X, ACC, PREC)
        dlb += dg
        dg = dg_prev
        tl.debug_barrier()

    if MARG:
        tl.store(DLB + pid * M + offs_m, dlb, mask=col_ok)
    if FROM_X:
        _store_tile(DREF + pid * M * D, D, 1, offs_m, offs_d, M, D, dref, False)


# ---------------------------------------------------------------- launchers


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# Largest row tile; the tests lower it to 16 so that small problems span several tiles.
BLOCK_N_CAP = 64


def _config(N: int, M: int, D: int, DV: int, dtype: torch.dtype):
    bm, bd, bdv = _pow2(M), _pow2(D), _pow2(DV)
    widest = max(bm, bd, bdv)
    # keep a (BLOCK_N x widest) fp32 tile at about 4K elements per program
    bn = max(16, min(BLOCK_N_CAP, _pow2(N), 4096 // widest))
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # fp32/fp64: exact products (no silent TF32); half inputs are upcast and use TF32
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    warps = 4 if bn * widest <= 2048 else 8
    return dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv, ACC=acc, PREC=prec), warps


def _scalars(eps: float, c: float, like: torch.Tensor) -> torch.Tensor:
    # filled on the device (no host-to-device copy, so no synchronisation)
    t = torch.empty(2, device=like.device, dtype=_acc_dtype(like.dtype))
    t[0].fill_(1.0 / eps)
    t[1].fill_(c)
    return t


def _s4(t: Optional[torch.Tensor]):
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _launch_args(S, X, REF, V, FILT, LA, LB, OUT_like):
    """Shared pointer/stride arguments; unused inputs are replaced by a dummy tensor."""
    dummy = LA
    S_ = S if S is not None else dummy
    ss = tuple(S.stride()) if S is not None else (0, 0, 0)
    X_ = X if X is not None else dummy
    REF_ = REF if REF is not None else dummy
    V_ = V if V is not None else dummy
    F_ = FILT if FILT is not None else dummy
    sf = tuple(FILT.stride()) if FILT is not None else (0, 0)
    sr = tuple(REF.stride()) if REF is not None else (0, 0, 0)
    so = tuple(OUT_like.stride()) if OUT_like.dim() == 4 else (OUT_like.stride(0), 0) + tuple(OUT_like.stride()[1:])
    return (S_, X_, REF_, V_, F_), (*ss, *_s4(X), *sr, *_s4(V), *sf, *so, *LA.stride(), *LB.stride())


def sinkhorn_fwd(S: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, eps: float, iters: int):
    """S (Z, n, m) any strides; la (Z, n), lb (Z, m) in the accumulation dtype (any strides,
    broadcast views allowed). Returns the plan (Z, n, m) in S.dtype and G (Z, iters, m)."""
    Z, N, M = S.shape
    acc = _acc_dtype(S.dtype)
    P = torch.empty(Z, N, M, device=S.device, dtype=S.dtype)
    G = torch.empty(Z, iters, M, device=S.device, dtype=acc)
    meta, warps = _config(N, M, 1, 1, S.dtype)
    ptrs, strides = _launch_args(S, None, None, None, None, la, lb, P)
    _fwd_kernel[(Z,)](*ptrs, P, P, G, la, lb, *strides,
                      1, N, M, 1, 1, int(iters), _scalars(eps, 1.0, S),
                      FROM_X=False, HAS_F=False, MODE=0, num_warps=warps, **meta)
    return P, G


def sinkhorn_bwd(dP: torch.Tensor, S: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, G: torch.Tensor,
                 eps: float):
    """Gradients (dS in S.dtype, dla (Z, n), dlb (Z, m) in the accumulation dtype)."""
    Z, N, M = S.shape
    acc = _acc_dtype(S.dtype)
    iters = G.shape[1]
    G = G.contiguous()
    dS = torch.empty(Z, N, M, device=S.device, dtype=acc)
    df0 = torch.empty(Z, N, device=S.device, dtype=acc)
    dla = torch.empty(Z, N, device=S.device, dtype=acc)
    dlb = torch.empty(Z, M, device=S.device, dtype=acc)
    meta, warps = _config(N, M, 1, 1, S.dtype)
    ptrs, strides = _launch_args(S, None, None, None, None, la, lb, dP)
    _bwd_kernel[(Z,)](*ptrs, dP, dP, G, la, lb, dS, dS, dS, dS, df0, dla, dlb, *strides,
                      1, N, M, 1, 1, int(iters), _scalars(eps, 1.0, S),
                      FROM_X=False, HAS_F=False, MODE=0, MARG=True, num_warps=warps, **meta)
    return dS.to(S.dtype), dla, dlb


def _ot_marginals(Z: int, n: int, m: int, device, acc):
    # OTKE's masses as all-stride-0 views (every program, every row reads one element):
    # every token m/n, every reference 1
    la = torch.full((1, 1), math.log(m / n), device=device, dtype=acc).expand(Z, n)
    lb = torch.zeros((1, 1), device=device, dtype=acc).expand(Z, m)
    return la, lb


def ot_fwd(x, ref, v, filt, eps: float, iters: int, attention: bool):
    """x (B, heads, n, d), ref (heads, m, d), v (B, heads, n, dv), filt (n, m) or None, any strides.

    Returns (out, zeta, G) like vitattn.torch_backend.sinkhorn.ot_fwd.
    """
    B, H, N, D = x.shape
    M, DV = ref.shape[1], v.shape[-1]
    acc = _acc_dtype(x.dtype)
    la, lb = _ot_marginals(B * H, N, M, x.device, acc)
    out = torch.empty(B, H, N if attention else M, DV, device=x.device, dtype=x.dtype)
    zeta = torch.empty(B, H, M, DV, device=x.device, dtype=acc) if attention else x.new_empty((0,), dtype=acc)
    G = torch.empty(B, H, iters, M, device=x.device, dtype=acc)
    meta, warps = _config(N, M, D, DV, x.dtype)
    ptrs, strides = _launch_args(None, x, ref, v, filt, la, lb, out)
    _fwd_kernel[(B * H,)](*ptrs, out, zeta if attention else out, G, la, lb, *strides,
                          H, N, M, D, DV, int(iters), _scalars(eps, N / M, x),
                          FROM_X=True, HAS_F=filt is not None, MODE=2 if attention else 1,
                          num_warps=warps, **meta)
    return out, zeta, G


def ot_bwd(dout, x, ref, v, filt, zeta, G, eps: float, attention: bool):
    """Gradients (dx, dref, dv) of ot_fwd in the input dtypes."""
    B, H, N, D = x.shape
    M, DV = ref.shape[1], v.shape[-1]
    acc = _acc_dtype(x.dtype)
    iters = G.shape[-2]
    la, lb = _ot_marginals(B * H, N, M, x.device, acc)
    G = G.contiguous()
    zeta = zeta.contiguous() if attention else G
    dx = torch.empty(B, H, N, D, device=x.device, dtype=acc)
    dv = torch.empty(B, H, N, DV, device=x.device, dtype=acc)
    dref = torch.empty(B, H, M, D, device=x.device, dtype=acc)
    df0 = torch.empty(B * H, N, device=x.device, dtype=acc)
    meta, warps = _config(N, M, D, DV, x.dtype)
    ptrs, strides = _launch_args(None, x, ref, v, filt, la, lb, dout)
    _bwd_kernel[(B * H,)](*ptrs, dout, zeta, G, la, lb, dx, dx, dv, dref, df0, df0, df0, *strides,
                          H, N, M, D, DV, int(iters), _scalars(eps, N / M, x),
                          FROM_X=True, HAS_F=filt is not None, MODE=2 if attention else 1, MARG=False,
                          num_warps=warps, **meta)
    # ref is shared by the batch: sum the per-problem partials in a fixed order
    return dx.to(x.dtype), dref.sum(0).to(ref.dtype), dv.to(v.dtype)
