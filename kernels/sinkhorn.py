"""Triton kernels for log-domain Sinkhorn and OTKE aggregation (issue 3).

The rows of every problem (one (batch, head), or one leading index of a scores tensor) are
split into NC chunks of whole BLOCK_N-row tiles; the chunk count depends only on n (at most
ROW_CHUNKS), never on the GPU, so results are the same on every GPU model. One launch does
one Sinkhorn iteration for all (problem, chunk) programs: a program first merges the column
statistics the previous launch left per chunk (running max and sum of exp, merged in chunk
order) into g_{t-1}, then streams its rows, forms their row potentials
f_t = log a - LSE_j(K + g_{t-1}) and its chunk's column statistics of K + f_t, the pieces of
g_t. The last iteration's programs also accumulate, with the same running rescale,
sum_i exp(K_ij + f_i) v_i, which is the aggregate up to exp(g_j). With B x heads = 32 to
128 problems of n = 3136 rows, the 8 chunks per problem keep every SM busy where one
program per problem left most of them idle.

Scores come either from a dense (Z, n, m) tensor (FROM_X=False, ``sinkhorn``) or are
recomputed per tile as filter * (x . ref^T) (FROM_X=True, ``ot_*``), so nothing of size
n x m is ever written by the ot kernels. MODE selects the output: 0 the plan, 1 the
aggregate (m, dv), 2 attention (n/m) T (T^T v) (one more sweep).

The forward saves only g_1..g_T (O(iters * m) per problem); f_t is recomputed from
g_{t-1}. The backward is the exact gradient of the unrolled loop (see
vitattn/torch_backend/sinkhorn.py for the recurrence), one launch per step and the same
chunks: sweep 0 forms W = dP * P, its row sums (the df_T seed) and its chunks' column sums
(dg_T); each reverse step t merges the previous launch's column partials into dg_t, forms
the column-softmax C_t and row-softmax R_t of its tiles, adds its share of dK to dS (dense
mode) or to dx and its chunk's dref partial (x mode), and leaves the partial column sums of
R_t df_t (dg_{t-1}). Rows of dS / dx / dla are owned by one program each and the partials
are merged in a fixed order: no atomics, deterministic.

Expected H100 time (SeTformer-mini stage 1 at B = 128: Z = 256 problems of n = 3136 tokens,
m = 64 references, d = dv = 32, bf16, 5 iterations; ot_attention forward + backward):
the recomputed scores cost 2 n m d = 12.8 MFLOP per problem and sweep, and the
exp / LSE work about 10 n m = 2 M transcendental-bound operations; forward 5 + 2 sweeps,
backward 1 + 1 + 5 sweeps: 14 sweeps x 256 problems x (12.8 MFLOP dot + 2 M exp) ~ 46 GFLOP
of tensor-core work (under 0.1 ms at ~600 TFLOP/s dense bf16) and 7 G exp-class operations
(the bound: ~0.35 ms at the SFU rate of 132 SMs x 16 per clock x 1.7 GHz x 2 (ex2 + fma)).
Bytes: each sweep reads x (and v where used) once, 256 x 3136 x 32 x 2 B = 51 MB, from L2
after the first sweep (the 51 MB working set is close to the 50 MB L2), about 14 x 51 MB =
0.7 GB in all, 0.25 ms at 3 TB/s if it all came from HBM. Expected: 0.4 to 0.6 ms forward +
backward, against 1 to 3 ms for one program per problem.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common as C

NEG = tl.constexpr(float("-inf"))


# ---------------------------------------------------------------- tile helpers


@triton.jit
def _row_tile(base, s_r, s_c, offs_r, offs_c, R, C_, ACC: tl.constexpr):
    ptrs = base + offs_r[:, None] * s_r + offs_c[None, :] * s_c
    mask = (offs_r < R)[:, None] & (offs_c < C_)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(ACC)


@triton.jit
def _store_tile(base, s_r, s_c, offs_r, offs_c, R, C_, val, ADD: tl.constexpr):
    ptrs = base + offs_r[:, None] * s_r + offs_c[None, :] * s_c
    mask = (offs_r < R)[:, None] & (offs_c < C_)[None, :]
    if ADD:
        val = val + tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _scores(s_base, s_sn, s_sm, x_base, s_xn, s_xd, ref, f_base, s_fn, s_fm, offs_n, offs_m, offs_d,
            N, M, D, inv_eps,
            FROM_X: tl.constexpr, HAS_F: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """(K, F, x tile): K = F * S / eps for a tile of rows (F = 1 without a filter)."""
    if FROM_X:
        x_t = _row_tile(x_base, s_xn, s_xd, offs_n, offs_d, N, D, ACC)
        s = tl.dot(x_t, tl.trans(ref), input_precision=PREC, out_dtype=ACC)
    else:
        x_t = tl.zeros([offs_n.shape[0], offs_d.shape[0]], ACC)
        s = _row_tile(s_base, s_sn, s_sm, offs_n, offs_m, N, M, ACC)
    if HAS_F:
        filt = _row_tile(f_base, s_fn, s_fm, offs_n, offs_m, N, M, ACC)
    else:
        filt = tl.full(s.shape, 1.0, ACC)
    return filt * s * inv_eps, filt, x_t


@triton.jit
def _row_pot(K, g, la, col_ok):
    """f = log a - LSE_j(K + g) for a tile of rows (padded columns excluded)."""
    z = tl.where(col_ok[None, :], K + g[None, :], NEG)
    mx = tl.max(z, 1)
    return la - (mx + tl.log(tl.sum(tl.exp(z - mx[:, None]), 1)))


@triton.jit
def _masked_exp(arg, ok):
    """exp on the valid entries, 0 on padding (whose potentials are meaningless and may overflow)."""
    return tl.exp(tl.where(ok, arg, NEG))


@triton.jit
def _merge_lse(ST, z, NC, M, offs_m, col_ok, Z, BLOCK_C: tl.constexpr):
    """(max, sum) of the per-chunk column statistics of problem z merged in chunk order.

    ST points at one parity of the (2 [max, sum], Z, NC, M) statistics buffer.
    """
    offs_c = tl.arange(0, BLOCK_C)
    ok = (offs_c < NC)[:, None] & col_ok[None, :]
    ptrs = ST + z * NC * M + offs_c[:, None] * M + offs_m[None, :]
    cmax = tl.load(ptrs, mask=ok, other=float("-inf"))
    csum = tl.load(ptrs + Z * NC * M, mask=ok, other=0.0)
    mx = tl.max(cmax, 0)
    mx_safe = tl.where(col_ok, mx, 0.0)
    tot = tl.sum(tl.where(ok, csum * tl.exp(cmax - mx_safe[None, :]), 0.0), 0)
    return mx_safe, tl.where(col_ok, tot, 1.0)


@triton.jit
def _sum_chunks(P, z, NC, M, offs_m, col_ok, BLOCK_C: tl.constexpr):
    """Sum over chunks (in chunk order) of the (Z, NC, M) column partials of problem z."""
    offs_c = tl.arange(0, BLOCK_C)
    ok = (offs_c < NC)[:, None] & col_ok[None, :]
    return tl.sum(tl.load(P + z * NC * M + offs_c[:, None] * M + offs_m[None, :], mask=ok, other=0.0), 0)


# ---------------------------------------------------------------- forward


# the iteration / step index varies between launches: one compiled kernel for every value
@triton.jit(do_not_specialize=["T_IDX"])
def _fwd_sweep_kernel(
    S, X, REF, V, FILT, LA, LB, G, ST, ACCP,
    s_sz, s_sn, s_sm,
    s_xb, s_xh, s_xn, s_xd,
    s_rh, s_rm, s_rd,
    s_vb, s_vh, s_vn, s_vd,
    s_fn, s_fm,
    s_lz, s_ln, s_bz, s_bm,
    Z, HEADS, N, M, D, DV, ITERS, T_IDX, NC, TPC, SCAL,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_C: tl.constexpr, FROM_X: tl.constexpr, HAS_F: tl.constexpr, AGG: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    # iteration T_IDX over the rows of chunk c of problem z
    z = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    inv_eps = tl.load(SCAL).to(ACC)
    b = z // HEADS
    h = z % HEADS
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_m < M
    lb = tl.load(LB + z * s_bz + offs_m * s_bm, mask=col_ok, other=0.0).to(ACC)
    if FROM_X:
        ref = _row_tile(REF + h * s_rh, s_rm, s_rd, offs_m, offs_d, M, D, ACC)
    else:
        ref = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    stat = Z * NC * M  # one parity of the statistics buffer
    g_prev = tl.zeros([BLOCK_M], ACC)
    if T_IDX > 0:
        mx, tot = _merge_lse(ST + ((T_IDX - 1) % 2) * 2 * stat, z, NC, M, offs_m, col_ok, Z, BLOCK_C)
        g_prev = lb - (mx + tl.log(tot))
        if c == 0:
            tl.store(G + z * ITERS * M + (T_IDX - 1) * M + offs_m, g_prev, mask=col_ok)

    cmax = tl.full([BLOCK_M], NEG, ACC)
    csum = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    row0 = c * TPC * BLOCK_N
    for i in range(0, TPC):
        offs_n = row0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        K, filt, x_t = _scores(S + z * s_sz, s_sn, s_sm, X + b * s_xb + h * s_xh, s_xn, s_xd, ref, FILT, s_fn, s_fm,
                               offs_n, offs_m, offs_d, N, M, D, inv_eps, FROM_X, HAS_F, ACC, PREC)
        la = tl.load(LA + z * s_lz + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
        f = _row_pot(K, g_prev, la, col_ok)
        zc = tl.where(row_ok[:, None], K + f[:, None], NEG)
        new = tl.maximum(cmax, tl.max(zc, 0))
        # a chunk's last tile may hold no row at all: keep its statistics neutral
        new = tl.where(new == float("-inf"), 0.0, new)
        alpha = tl.exp(cmax - new)
        p = tl.exp(zc - new[None, :])
        csum = csum * alpha + tl.sum(p, 0)
        if AGG:
            v_t = _row_tile(V + b * s_vb + h * s_vh, s_vn, s_vd, offs_n, offs_dv, N, DV, ACC)
            acc = acc * alpha[:, None] + tl.dot(tl.trans(p * filt), v_t, input_precision=PREC, out_dtype=ACC)
        cmax = new
    base = ST + (T_IDX % 2) * 2 * stat + z * NC * M + c * M
    tl.store(base + offs_m, cmax, mask=col_ok)
    tl.store(base + stat + offs_m, csum, mask=col_ok)
    if AGG:
        tl.store(ACCP + (z * NC + c) * M * DV + offs_m[:, None] * DV + offs_dv[None, :], acc,
                 mask=col_ok[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _fwd_final_kernel(
    G, ST, ACCP, LB, OUT, ZB,
    s_bz, s_bm, s_ob, s_oh, s_or, s_oc,
    Z, HEADS, M, DV, ITERS, NC,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_C: tl.constexpr, MODE: tl.constexpr,
    ACC: tl.constexpr,
):
    # g_T from the last sweep's statistics; the aggregate z_j = exp(g_j) sum_i exp(K_ij + f_i) v_i
    z = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_m < M
    stat = Z * NC * M
    ST_last = ST + ((ITERS - 1) % 2) * 2 * stat
    mx, tot = _merge_lse(ST_last, z, NC, M, offs_m, col_ok, Z, BLOCK_C)
    lb = tl.load(LB + z * s_bz + offs_m * s_bm, mask=col_ok, other=0.0).to(ACC)
    tl.store(G + z * ITERS * M + (ITERS - 1) * M + offs_m, lb - (mx + tl.log(tot)), mask=col_ok)
    if MODE != 0:
        agg = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
        tile_ok = col_ok[:, None] & (offs_dv < DV)[None, :]
        for c in range(0, NC):
            cm = tl.load(ST_last + z * NC * M + c * M + offs_m, mask=col_ok, other=0.0)
            part = tl.load(ACCP + (z * NC + c) * M * DV + offs_m[:, None] * DV + offs_dv[None, :],
                           mask=tile_ok, other=0.0)
            agg += part * tl.exp(cm - mx)[:, None]
        # exp(g_j + max_j) = b_j / sum_j
        zz = agg * (tl.exp(lb) / tot)[:, None]
        if MODE == 1:
            b = z // HEADS
            h = z % HEADS
            _store_tile(OUT + b * s_ob + h * s_oh, s_or, s_oc, offs_m, offs_dv, M, DV, zz, False)
        else:
            _store_tile(ZB + z * M * DV, DV, 1, offs_m, offs_dv, M, DV, zz, False)


@triton.jit
def _fwd_out_kernel(
    S, X, REF, V, FILT, LA, LB, G, ZB, OUT,
    s_sz, s_sn, s_sm,
    s_xb, s_xh, s_xn, s_xd,
    s_rh, s_rm, s_rd,
    s_fn, s_fm,
    s_ob, s_oh, s_or, s_oc,
    s_lz, s_ln, s_bz, s_bm,
    HEADS, N, M, D, DV, ITERS, TPC, SCAL,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    FROM_X: tl.constexpr, HAS_F: tl.constexpr, MODE: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    # rows of chunk c: the plan (MODE 0) or (n/m) T z (MODE 2)
    z = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    inv_eps = tl.load(SCAL).to(ACC)
    c_att = tl.load(SCAL + 1).to(ACC)
    b = z // HEADS
    h = z % HEADS
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_m < M
    if FROM_X:
        ref = _row_tile(REF + h * s_rh, s_rm, s_rd, offs_m, offs_d, M, D, ACC)
    else:
        ref = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    g_base = G + z * ITERS * M
    g = tl.load(g_base + (ITERS - 1) * M + offs_m, mask=col_ok, other=0.0)
    # g_{T-1} (zero before the first iteration); the load reads a valid row either way
    g_prev = tl.load(g_base + tl.maximum(ITERS - 2, 0) * M + offs_m, mask=col_ok, other=0.0)
    g_prev = tl.where(ITERS > 1, g_prev, 0.0)
    zz = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    if MODE == 2:
        zz = _row_tile(ZB + z * M * DV, DV, 1, offs_m, offs_dv, M, DV, ACC)
    o_base = OUT + b * s_ob + h * s_oh
    row0 = c * TPC * BLOCK_N
    for i in range(0, TPC):
        offs_n = row0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        K, filt, x_t = _scores(S + z * s_sz, s_sn, s_sm, X + b * s_xb + h * s_xh, s_xn, s_xd, ref, FILT, s_fn, s_fm,
                               offs_n, offs_m, offs_d, N, M, D, inv_eps, FROM_X, HAS_F, ACC, PREC)
        la = tl.load(LA + z * s_lz + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
        f = _row_pot(K, g_prev, la, col_ok)
        P = _masked_exp(K + f[:, None] + g[None, :], row_ok[:, None] & col_ok[None, :])
        if MODE == 0:
            _store_tile(o_base, s_or, s_oc, offs_n, offs_m, N, M, P, False)
        else:
            T = tl.where(col_ok[None, :], P * filt, 0.0)
            o = tl.dot(T, zz, input_precision=PREC, out_dtype=ACC) * c_att
            _store_tile(o_base, s_or, s_oc, offs_n, offs_dv, N, DV, o, False)


# ---------------------------------------------------------------- backward


@triton.jit
def _bwd_dzeta_kernel(
    X, REF, FILT, DOUT, G, LA, DZP,
    s_xb, s_xh, s_xn, s_xd,
    s_rh, s_rm, s_rd,
    s_fn, s_fm,
    s_ob, s_oh, s_or, s_oc,
    s_lz, s_ln,
    HEADS, N, M, D, DV, ITERS, NC, TPC, SCAL,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_F: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    # attention: this chunk's share of T^T dout (summed over chunks by _common.sum_partials)
    z = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    inv_eps = tl.load(SCAL).to(ACC)
    b = z // HEADS
    h = z % HEADS
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_m < M
    ref = _row_tile(REF + h * s_rh, s_rm, s_rd, offs_m, offs_d, M, D, ACC)
    g_base = G + z * ITERS * M
    g_T = tl.load(g_base + (ITERS - 1) * M + offs_m, mask=col_ok, other=0.0)
    g_Tm1 = tl.load(g_base + tl.maximum(ITERS - 2, 0) * M + offs_m, mask=col_ok, other=0.0)
    g_Tm1 = tl.where(ITERS > 1, g_Tm1, 0.0)
    dzeta = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    row0 = c * TPC * BLOCK_N
    for i in range(0, TPC):
        offs_n = row0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        K, filt, x_t = _scores(X, 0, 0, X + b * s_xb + h * s_xh, s_xn, s_xd, ref, FILT, s_fn, s_fm,
                               offs_n, offs_m, offs_d, N, M, D, inv_eps, True, HAS_F, ACC, PREC)
        la = tl.load(LA + z * s_lz + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
        f = _row_pot(K, g_Tm1, la, col_ok)
        T = _masked_exp(K + f[:, None] + g_T[None, :], row_ok[:, None] & col_ok[None, :]) * filt
        do_t = _row_tile(DOUT + b * s_ob + h * s_oh, s_or, s_oc, offs_n, offs_dv, N, DV, ACC)
        dzeta += tl.dot(tl.trans(T), do_t, input_precision=PREC, out_dtype=ACC)
    tl.store(DZP + (z * NC + c) * M * DV + offs_m[:, None] * DV + offs_dv[None, :], dzeta,
             mask=col_ok[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _emit(dK, filt, inv_eps, x_t, ref, dref, DSO, ds_base, s_dn, s_dm, DXO, dx_base, s_gn, s_gd,
          offs_n, offs_m, offs_d, N, M, D, first, last,
          FROM_X: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Add a tile's dK to the gradients: dS (dense) or dx and the dref accumulator (x mode).

    The rows accumulate in fp32 scratch (ds_base / dx_base) over the launches; the last one
    writes the sum in the output dtype (DSO / DXO, same row layout) instead.
    """
    dS = dK * filt * inv_eps
    if FROM_X:
        val = tl.dot(dS, ref, input_precision=PREC, out_dtype=ACC)
        dref += tl.dot(tl.trans(dS), x_t, input_precision=PREC, out_dtype=ACC)
        cols = offs_d
        n_cols = D
        s_r = s_gn
        s_c = s_gd
        scratch = dx_base
        final = DXO
    else:
        val = dS
        cols = offs_m
        n_cols = M
        s_r = s_dn
        s_c = s_dm
        scratch = ds_base
        final = DSO
    ptrs = scratch + offs_n[:, None] * s_r + cols[None, :] * s_c
    mask = (offs_n < N)[:, None] & (cols < n_cols)[None, :]
    if not first:
        val += tl.load(ptrs, mask=mask, other=0.0)
    if last:
        out_ptrs = final + offs_n[:, None] * s_r + cols[None, :] * s_c
        tl.store(out_ptrs, val.to(final.dtype.element_ty), mask=mask)
    else:
        tl.store(ptrs, val, mask=mask)
    return dref


@triton.jit(do_not_specialize=["STEP"])
def _bwd_sweep_kernel(
    S, X, REF, V, FILT, DOUT, ZB, DZ, G, LA, LB,
    DS, DSO, DX, DXO, DVO, DREFP, DF0, DLA, DLB, DG,
    s_sz, s_sn, s_sm,
    s_xb, s_xh, s_xn, s_xd,
    s_rh, s_rm, s_rd,
    s_vb, s_vh, s_vn, s_vd,
    s_fn, s_fm,
    s_ob, s_oh, s_or, s_oc,
    s_lz, s_ln, s_bz, s_bm,
    Z, HEADS, BATCH, N, M, D, DV, ITERS, STEP, NC, TPC, SCAL,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_C: tl.constexpr, FROM_X: tl.constexpr, HAS_F: tl.constexpr, MODE: tl.constexpr,
    MARG: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    # STEP 0: W = dP * P (dP from the output's gradient); STEP s >= 1: the reverse step of
    # iteration t = ITERS - s. Rows of chunk c of problem z; the column partials go to the
    # parity STEP % 2 of DG (Z, NC, M) x 2, the previous step's are read from the other one.
    z = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    inv_eps = tl.load(SCAL).to(ACC)
    c_att = tl.load(SCAL + 1).to(ACC)
    b = z // HEADS
    h = z % HEADS
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_m < M
    x_base = X + b * s_xb + h * s_xh
    v_base = V + b * s_vb + h * s_vh
    do_base = DOUT + b * s_ob + h * s_oh
    # per-problem scratch and outputs are contiguous
    ds_base = DS + z * N * M
    dso_base = DSO + z * N * M
    dx_base = DX + z * N * D
    dxo_base = DXO + b * HEADS * N * D + h * N * D
    lb = tl.load(LB + z * s_bz + offs_m * s_bm, mask=col_ok, other=0.0).to(ACC)
    if FROM_X:
        ref = _row_tile(REF + h * s_rh, s_rm, s_rd, offs_m, offs_d, M, D, ACC)
    else:
        ref = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    g_base = G + z * ITERS * M
    part = Z * NC * M
    dref_slot = DREFP + ((h * BATCH + b) * NC + c) * M * D
    if FROM_X:
        if STEP == 0:
            dref = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        else:
            dref = _row_tile(dref_slot, D, 1, offs_m, offs_d, M, D, ACC)
    else:
        dref = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    last = STEP == ITERS
    row0 = c * TPC * BLOCK_N
    dg_part = tl.zeros([BLOCK_M], ACC)
    if STEP == 0:
        g_T = tl.load(g_base + (ITERS - 1) * M + offs_m, mask=col_ok, other=0.0)
        g_Tm1 = tl.load(g_base + tl.maximum(ITERS - 2, 0) * M + offs_m, mask=col_ok, other=0.0)
        g_Tm1 = tl.where(ITERS > 1, g_Tm1, 0.0)
        dout_z = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
        zeta = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
        dzeta = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
        if MODE == 1:
            dout_z = _row_tile(do_base, s_or, s_oc, offs_m, offs_dv, M, DV, ACC)
        if MODE == 2:
            zeta = _row_tile(ZB + z * M * DV, DV, 1, offs_m, offs_dv, M, DV, ACC)
            dzeta = _row_tile(DZ + z * M * DV, DV, 1, offs_m, offs_dv, M, DV, ACC) * c_att
        for i in range(0, TPC):
            offs_n = row0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = offs_n < N
            tile_ok = row_ok[:, None] & col_ok[None, :]
            K, filt, x_t = _scores(S + z * s_sz, s_sn, s_sm, x_base, s_xn, s_xd, ref, FILT, s_fn, s_fm,
                                   offs_n, offs_m, offs_d, N, M, D, inv_eps, FROM_X, HAS_F, ACC, PREC)
            la = tl.load(LA + z * s_lz + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
            f = _row_pot(K, g_Tm1, la, col_ok)
            P = _masked_exp(K + f[:, None] + g_T[None, :], tile_ok)
            if MODE == 0:
                dP = _row_tile(DOUT + z * s_ob, s_or, s_oc, offs_n, offs_m, N, M, ACC)
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
                _store_tile(DVO + b * HEADS * N * DV + h * N * DV, DV, 1, offs_n, offs_dv, N, DV, dv_t, False)
                dP = dT * filt
            W = tl.where(tile_ok, dP * P, 0.0)
            dg_part += tl.sum(W, 0)
            tl.store(DF0 + z * N + offs_n, tl.sum(W, 1), mask=row_ok)
            dref = _emit(W, filt, inv_eps, x_t, ref, dref, dso_base, ds_base, M, 1, dxo_base, dx_base, D, 1,
                         offs_n, offs_m, offs_d, N, M, D, True, last, FROM_X, ACC, PREC)
    else:
        t = ITERS - STEP
        dg = _sum_chunks(DG + ((STEP - 1) % 2) * part, z, NC, M, offs_m, col_ok, BLOCK_C)
        if MARG:
            if c == 0:
                if STEP == 1:
                    tl.store(DLB + z * M + offs_m, dg, mask=col_ok)
                else:
                    tl.store(DLB + z * M + offs_m, tl.load(DLB + z * M + offs_m, mask=col_ok, other=0.0) + dg,
                             mask=col_ok)
        g_t = tl.load(g_base + t * M + offs_m, mask=col_ok, other=0.0)
        g_p = tl.load(g_base + tl.maximum(t - 1, 0) * M + offs_m, mask=col_ok, other=0.0)
        g_p = tl.where(t > 0, g_p, 0.0)
        for i in range(0, TPC):
            offs_n = row0 + i * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok = offs_n < N
            tile_ok = row_ok[:, None] & col_ok[None, :]
            K, filt, x_t = _scores(S + z * s_sz, s_sn, s_sm, x_base, s_xn, s_xd, ref, FILT, s_fn, s_fm,
                                   offs_n, offs_m, offs_d, N, M, D, inv_eps, FROM_X, HAS_F, ACC, PREC)
            la = tl.load(LA + z * s_lz + offs_n * s_ln, mask=row_ok, other=0.0).to(ACC)
            f = _row_pot(K, g_p, la, col_ok)
            # column-softmax of the column update t and row-softmax of the row update t
            Cs = _masked_exp(K + f[:, None] + (g_t - lb)[None, :], tile_ok)
            Rs = _masked_exp(K + g_p[None, :] + (f - la)[:, None], tile_ok)
            Cdg = Cs * dg[None, :]
            seed = tl.load(DF0 + z * N + offs_n, mask=row_ok, other=0.0)
            df = tl.where(STEP == 1, seed, 0.0) - tl.sum(Cdg, 1)
            Rdf = Rs * df[:, None]
            dg_part -= tl.sum(Rdf, 0)
            if MARG:
                old = tl.load(DLA + z * N + offs_n, mask=row_ok, other=0.0)
                tl.store(DLA + z * N + offs_n, tl.where(STEP > 1, old, 0.0) + df, mask=row_ok)
            dref = _emit(-(Cdg + Rdf), filt, inv_eps, x_t, ref, dref, dso_base, ds_base, M, 1, dxo_base, dx_base,
                         D, 1, offs_n, offs_m, offs_d, N, M, D, False, last, FROM_X, ACC, PREC)
    tl.store(DG + (STEP % 2) * part + z * NC * M + c * M + offs_m, dg_part, mask=col_ok)
    if FROM_X:
        _store_tile(dref_slot, D, 1, offs_m, offs_d, M, D, dref, False)


# ---------------------------------------------------------------- configuration


# Largest row tile; the tests lower it to 16 so that small problems span several tiles.
BLOCK_N_CAP = 64
# Row chunks (programs) per problem at most; the tests lower it so that chunks hold several tiles.
ROW_CHUNKS = 8


def _config(N: int, M: int, D: int, DV: int, dtype: torch.dtype, backward: bool = False):
    """(constexprs, num_warps) of the forward or the backward kernels.

    The backward sweep keeps about ten (BLOCK_N x m) fp32 tiles live (scores, filter, plan,
    both softmaxes and their products) besides the (m x d) reference and dref tiles: its row
    tile is 16 (32 for m <= 32) and its warps are chosen so that the live elements per thread
    stay within REG_BUDGET (sm_90a/sm_80 ptxas: no spills at the SeTformer shapes). The
    forward keeps a (BLOCK_N x widest) tile near 2K elements.
    """
    bm, bd, bdv = C.pow2(M), C.pow2(D), C.pow2(DV)
    widest = max(bm, bd, bdv)
    if backward:
        bn = max(16, min(BLOCK_N_CAP, C.pow2(N), 32 if bm <= 32 else 16))
        warps = 4 if _live_per_thread(bn, bm, max(bd, bdv), 4) <= REG_BUDGET else 8
    else:
        bn = max(16, min(BLOCK_N_CAP, C.pow2(N), 2048 // widest))
        warps = 4
    return dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, BLOCK_DV=bdv, ACC=C.acc_tl(dtype),
                PREC=C.dot_precision(dtype)), warps


# fp32 elements per thread the backward sweep may keep live (calibrated with ptxas: 144 at the
# SeTformer shape m = 64, d = 32, 4 warps, compiles without spills)
REG_BUDGET = 160


def _live_per_thread(bn: int, bm: int, width: int, warps: int) -> float:
    return (10 * bn * bm + 4 * bm * width) / (32 * warps)


# Shared memory in fp32 elements (the tiles are fp32 inside the kernels) as
# a x m*W + b x BLOCK_N*W + c x BLOCK_N*m, W = max(d, dv) padded, per kernel (variant) and
# input element size: upper bounds of the compiled kernels (sm_80, sm_90a; fp32 inputs keep
# split "tf32x3" operands), checked by tests/test_gpu_compile.py.
_SMEM_COEF = {
    ("_fwd_sweep_kernel", False, 2): (1, 1, 1), ("_fwd_sweep_kernel", False, 4): (3, 2, 0),
    ("_fwd_sweep_kernel", True, 2): (1, 3, 4), ("_fwd_sweep_kernel", True, 4): (3, 4, 5),
    ("_fwd_out_kernel", 2, 2): (2, 1.5, 3), ("_fwd_out_kernel", 2, 4): (6, 3, 0.5),
    ("_bwd_dzeta_kernel", True, 2): (1, 3, 4), ("_bwd_dzeta_kernel", True, 4): (3, 4, 3),
    ("_bwd_sweep_kernel", 1, 2): (5, 3, 3), ("_bwd_sweep_kernel", 1, 4): (10, 2, 5),
    ("_bwd_sweep_kernel", 2, 2): (5, 4, 3), ("_bwd_sweep_kernel", 2, 4): (12, 4, 5),
}


def smem_bytes(kernel: str, meta: dict, opts: dict, dtype: torch.dtype, arch: int = 90) -> int:
    """Shared memory (bytes) one block of kernel needs at config (meta, opts) for inputs of dtype."""
    e = 4 if dtype in (torch.float32, torch.float64) else 2
    bm = meta["BLOCK_M"]
    if kernel == "_fwd_final_kernel":
        return 4 * 8 * bm + 512
    bn, w = meta["BLOCK_N"], max(meta["BLOCK_D"], meta["BLOCK_DV"])
    if not meta.get("FROM_X", True) and kernel != "_bwd_dzeta_kernel":
        # dense scores: no dots, only the cross-warp reductions of a (BLOCK_N x m) tile
        return 4 * bn * bm + 1024
    variant = {"_fwd_sweep_kernel": meta.get("AGG"), "_fwd_out_kernel": 2, "_bwd_dzeta_kernel": True,
               "_bwd_sweep_kernel": meta.get("MODE")}[kernel]
    a, b, c = _SMEM_COEF[(kernel, variant, e)]
    return int(4 * (a * bm * w + b * bn * w + c * bn * bm))


def can_run(n: int, m: int, d: int, dv: int, dtype: torch.dtype, from_x: bool,
            smem_limit: Optional[int]) -> Optional[str]:
    """None if the kernels can run problems of n rows and m columns (references), features d, dv
    (ot: from_x) on a GPU whose blocks may use smem_limit bytes of shared memory (None: no GPU,
    the interpreter); else the reason."""
    if smem_limit is None:
        return None
    bwd, warps = _config(n, m, d, dv, dtype, backward=True)
    if from_x and _live_per_thread(bwd["BLOCK_N"], bwd["BLOCK_M"], max(bwd["BLOCK_D"], bwd["BLOCK_DV"]),
                                   warps) > REG_BUDGET:
        return (f"the backward kernel would spill registers at m={m} references and features d={d}, dv={dv} "
                f"(it keeps about ten {bwd['BLOCK_N']} x {bwd['BLOCK_M']} tiles and the m x d reference live)")
    fwd, fwarps = _config(n, m, d, dv, dtype)
    kernels = [("_fwd_sweep_kernel", dict(fwd, AGG=from_x, FROM_X=from_x), fwarps),
               ("_fwd_out_kernel", dict(fwd, FROM_X=from_x), fwarps),
               ("_bwd_sweep_kernel", dict(bwd, MODE=2 if from_x else 0, FROM_X=from_x), warps)]
    if from_x:
        kernels.append(("_bwd_dzeta_kernel", dict(bwd, FROM_X=True), warps))
    for name, meta, w in kernels:
        need = smem_bytes(name, meta, {"num_warps": w}, dtype)
        if need > smem_limit:
            return (f"{name} needs {need} bytes of shared memory per block at m={m}, d={d}, dv={dv} "
                    f"({str(dtype)[6:]}), more than the {smem_limit} this GPU allows")
    return None


def _chunks(N: int, block_n: int):
    """(chunks per problem, tiles per chunk): at most ROW_CHUNKS chunks of whole tiles; a
    function of n and the tile only, so the merge order is the same on every GPU."""
    tiles = triton.cdiv(N, block_n)
    tpc = triton.cdiv(tiles, ROW_CHUNKS)
    return triton.cdiv(tiles, tpc), tpc


def _scalars(eps: float, c: float, like: torch.Tensor) -> torch.Tensor:
    # filled on the device (no host-to-device copy, so no synchronisation)
    t = torch.empty(2, device=like.device, dtype=C.acc_dtype(like.dtype))
    t[0].fill_(1.0 / eps)
    t[1].fill_(c)
    return t


def _s4(t: Optional[torch.Tensor]):
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


class _Args:
    """Pointer and stride arguments shared by the kernels; absent inputs are a dummy tensor."""

    def __init__(self, S, X, REF, V, FILT, LA, LB, OUT_like):
        dummy = LA
        self.S = S if S is not None else dummy
        self.X = X if X is not None else dummy
        self.REF = REF if REF is not None else dummy
        self.V = V if V is not None else dummy
        self.FILT = FILT if FILT is not None else dummy
        self.LA, self.LB = LA, LB
        self.s_s = tuple(S.stride()) if S is not None else (0, 0, 0)
        self.s_x = _s4(X)
        self.s_r = tuple(REF.stride()) if REF is not None else (0, 0, 0)
        self.s_v = _s4(V)
        self.s_f = tuple(FILT.stride()) if FILT is not None else (0, 0)
        o = OUT_like
        self.s_o = tuple(o.stride()) if o.dim() == 4 else (o.stride(0), 0) + tuple(o.stride()[1:])
        self.s_l = (*LA.stride(), *LB.stride())


def _forward(a: _Args, out, zeta, Z, heads, N, M, D, DV, iters, eps, c_att, dtype, from_x, has_f, mode, like):
    """Run the forward launches; returns G (Z, iters, m)."""
    acc = C.acc_dtype(dtype)
    meta, warps = _config(N, M, D, DV, dtype)
    nc, tpc = _chunks(N, meta["BLOCK_N"])
    block_c = C.pow2(nc, 1)
    G = torch.empty(Z, iters, M, device=like.device, dtype=acc)
    stats = torch.empty(2, 2, Z, nc, M, device=like.device, dtype=acc)
    accp = torch.empty(Z, nc, M, DV, device=like.device, dtype=acc) if mode != 0 else stats
    scal = _scalars(eps, c_att, like)
    for t in range(iters):
        _fwd_sweep_kernel[(Z, nc)](
            a.S, a.X, a.REF, a.V, a.FILT, a.LA, a.LB, G, stats, accp,
            *a.s_s, *a.s_x, *a.s_r, *a.s_v, *a.s_f, *a.s_l,
            Z, heads, N, M, D, DV, iters, t, nc, tpc, scal,
            BLOCK_C=block_c, FROM_X=from_x, HAS_F=has_f, AGG=mode != 0 and t == iters - 1,
            num_warps=warps, **meta,
        )
    _fwd_final_kernel[(Z,)](
        G, stats, accp, a.LB, out, zeta, a.s_l[2], a.s_l[3], *a.s_o,
        Z, heads, M, DV, iters, nc,
        BLOCK_M=meta["BLOCK_M"], BLOCK_DV=meta["BLOCK_DV"], BLOCK_C=block_c, MODE=mode, ACC=meta["ACC"],
        num_warps=4,
    )
    if mode != 1:
        _fwd_out_kernel[(Z, nc)](
            a.S, a.X, a.REF, a.V, a.FILT, a.LA, a.LB, G, zeta, out,
            *a.s_s, *a.s_x, *a.s_r, *a.s_f, *a.s_o, *a.s_l,
            heads, N, M, D, DV, iters, tpc, scal,
            FROM_X=from_x, HAS_F=has_f, MODE=mode, num_warps=warps, **meta,
        )
    return G


def _backward(a: _Args, dout, zeta, G, Z, heads, batch, N, M, D, DV, eps, c_att, dtype, from_x, has_f, mode,
              marg, dS_out, dx_out, dv_out, like):
    """Run the backward launches; returns (dla, dlb, dref partials)."""
    acc = C.acc_dtype(dtype)
    iters = G.shape[-2]
    meta, warps = _config(N, M, D, DV, dtype, backward=True)
    nc, tpc = _chunks(N, meta["BLOCK_N"])
    block_c = C.pow2(nc, 1)
    dev = like.device
    scal = _scalars(eps, c_att, like)
    G = G.contiguous()
    dS = torch.empty(Z, N, M, device=dev, dtype=acc) if not from_x else scal
    dx = torch.empty(Z, N, D, device=dev, dtype=acc) if from_x else scal
    drefp = torch.empty(heads, batch * nc, M, D, device=dev, dtype=acc) if from_x else scal
    df0 = torch.empty(Z, N, device=dev, dtype=acc)
    dla = torch.empty(Z, N, device=dev, dtype=acc) if marg else df0
    dlb = torch.empty(Z, M, device=dev, dtype=acc) if marg else df0
    dg = torch.empty(2, Z, nc, M, device=dev, dtype=acc)
    dz = scal
    if mode == 2:
        dzp = torch.empty(Z, nc, M, DV, device=dev, dtype=acc)
        _bwd_dzeta_kernel[(Z, nc)](
            a.X, a.REF, a.FILT, dout, G, a.LA, dzp,
            *a.s_x, *a.s_r, *a.s_f, *a.s_o, a.s_l[0], a.s_l[1],
            heads, N, M, D, DV, iters, nc, tpc, scal,
            HAS_F=has_f, num_warps=warps, **meta,
        )
        dz = C.sum_partials(dzp.view(Z, nc, M * DV))
    for step in range(iters + 1):
        _bwd_sweep_kernel[(Z, nc)](
            a.S, a.X, a.REF, a.V, a.FILT, dout, zeta, dz, G, a.LA, a.LB,
            dS, dS_out if dS_out is not None else scal, dx, dx_out if dx_out is not None else scal,
            dv_out if dv_out is not None else scal, drefp, df0, dla, dlb, dg,
            *a.s_s, *a.s_x, *a.s_r, *a.s_v, *a.s_f, *a.s_o, *a.s_l,
            Z, heads, batch, N, M, D, DV, iters, step, nc, tpc, scal,
            BLOCK_C=block_c, FROM_X=from_x, HAS_F=has_f, MODE=mode, MARG=marg,
            num_warps=warps, **meta,
        )
    return dla, dlb, drefp


# ---------------------------------------------------------------- launchers


def sinkhorn_fwd(S: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, eps: float, iters: int):
    """S (Z, n, m) any strides; la (Z, n), lb (Z, m) in the accumulation dtype (any strides,
    broadcast views allowed). Returns the plan (Z, n, m) in S.dtype and G (Z, iters, m)."""
    Z, N, M = S.shape
    P = torch.empty(Z, N, M, device=S.device, dtype=S.dtype)
    a = _Args(S, None, None, None, None, la, lb, P)
    G = _forward(a, P, P, Z, 1, N, M, 1, 1, int(iters), eps, 1.0, S.dtype, False, False, 0, S)
    return P, G


def sinkhorn_bwd(dP: torch.Tensor, S: torch.Tensor, la: torch.Tensor, lb: torch.Tensor, G: torch.Tensor,
                 eps: float):
    """Gradients (dS in S.dtype, dla (Z, n), dlb (Z, m) in the accumulation dtype)."""
    Z, N, M = S.shape
    dS = torch.empty(Z, N, M, device=S.device, dtype=S.dtype)
    a = _Args(S, None, None, None, None, la, lb, dP)
    dla, dlb, _ = _backward(a, dP, G, G, Z, 1, Z, N, M, 1, 1, eps, 1.0, S.dtype, False, False, 0, True,
                            dS, None, None, S)
    return dS, dla, dlb


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
    acc = C.acc_dtype(x.dtype)
    la, lb = _ot_marginals(B * H, N, M, x.device, acc)
    out = torch.empty(B, H, N if attention else M, DV, device=x.device, dtype=x.dtype)
    zeta = torch.empty(B, H, M, DV, device=x.device, dtype=acc) if attention else x.new_empty((0,), dtype=acc)
    a = _Args(None, x, ref, v, filt, la, lb, out)
    G = _forward(a, out, zeta if attention else out, B * H, H, N, M, D, DV, int(iters), eps, N / M, x.dtype,
                 True, filt is not None, 2 if attention else 1, x)
    return out, zeta, G.view(B, H, iters, M)


def ot_bwd(dout, x, ref, v, filt, zeta, G, eps: float, attention: bool):
    """Gradients (dx, dref, dv) of ot_fwd in the input dtypes."""
    B, H, N, D = x.shape
    M, DV = ref.shape[1], v.shape[-1]
    acc = C.acc_dtype(x.dtype)
    la, lb = _ot_marginals(B * H, N, M, x.device, acc)
    zeta = zeta.contiguous() if attention else G
    dx = torch.empty(B, H, N, D, device=x.device, dtype=x.dtype)
    dv = torch.empty(B, H, N, DV, device=x.device, dtype=v.dtype)
    a = _Args(None, x, ref, v, filt, la, lb, dout)
    _, _, drefp = _backward(a, dout, zeta, G.reshape(B * H, -1, M), B * H, H, B, N, M, D, DV, eps, N / M, x.dtype,
                            True, filt is not None, 2 if attention else 1, False, None, dx, dv, x)
    # ref is shared by the batch: the per-(image, chunk) partials summed in a fixed order
    dref = C.sum_partials(drefp.view(H, -1, M * D)).view(H, M, D)
    return dx, dref.to(ref.dtype), dv
