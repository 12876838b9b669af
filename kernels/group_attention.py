"""Triton kernels for SReT group / permuted attention.

The N tokens of every (batch, head) are read in permuted order p = 0..N-1 through
t = perm[p] and split into G groups of n = N / G consecutive permuted positions;
each group attends to itself. Problems are indexed by z = (b * heads + h) * G + g.
Rows are gathered through perm inside the kernels (q, k, v, dO, lse, delta) and
results are stored straight to their original token rows, so no permuted copy
of any tensor exists in memory.

Two layouts, chosen per call from the group size:

* packed (n fits one tile): a program owns PACK consecutive whole problems, all
  in one tile; logits are masked block-diagonally (row and column must belong
  to the same problem). Problems of different heads or images may share a
  program. The backward is a single kernel (dq, dk, dv from one tile) with
  delta = rowsum(P * dP), so it needs neither O nor atomics.
* tiled (large groups): flash-attention over the group, one program per query
  block (forward, dq) or key block (dk/dv), with the saved log-sum-exp and a
  precomputed delta = rowsum(dO * O).

Everything is deterministic. Accumulation is fp32 (fp64 for fp64 inputs); fp32
products are exact ("ieee"), never silent TF32.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _locate(z, pos, ok, PERM, G, HEADS, n, N, HAS_PERM: tl.constexpr):
    """(b, h, token, ok) of the rows at position `pos` of problems `z` (int64 vectors)."""
    g = z % G
    bh = z // G
    h = bh % HEADS
    b = bh // HEADS
    p = g * n + pos
    if HAS_PERM:
        t = tl.load(PERM + p, mask=ok, other=0)
        # an invalid perm (unchecked under torch.compile) must not touch memory out of range
        ok = ok & (t >= 0) & (t < N)
    else:
        t = p
    return b, h, t, ok


@triton.jit
def _gather(base, b, h, t, sb, sh, sn, sf, offs_f, ok, n_feat):
    ptrs = base + b[:, None] * sb + h[:, None] * sh + t[:, None] * sn + offs_f[None, :] * sf
    return tl.load(ptrs, mask=ok[:, None] & (offs_f < n_feat)[None, :], other=0.0)


@triton.jit
def _scatter(base, x, b, h, t, sb, sh, sn, sf, offs_f, ok, n_feat):
    ptrs = base + b[:, None] * sb + h[:, None] * sh + t[:, None] * sn + offs_f[None, :] * sf
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=ok[:, None] & (offs_f < n_feat)[None, :])


@triton.jit
def _rows(pid_a, pid_b, Z, n, BLOCK: tl.constexpr, PACK: tl.constexpr, PACKED: tl.constexpr):
    """Problem index and in-group position of the BLOCK rows a program owns."""
    r = tl.arange(0, BLOCK)
    if PACKED:
        z = pid_a.to(tl.int64) * PACK + (r // n).to(tl.int64)
        pos = r % n
        ok = (r < PACK * n) & (z < Z)
    else:
        z = tl.zeros([BLOCK], tl.int64) + pid_b
        pos = pid_a * BLOCK + r
        ok = pos < n
    return z, pos, ok


@triton.jit
def _group_fwd_kernel(
    Q, K, V, O, LSE, PERM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    slb, slh, sln,
    Z, HEADS, G, n, N, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PACK: tl.constexpr, PACKED: tl.constexpr, HAS_PERM: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    # packed grid: (packs,); tiled grid: (problems, query blocks) -- problems on axis 0, whose
    # limit is 2**31 - 1 rather than 65535
    if PACKED:
        pid_a = tl.program_id(0)
        pid_b = 0
    else:
        pid_a = tl.program_id(1)
        pid_b = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    zr, pr, okr = _rows(pid_a, pid_b, Z, n, BLOCK_M, PACK, PACKED)
    br, hr, tr, okr = _locate(zr, pr, okr, PERM, G, HEADS, n, N, HAS_PERM)
    q = _gather(Q, br, hr, tr, sqb, sqh, sqn, sqd, offs_d, okr, D)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    # packed: the keys are the program's own rows (one step); tiled: walk the group
    if PACKED:
        n_steps = 1
    else:
        n_steps = tl.cdiv(n, BLOCK_N)
    for step in range(0, n_steps):
        if PACKED:
            zc, bc, hc, tc, okc = zr, br, hr, tr, okr
        else:
            zc, pc, okc = _rows(step, pid_b, Z, n, BLOCK_N, PACK, PACKED)
            bc, hc, tc, okc = _locate(zc, pc, okc, PERM, G, HEADS, n, N, HAS_PERM)
        k = _gather(K, bc, hc, tc, skb, skh, skn, skd, offs_d, okc, D)
        v = _gather(V, bc, hc, tc, svb, svh, svn, svd, offs_dv, okc, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        keep = okc[None, :] & (zr[:, None] == zc[None, :])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows with no key yet (padding) keep m = -inf; shift by 0 there to avoid inf - inf
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new

    l_safe = tl.where(okr, l_i, 1.0)
    _scatter(O, acc / l_safe[:, None], br, hr, tr, sob, soh, son, sod, offs_dv, okr, DV)
    tl.store(LSE + br * slb + hr * slh + tr * sln, m_i + tl.log(l_safe), mask=okr)


@triton.jit
def _group_bwd_packed_kernel(
    Q, K, V, DO, LSE, DQ, DK, DV_, PERM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    slb, slh, sln,
    sgqb, sgqh, sgqn, sgqd,
    sgkb, sgkh, sgkn, sgkd,
    sgvb, sgvh, sgvn, sgvd,
    Z, HEADS, G, n, N, D, DV, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PACK: tl.constexpr, HAS_PERM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    # every problem of the program lies inside this one tile: rows and columns are the same tokens
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    z, pos, ok = _rows(pid, 0, Z, n, BLOCK, PACK, True)
    b, h, t, ok = _locate(z, pos, ok, PERM, G, HEADS, n, N, HAS_PERM)
    q = _gather(Q, b, h, t, sqb, sqh, sqn, sqd, offs_d, ok, D)
    k = _gather(K, b, h, t, skb, skh, skn, skd, offs_d, ok, D)
    v = _gather(V, b, h, t, svb, svh, svn, svd, offs_dv, ok, DV)
    do = _gather(DO, b, h, t, sdob, sdoh, sdon, sdod, offs_dv, ok, DV)
    lse = tl.load(LSE + b * slb + h * slh + t * sln, mask=ok, other=0.0)

    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
    keep = ok[:, None] & ok[None, :] & (z[:, None] == z[None, :])
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
    # the whole row is here: delta = rowsum(P * dP) (= rowsum(dO * O)) without reading O
    delta = tl.sum(p * dp, 1)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC) * scale
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC, out_dtype=ACC) * scale
    _scatter(DQ, dq, b, h, t, sgqb, sgqh, sgqn, sgqd, offs_d, ok, D)
    _scatter(DK, dk, b, h, t, sgkb, sgkh, sgkn, sgkd, offs_d, ok, D)
    _scatter(DV_, dv, b, h, t, sgvb, sgvh, sgvn, sgvd, offs_dv, ok, DV)


@triton.jit
def _group_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_, PERM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    slb, slh, sln,
    sgkb, sgkh, sgkn, sgkd,
    sgvb, sgvh, sgvn, sgvd,
    Z, HEADS, G, n, N, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PERM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    # tiled layout: one program owns a block of keys of one group and walks its query blocks
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    zc, pc, okc = _rows(pid_n, pid_z, Z, n, BLOCK_N, 1, False)
    bc, hc, tc, okc = _locate(zc, pc, okc, PERM, G, HEADS, n, N, HAS_PERM)
    k = _gather(K, bc, hc, tc, skb, skh, skn, skd, offs_d, okc, D)
    v = _gather(V, bc, hc, tc, svb, svh, svn, svd, offs_dv, okc, DV)

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    for m_blk in range(0, tl.cdiv(n, BLOCK_M)):
        zr, pr, okr = _rows(m_blk, pid_z, Z, n, BLOCK_M, 1, False)
        br, hr, tr, okr = _locate(zr, pr, okr, PERM, G, HEADS, n, N, HAS_PERM)
        q = _gather(Q, br, hr, tr, sqb, sqh, sqn, sqd, offs_d, okr, D)
        do = _gather(DO, br, hr, tr, sdob, sdoh, sdon, sdod, offs_dv, okr, DV)
        l_off = br * slb + hr * slh + tr * sln
        lse = tl.load(LSE + l_off, mask=okr, other=0.0)
        delta = tl.load(DELTA + l_off, mask=okr, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        p = tl.where(okr[:, None] & okc[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC, out_dtype=ACC)

    _scatter(DK, dk * scale, bc, hc, tc, sgkb, sgkh, sgkn, sgkd, offs_d, okc, D)
    _scatter(DV_, dv, bc, hc, tc, sgvb, sgvh, sgvn, sgvd, offs_dv, okc, DV)


@triton.jit
def _group_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, PERM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    slb, slh, sln,
    sgqb, sgqh, sgqn, sgqd,
    Z, HEADS, G, n, N, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PERM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    # tiled layout: one program owns a block of queries of one group and walks its key blocks
    pid_m = tl.program_id(1)
    pid_z = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    zr, pr, okr = _rows(pid_m, pid_z, Z, n, BLOCK_M, 1, False)
    br, hr, tr, okr = _locate(zr, pr, okr, PERM, G, HEADS, n, N, HAS_PERM)
    q = _gather(Q, br, hr, tr, sqb, sqh, sqn, sqd, offs_d, okr, D)
    do = _gather(DO, br, hr, tr, sdob, sdoh, sdon, sdod, offs_dv, okr, DV)
    l_off = br * slb + hr * slh + tr * sln
    lse = tl.load(LSE + l_off, mask=okr, other=0.0)
    delta = tl.load(DELTA + l_off, mask=okr, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n_blk in range(0, tl.cdiv(n, BLOCK_N)):
        zc, pc, okc = _rows(n_blk, pid_z, Z, n, BLOCK_N, 1, False)
        bc, hc, tc, okc = _locate(zc, pc, okc, PERM, G, HEADS, n, N, HAS_PERM)
        k = _gather(K, bc, hc, tc, skb, skh, skn, skd, offs_d, okc, D)
        v = _gather(V, bc, hc, tc, svb, svh, svn, svd, offs_dv, okc, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        p = tl.where(okr[:, None] & okc[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)

    _scatter(DQ, dq * scale, br, hr, tr, sgqb, sgqh, sgqn, sgqd, offs_d, okr, D)


@triton.jit
def _delta_kernel(
    DO, O, DELTA,
    sdob, sdoh, sdon, sdod,
    sob, soh, son, sod,
    HEADS, N, DV, ROWS,
    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
):
    # delta = rowsum(dO * O) per token, accumulated in ACC without fp32 copies of dO and O
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < ROWS
    t = rows % N
    bh = rows // N
    h = bh % HEADS
    b = bh // HEADS
    offs = tl.arange(0, BLOCK_DV)
    do = _gather(DO, b, h, t, sdob, sdoh, sdon, sdod, offs, ok, DV).to(ACC)
    o = _gather(O, b, h, t, sob, soh, son, sod, offs, ok, DV).to(ACC)
    tl.store(DELTA + rows, tl.sum(do * o, 1), mask=ok)


# ---------------------------------------------------------------- launchers


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def config(n: int, D: int, DV: int, dtype: torch.dtype, block: Optional[int] = None,
           backward: bool = False) -> dict:
    """Tile sizes and layout for groups of n tokens (forward, or backward with ``backward``).

    ``block`` overrides the largest tile (tests use it to reach the tiled layout cheaply).
    """
    bd, bdv = _pow2(D), _pow2(DV)
    widest = max(bd, bdv)
    cap = 128 if widest <= 64 else (64 if widest <= 128 else 32)
    if dtype in (torch.float32, torch.float64):
        cap //= 2  # wider elements: halve the tile to stay within registers / shared memory
    if backward:
        # the packed backward keeps four tile x tile matrices (S, P, dP, dS) live at once
        cap = min(cap, 64)
    if block is not None:
        cap = int(block)
    if _pow2(n) <= cap:
        # packed: at least 64 rows per program, so tiny groups share a program
        tile = max(_pow2(n), min(cap, 64))
        meta = dict(BLOCK_M=tile, BLOCK_N=tile, PACK=tile // n, PACKED=True)
        big = tile * max(tile, widest) > 64 * 64 or (backward and tile >= 64)
        warps = 8 if big else 4
    else:
        tile = min(cap, 64)
        meta = dict(BLOCK_M=tile, BLOCK_N=tile, PACK=1, PACKED=False)
        warps = 4 if tile * widest <= 64 * 64 else 8
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # fp32 inputs: exact fp32 products (no silent TF32) so results match the reference
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    meta.update(BLOCK_D=bd, BLOCK_DV=bdv, ACC=acc, PREC=prec, num_warps=warps)
    return meta


def _st(t: torch.Tensor):
    return tuple(t.stride())


def group_attention_fwd(q, k, v, perm: Optional[torch.Tensor], groups: int, scale: float,
                        block: Optional[int] = None):
    """q, k (B, heads, N, d), v (B, heads, N, dv), any strides; perm (N,) int64 or None.

    Returns out (B, heads, N, dv) contiguous in q.dtype and lse (B, heads, N) fp32/fp64,
    both in the original token order.
    """
    B, HEADS, N, D = q.shape
    DV = v.shape[-1]
    n = N // groups
    Z = B * HEADS * groups
    out = torch.empty(B, HEADS, N, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HEADS, N, device=q.device, dtype=_acc_dtype(q.dtype))
    meta = config(n, D, DV, q.dtype, block)
    if meta["PACKED"]:
        grid = (triton.cdiv(Z, meta["PACK"]), 1)
    else:
        grid = (Z, triton.cdiv(n, meta["BLOCK_M"]))
    has_perm = perm is not None
    _group_fwd_kernel[grid](
        q, k, v, out, lse, perm if has_perm else q,
        *_st(q), *_st(k), *_st(v), *_st(out), *_st(lse),
        Z, HEADS, groups, n, N, D, DV, float(scale), HAS_PERM=has_perm, **meta,
    )
    return out, lse


def group_attention_bwd(dout, q, k, v, out, lse, perm: Optional[torch.Tensor], groups: int,
                        scale: float, block: Optional[int] = None):
    """Gradients dq, dk, dv (contiguous, input dtypes); any strides in."""
    B, HEADS, N, D = q.shape
    DV = v.shape[-1]
    n = N // groups
    Z = B * HEADS * groups
    dq = torch.empty(B, HEADS, N, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, HEADS, N, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, HEADS, N, DV, device=q.device, dtype=v.dtype)
    meta = config(n, D, DV, q.dtype, block, backward=True)
    has_perm = perm is not None
    perm_arg = perm if has_perm else q
    common = (*_st(q), *_st(k), *_st(v), *_st(dout), *_st(lse))
    sizes = (Z, HEADS, groups, n, N, D, DV, float(scale))
    if meta["PACKED"]:
        _group_bwd_packed_kernel[(triton.cdiv(Z, meta["PACK"]),)](
            q, k, v, dout, lse, dq, dk, dv, perm_arg, *common, *_st(dq), *_st(dk), *_st(dv), *sizes,
            BLOCK=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"], BLOCK_DV=meta["BLOCK_DV"], PACK=meta["PACK"],
            HAS_PERM=has_perm, ACC=meta["ACC"], PREC=meta["PREC"], num_warps=meta["num_warps"],
        )
        return dq, dk, dv
    # delta_i = rowsum(dO_i * O_i) is per token: formed in the original order, gathered in-kernel
    # with lse's strides
    lse = lse.contiguous()
    delta = torch.empty(B, HEADS, N, device=q.device, dtype=lse.dtype)
    rows = B * HEADS * N
    block_r = 32
    _delta_kernel[(triton.cdiv(rows, block_r),)](
        dout, out, delta, *_st(dout), *_st(out), HEADS, N, DV, rows,
        BLOCK_R=block_r, BLOCK_DV=meta["BLOCK_DV"], ACC=meta["ACC"], num_warps=4,
    )
    common = (*_st(q), *_st(k), *_st(v), *_st(dout), *_st(lse))
    tiles = dict(BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"], BLOCK_D=meta["BLOCK_D"],
                 BLOCK_DV=meta["BLOCK_DV"], HAS_PERM=has_perm, ACC=meta["ACC"], PREC=meta["PREC"],
                 num_warps=meta["num_warps"])
    _group_bwd_dkdv_kernel[(Z, triton.cdiv(n, meta["BLOCK_N"]))](
        q, k, v, dout, lse, delta, dk, dv, perm_arg, *common, *_st(dk), *_st(dv), *sizes, **tiles,
    )
    _group_bwd_dq_kernel[(Z, triton.cdiv(n, meta["BLOCK_M"]))](
        q, k, v, dout, lse, delta, dq, perm_arg, *common, *_st(dq), *sizes, **tiles,
    )
    return dq, dk, dv
