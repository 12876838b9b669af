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
def _problem(z, G, HEADS):
    """(b, h, g) of problem index z = (b * HEADS + h) * G + g (int32, scalar or vector)."""
    g = z % G
    bh = z // G
    return bh // HEADS, bh % HEADS, g


@triton.jit
def _tokens(g, pos, ok, PERM, n, N, HAS_PERM: tl.constexpr):
    """Original token index of in-group position `pos` of group g, and the row mask.

    The index is kept as int32 (N < 2**31; half the registers of int64), widened in _off.
    """
    p = g * n + pos
    if HAS_PERM:
        t = tl.load(PERM + p, mask=ok, other=0)
        # an invalid perm (unchecked under torch.compile) must not touch memory out of range
        ok = ok & (t >= 0) & (t < N)
        t = t.to(tl.int32)
    else:
        t = p
    return t, ok


@triton.jit
def _off(b, h, t, sb, sh, sn):
    # int64 row offsets; index arithmetic stays int32 (64-bit division is slow and register-hungry)
    return b.to(tl.int64) * sb + h.to(tl.int64) * sh + t.to(tl.int64) * sn


@triton.jit
def _load_rows(base, off, sf, offs_f, ok, n_feat):
    ptrs = base + off[:, None] + offs_f[None, :] * sf
    return tl.load(ptrs, mask=ok[:, None] & (offs_f < n_feat)[None, :], other=0.0)


@triton.jit
def _store_rows(base, x, off, sf, offs_f, ok, n_feat):
    ptrs = base + off[:, None] + offs_f[None, :] * sf
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=ok[:, None] & (offs_f < n_feat)[None, :])


@triton.jit
def _packed_rows(pid, Z, n, BLOCK: tl.constexpr, PACK: tl.constexpr):
    """Problem index and in-group position of the rows of a program owning PACK whole problems."""
    r = tl.arange(0, BLOCK)
    z = pid * PACK + r // n
    pos = r % n
    ok = (r < PACK * n) & (z < Z)
    return z, pos, ok


@triton.jit
def _group_fwd_packed_kernel(
    Q, K, V, O, LSE, PERM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    slb, slh, sln,
    Z, HEADS, G, n, N, D, DV, scale,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PACK: tl.constexpr,
    HAS_PERM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    # PACK whole problems in one tile: the keys are the program's own rows and the logits are
    # masked block-diagonally, so the softmax is direct (no online rescaling)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    z, pos, ok = _packed_rows(tl.program_id(0), Z, n, BLOCK, PACK)
    b, h, g = _problem(z, G, HEADS)
    t, ok = _tokens(g, pos, ok, PERM, n, N, HAS_PERM)
    q = _load_rows(Q, _off(b, h, t, sqb, sqh, sqn), sqd, offs_d, ok, D)
    k = _load_rows(K, _off(b, h, t, skb, skh, skn), skd, offs_d, ok, D)
    v = _load_rows(V, _off(b, h, t, svb, svh, svn), svd, offs_dv, ok, DV)

    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
    # padding rows (r >= PACK * n) never share a problem index with a valid column
    s = tl.where(ok[None, :] & (z[:, None] == z[None, :]), s, float("-inf"))
    m = tl.where(ok, tl.max(s, 1), 0.0)
    p = tl.exp(s - m[:, None])
    l = tl.where(ok, tl.sum(p, 1), 1.0)
    acc = tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
    _store_rows(O, acc / l[:, None], _off(b, h, t, sob, soh, son), sod, offs_dv, ok, DV)
    tl.store(LSE + _off(b, h, t, slb, slh, sln), m + tl.log(l), mask=ok)


@triton.jit
def _group_fwd_tiled_kernel(
    Q, K, V, O, LSE, PERM,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    slb, slh, sln,
    Z, HEADS, G, n, N, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_PERM: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    # grid (problems, query blocks): problems on axis 0, whose limit is 2**31 - 1, not 65535
    b, h, g = _problem(tl.program_id(0), G, HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tr, okr = _tokens(g, pos, pos < n, PERM, n, N, HAS_PERM)
    q = _load_rows(Q, _off(b, h, tr, sqb, sqh, sqn), sqd, offs_d, okr, D)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    for n0 in range(0, n, BLOCK_N):
        pc = n0 + tl.arange(0, BLOCK_N)
        tc, okc = _tokens(g, pc, pc < n, PERM, n, N, HAS_PERM)
        k = _load_rows(K, _off(b, h, tc, skb, skh, skn), skd, offs_d, okc, D)
        v = _load_rows(V, _off(b, h, tc, svb, svh, svn), svd, offs_dv, okc, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        s = tl.where(okc[None, :], s, float("-inf"))
        # every row has a valid key in the first block, so m_new is finite from the start
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new

    _store_rows(O, acc / l_i[:, None], _off(b, h, tr, sob, soh, son), sod, offs_dv, okr, DV)
    tl.store(LSE + _off(b, h, tr, slb, slh, sln), m_i + tl.log(l_i), mask=okr)


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
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    z, pos, ok = _packed_rows(tl.program_id(0), Z, n, BLOCK, PACK)
    b, h, g = _problem(z, G, HEADS)
    t, ok = _tokens(g, pos, ok, PERM, n, N, HAS_PERM)
    q = _load_rows(Q, _off(b, h, t, sqb, sqh, sqn), sqd, offs_d, ok, D)
    k = _load_rows(K, _off(b, h, t, skb, skh, skn), skd, offs_d, ok, D)
    v = _load_rows(V, _off(b, h, t, svb, svh, svn), svd, offs_dv, ok, DV)
    do = _load_rows(DO, _off(b, h, t, sdob, sdoh, sdon), sdod, offs_dv, ok, DV)
    lse = tl.load(LSE + _off(b, h, t, slb, slh, sln), mask=ok, other=0.0)

    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
    keep = ok[:, None] & ok[None, :] & (z[:, None] == z[None, :])
    p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
    # the stored lse is rounded (|lse| ~ 1e4 leaves rows summing to 1 + 1e-3 in fp32), and
    # delta below is taken from these same rows: renormalise so that each row of dS sums to 0
    row = tl.sum(p, 1)
    p = p / tl.where(row > 0, row, 1.0)[:, None]
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
    # the whole row is here: delta = rowsum(P * dP) (= rowsum(dO * O)) without reading O
    delta = tl.sum(p * dp, 1)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC) * scale
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC, out_dtype=ACC) * scale
    _store_rows(DQ, dq, _off(b, h, t, sgqb, sgqh, sgqn), sgqd, offs_d, ok, D)
    _store_rows(DK, dk, _off(b, h, t, sgkb, sgkh, sgkn), sgkd, offs_d, ok, D)
    _store_rows(DV_, dv, _off(b, h, t, sgvb, sgvh, sgvn), sgvd, offs_dv, ok, DV)


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
    # tiled layout, grid (problems, key blocks): one program owns a block of keys of one group
    # and walks the group's query blocks (delta and lse are per token, laid out like lse)
    b, h, g = _problem(tl.program_id(0), G, HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pc = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    tc, okc = _tokens(g, pc, pc < n, PERM, n, N, HAS_PERM)
    k = _load_rows(K, _off(b, h, tc, skb, skh, skn), skd, offs_d, okc, D)
    v = _load_rows(V, _off(b, h, tc, svb, svh, svn), svd, offs_dv, okc, DV)

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    for m0 in range(0, n, BLOCK_M):
        pr = m0 + tl.arange(0, BLOCK_M)
        tr, okr = _tokens(g, pr, pr < n, PERM, n, N, HAS_PERM)
        q = _load_rows(Q, _off(b, h, tr, sqb, sqh, sqn), sqd, offs_d, okr, D)
        do = _load_rows(DO, _off(b, h, tr, sdob, sdoh, sdon), sdod, offs_dv, okr, DV)
        l_off = _off(b, h, tr, slb, slh, sln)
        lse = tl.load(LSE + l_off, mask=okr, other=0.0)
        delta = tl.load(DELTA + l_off, mask=okr, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        p = tl.where(okr[:, None] & okc[None, :], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC, out_dtype=ACC)

    _store_rows(DK, dk * scale, _off(b, h, tc, sgkb, sgkh, sgkn), sgkd, offs_d, okc, D)
    _store_rows(DV_, dv, _off(b, h, tc, sgvb, sgvh, sgvn), sgvd, offs_dv, okc, DV)


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
    # tiled layout, grid (problems, query blocks): one program owns a block of queries of one
    # group and walks the group's key blocks
    b, h, g = _problem(tl.program_id(0), G, HEADS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    pr = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    tr, okr = _tokens(g, pr, pr < n, PERM, n, N, HAS_PERM)
    q = _load_rows(Q, _off(b, h, tr, sqb, sqh, sqn), sqd, offs_d, okr, D)
    do = _load_rows(DO, _off(b, h, tr, sdob, sdoh, sdon), sdod, offs_dv, okr, DV)
    l_off = _off(b, h, tr, slb, slh, sln)
    lse = tl.load(LSE + l_off, mask=okr, other=0.0)
    delta = tl.load(DELTA + l_off, mask=okr, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for n0 in range(0, n, BLOCK_N):
        pc = n0 + tl.arange(0, BLOCK_N)
        tc, okc = _tokens(g, pc, pc < n, PERM, n, N, HAS_PERM)
        k = _load_rows(K, _off(b, h, tc, skb, skh, skn), skd, offs_d, okc, D)
        v = _load_rows(V, _off(b, h, tc, svb, svh, svn), svd, offs_dv, okc, DV)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
        p = tl.where(okr[:, None] & okc[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)

    _store_rows(DQ, dq * scale, _off(b, h, tr, sgqb, sgqh, sgqn), sgqd, offs_d, okr, D)


@triton.jit
def _delta_kernel(
    DO, O, DELTA,
    sdob, sdoh, sdon, sdod,
    sob, soh, son, sod,
    HEADS, N, DV, ROWS,
    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr, ACC: tl.constexpr,
):
    # delta = rowsum(dO * O) per token (B, heads, N contiguous), accumulated in ACC without
    # fp32 copies of dO and O
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < ROWS
    t = rows % N
    bh = rows // N
    h = bh % HEADS
    b = bh // HEADS
    offs = tl.arange(0, BLOCK_DV)
    do = _load_rows(DO, _off(b, h, t, sdob, sdoh, sdon), sdod, offs, ok, DV).to(ACC)
    o = _load_rows(O, _off(b, h, t, sob, soh, son), sod, offs, ok, DV).to(ACC)
    tl.store(DELTA + rows, tl.sum(do * o, 1), mask=ok)


# ---------------------------------------------------------------- launchers


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(x)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def config(n: int, D: int, DV: int, dtype: torch.dtype, block: Optional[int] = None,
           backward: bool = False) -> dict:
    """Tile sizes, layout and warps for groups of n tokens (forward, or backward with ``backward``).

    The tiles are the largest that compile for sm_90 without register spills (checked with
    ptxas through triton.compile for the SReT head dims 32 / 42 and 64 / 128): the backward
    keeps more tile x tile matrices live (S, P, dP, dS) than the forward, and fp32 products
    are exact FMA dots ("ieee"), which need much smaller tiles than fp16/bf16 tensor-core dots.
    ``block`` overrides the largest tile (tests use it to reach the tiled layout cheaply).
    """
    bd, bdv = _pow2(D), _pow2(DV)
    widest = max(bd, bdv)
    if dtype in (torch.float16, torch.bfloat16):
        if widest <= 32:
            cap = 64
        elif widest <= 64:
            cap = 32 if backward else 64
        else:
            cap = 32 if widest <= 128 else 16
    elif dtype == torch.float32:
        cap = 32 if widest <= 32 and not backward else 16
    else:
        # fp64 runs only under the interpreter (never on the GPU): larger tiles, fewer programs
        cap = 64 if widest <= 64 else 32
    if block is not None:
        cap = int(block)
    if _pow2(n) <= cap:
        # packed: tiny groups share a program (PACK whole groups per tile)
        tile = _pow2(n) if block is not None else max(_pow2(n), cap)
        meta = dict(BLOCK_M=tile, BLOCK_N=tile, PACK=tile // n, PACKED=True)
        warps = 8 if backward or tile * widest > 64 * 32 else 4
    else:
        tile = cap
        meta = dict(BLOCK_M=tile, BLOCK_N=tile, PACK=1, PACKED=False)
        warps = 8 if backward and tile * widest >= 64 * 64 else 4
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # fp32 inputs: exact fp32 products ("ieee", never silent TF32) where they fit the registers;
    # from head dim 64 the FMA dots spill and three TF32 products ("tf32x3", fp32-level error)
    # take over (see kernels/_common.py dot_precision)
    prec = "ieee" if dtype == torch.float64 or (dtype == torch.float32 and widest <= 32) else (
        "tf32x3" if dtype == torch.float32 else "tf32")
    meta.update(BLOCK_D=bd, BLOCK_DV=bdv, ACC=acc, PREC=prec, num_warps=warps)
    return meta


FP32_MAX_HEAD_DIM = 128
# Shared memory in elements of the input dtype (see kernels/masa.py): tiled kernels a x the
# streamed tiles + b x the program's own tiles + c x the logits tile; packed kernels hold
# their q, k, v (and dO) tiles and the logits tile. Upper bounds of the compiled kernels
# (sm_80, sm_90a), checked by tests/test_gpu_compile.py.
_SMEM_COEF = {
    ("_group_fwd_tiled_kernel", 2): (2.0, 2.5, 0.5), ("_group_fwd_tiled_kernel", 4): (2.5, 2.0, 1.0),
    ("_group_bwd_dq_kernel", 2): (2.0, 1.5, 0.5), ("_group_bwd_dq_kernel", 4): (2.0, 3.0, 1.0),
    ("_group_bwd_dkdv_kernel", 2): (1.5, 2.0, 1.5), ("_group_bwd_dkdv_kernel", 4): (1.5, 3.0, 3.0),
    ("_group_fwd_packed_kernel", 2): (0.0, 1.5, 1.0), ("_group_fwd_packed_kernel", 4): (0.0, 2.0, 2.0),
    ("_group_bwd_packed_kernel", 2): (0.0, 2.0, 2.0), ("_group_bwd_packed_kernel", 4): (0.0, 3.0, 3.0),
}


def smem_bytes(kernel: str, meta: dict, opts: dict, dtype: torch.dtype, arch: int = 90) -> int:
    """Shared memory (bytes) one block of kernel needs at config (meta, opts) for inputs of dtype."""
    e = 4 if dtype in (torch.float32, torch.float64) else 2
    if kernel == "_delta_kernel":
        return 8 * meta["BLOCK_R"] * e
    bd, bdv = meta["BLOCK_D"], meta["BLOCK_DV"]
    if "packed" in kernel:
        bm = bn = meta["BLOCK"]
        streamed, kept = 0, bm * (2 * bd + 2 * bdv)
    else:
        bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
        if kernel == "_group_bwd_dkdv_kernel":
            streamed, kept = bm * (bd + bdv), bn * (bd + bdv)
        elif kernel == "_group_bwd_dq_kernel":
            streamed, kept = bn * (bd + bdv), bm * (bd + bdv)
        else:
            streamed, kept = bn * (bd + bdv), bm * bd
    a, b, c = _SMEM_COEF[(kernel, e)]
    return int(e * (a * streamed + b * kept + c * bm * bn))


def _kernels_for(meta: dict, backward: bool):
    if meta["PACKED"]:
        return ["_group_bwd_packed_kernel" if backward else "_group_fwd_packed_kernel"]
    return ["_group_bwd_dkdv_kernel", "_group_bwd_dq_kernel"] if backward else ["_group_fwd_tiled_kernel"]


def can_run(n: int, D: int, DV: int, dtype: torch.dtype, smem_limit: Optional[int]) -> Optional[str]:
    """None if the kernels can run groups of n tokens with head dims D, DV on a GPU whose blocks may
    use smem_limit bytes of shared memory (None: no GPU, the interpreter); else the reason."""
    if max(D, DV) > 256:
        return f"head dims up to 256 are supported, got d={D}, dv={DV}"
    if smem_limit is None:
        return None
    if dtype == torch.float32 and max(_pow2(D), _pow2(DV)) > FP32_MAX_HEAD_DIM:
        return (f"float32 head dims above {FP32_MAX_HEAD_DIM} spill registers in every tile size the "
                f"kernels can use (measured with ptxas), got d={D}, dv={DV}")
    for backward in (False, True):
        meta = config(n, D, DV, dtype, backward=backward)
        for name in _kernels_for(meta, backward):
            tiles = dict(meta)
            if "packed" in name:
                tiles["BLOCK"] = meta["BLOCK_M"]
            need = smem_bytes(name, tiles, {"num_warps": meta["num_warps"]}, dtype)
            if need > smem_limit:
                return (f"{name} needs {need} bytes of shared memory per block at head dims d={D}, dv={DV} "
                        f"({str(dtype)[6:]}), more than the {smem_limit} this GPU allows")
    return None


def _check_sizes(rows: int) -> None:
    # token and problem indices are int32 inside the kernels (offsets are int64)
    if rows >= 2**31:
        raise ValueError(f"group_attention: B * heads * N must be < 2**31 for the Triton kernels, got {rows}")


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
    _check_sizes(B * HEADS * N)
    out = torch.empty(B, HEADS, N, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HEADS, N, device=q.device, dtype=_acc_dtype(q.dtype))
    meta = config(n, D, DV, q.dtype, block)
    has_perm = perm is not None
    args = (q, k, v, out, lse, perm if has_perm else q,
            *_st(q), *_st(k), *_st(v), *_st(out), *_st(lse), Z, HEADS, groups, n, N, D, DV, float(scale))
    common = dict(BLOCK_D=meta["BLOCK_D"], BLOCK_DV=meta["BLOCK_DV"], HAS_PERM=has_perm, ACC=meta["ACC"],
                  PREC=meta["PREC"], num_warps=meta["num_warps"])
    if meta["PACKED"]:
        _group_fwd_packed_kernel[(triton.cdiv(Z, meta["PACK"]),)](
            *args, BLOCK=meta["BLOCK_M"], PACK=meta["PACK"], **common)
    else:
        _group_fwd_tiled_kernel[(Z, triton.cdiv(n, meta["BLOCK_M"]))](
            *args, BLOCK_M=meta["BLOCK_M"], BLOCK_N=meta["BLOCK_N"], **common)
    return out, lse


def group_attention_bwd(dout, q, k, v, out, lse, perm: Optional[torch.Tensor], groups: int,
                        scale: float, block: Optional[int] = None):
    """Gradients dq, dk, dv (contiguous, input dtypes); any strides in."""
    B, HEADS, N, D = q.shape
    DV = v.shape[-1]
    n = N // groups
    Z = B * HEADS * groups
    _check_sizes(B * HEADS * N)
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
