"""Triton kernels for Manhattan Self-Attention (MaSA).

One flash-style primitive serves both forms. A problem is a Y x X token grid;
the logit between tokens i and j is scale * q_i . k_j + log(gamma) * (|dy| + |dx|),
the decay computed from token coordinates inside the kernel. Problems are
indexed by (batch, head, r):

* full form:            R = 1, (Y, X) = (H, W)
* decomposed, along W:  R = H (one problem per row),    (Y, X) = (1, W)
* decomposed, along H:  R = W (one problem per column), (Y, X) = (1, H)

Every tensor is addressed through its own strides mapped onto (b, h, r, y, x, d),
so permuted inputs are read in place and the H pass reads the W pass's output
transposed without a copy. Forward saves the per-row log-sum-exp (fp32, or fp64
for fp64 inputs). No N x N (or H x W x W) tensor is ever written.

Backward of one pass: two deterministic kernels that recompute the probabilities.
``_masa_bwd_dq_kernel`` (one program per query block, walking the key blocks) first
forms delta_i = rowsum(dO_i * O_i) from its own rows of dO and O (stored for the next
kernel), then dq and its share of dlog_gamma; ``_masa_bwd_dkdv_kernel`` (one program
per key block, walking the query blocks) reads delta and forms dk, dv. The decomposed
backward runs the H pass and then the W pass, whose kernels add their dq / dk to the H
pass's (``ACCUM``): every element is owned by one program, so no atomics. dlog_gamma
partials (one per program, head-major) are summed in a fixed order by
``_common.sum_partials``. Nothing is copied or cast on the host.

Bytes moved (backward, decomposed, RMT-S stage 1: B=128, 4 heads, 56 x 56, d = dv = 16,
bf16; one (B, heads, H, W, 16) tensor = 51.4 MB, one fp32 (B, heads, H, W) statistic = 6.4 MB):

    kernel (pass)      reads                                   writes            MB
    dq (H)             q k v_mid out dout  + lse_h             dq  delta          5*51.4 + 6.4 + 51.4 + 6.4
    dkdv (H)           q k v_mid dout      + lse_h delta       dk  dv_mid         4*51.4 + 12.8 + 2*51.4
    dq (W)             q k v v_mid dv_mid dq + lse_w           dq  delta          6*51.4 + 6.4 + 51.4 + 6.4
    dkdv (W)           q k v dv_mid dk     + lse_w delta       dk  dv             5*51.4 + 12.8 + 2*51.4
    total about 1.40 GB, against a minimum of 0.72 GB for one read of q, k, v, v_mid, out,
    dout, lse_w, lse_h and one write of dq, dk, dv, dv_mid (the intermediate dv_mid must be
    written and read back once). The PyTorch glue this replaces (fp32 copies of dout and
    out for delta, dq/dk of both passes cast to fp32 and summed, zero-filled gradients)
    moved about 1.6 GB more. Each row problem (56 tokens) fits one tile, so every kernel
    reads each of its inputs once; larger problems re-read q/dout (dkdv) or k/v (dq) once per
    block of the other side, as flash attention does.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common as C

AXES = (None, "w", "h")


@triton.jit
def _load_tile(base, offs_t, X, s_y, s_x, s_f, offs_f, n_tok, n_feat):
    ty = offs_t // X
    tx = offs_t % X
    ptrs = base + ty[:, None] * s_y + tx[:, None] * s_x + offs_f[None, :] * s_f
    mask = (offs_t < n_tok)[:, None] & (offs_f < n_feat)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _logits(q, k, offs_m, offs_n, X, N, lg, scale, ACC: tl.constexpr, PREC: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * scale
    dist = tl.abs(offs_m[:, None] // X - offs_n[None, :] // X) + tl.abs(offs_m[:, None] % X - offs_n[None, :] % X)
    s = s + lg * dist.to(ACC)
    return s, dist


@triton.jit
def _masa_fwd_kernel(
    Q, K, V, O, LSE, LG,
    sqb, sqh, sqr, sqy, sqx, sqd,
    skb, skh, skr, sky, skx, skd,
    svb, svh, svr, svy, svx, svd,
    sob, soh, sor, soy, sox, sod,
    slb, slh, slr, sly, slx,
    HEADS, R, X, N, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(1)
    pid_z = tl.program_id(0).to(tl.int64)
    r = pid_z % R
    bh = pid_z // R
    h = bh % HEADS
    b = bh // HEADS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * sqb + h * sqh + r * sqr, offs_m, X, sqy, sqx, sqd, offs_d, N, D)
    k_base = K + b * skb + h * skh + r * skr
    v_base = V + b * svb + h * svh + r * svr
    lg = tl.load(LG + h).to(ACC)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, X, sky, skx, skd, offs_d, N, D)
        v = _load_tile(v_base, offs_n, X, svy, svx, svd, offs_dv, N, DV)
        s, dist = _logits(q, k, offs_m, offs_n, X, N, lg, scale, ACC, PREC)
        s = tl.where((offs_n < N)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC, out_dtype=ACC)
        m_i = m_new

    out = acc / l_i[:, None]
    my = offs_m // X
    mx = offs_m % X
    row_ok = offs_m < N
    o_ptrs = O + b * sob + h * soh + r * sor + my[:, None] * soy + mx[:, None] * sox + offs_dv[None, :] * sod
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])
    l_ptrs = LSE + b * slb + h * slh + r * slr + my * sly + mx * slx
    tl.store(l_ptrs, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _masa_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ, DLG, LG,
    sqb, sqh, sqr, sqy, sqx, sqd,
    skb, skh, skr, sky, skx, skd,
    svb, svh, svr, svy, svx, svd,
    sob, soh, sor, soy, sox, sod,
    sdob, sdoh, sdor, sdoy, sdox, sdod,
    slb, slh, slr, sly, slx,
    seb, seh, ser, sey, sex,
    sgb, sgh, sgr, sgy, sgx, sgd,
    HEADS, BATCH, R, X, N, D, DV, scale, NUM_M_BLOCKS, DLG_P, DLG_OFF,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, ACCUM: tl.constexpr,
):
    # one program owns a block of queries and walks every key block
    pid_m = tl.program_id(1)
    pid_z = tl.program_id(0).to(tl.int64)
    r = pid_z % R
    bh = pid_z // R
    h = bh % HEADS
    b = bh // HEADS

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N
    my = offs_m // X
    mx = offs_m % X
    q = _load_tile(Q + b * sqb + h * sqh + r * sqr, offs_m, X, sqy, sqx, sqd, offs_d, N, D)
    do = _load_tile(DO + b * sdob + h * sdoh + r * sdor, offs_m, X, sdoy, sdox, sdod, offs_dv, N, DV)
    o = _load_tile(O + b * sob + h * soh + r * sor, offs_m, X, soy, sox, sod, offs_dv, N, DV)
    # delta_i = rowsum(dO_i * O_i) from this program's own rows, kept for the dk/dv kernel
    delta = tl.sum(do.to(ACC) * o.to(ACC), 1)
    tl.store(DELTA + b * seb + h * seh + r * ser + my * sey + mx * sex, delta, mask=row_ok)
    lse = tl.load(LSE + b * slb + h * slh + r * slr + my * sly + mx * slx, mask=row_ok, other=0.0)
    k_base = K + b * skb + h * skh + r * skr
    v_base = V + b * svb + h * svh + r * svr
    lg = tl.load(LG + h).to(ACC)

    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    dlg = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, X, sky, skx, skd, offs_d, N, D)
        v = _load_tile(v_base, offs_n, X, svy, svx, svd, offs_dv, N, DV)
        s, dist = _logits(q, k, offs_m, offs_n, X, N, lg, scale, ACC, PREC)
        p = tl.exp(s - lse[:, None])
        p = tl.where(row_ok[:, None] & (offs_n < N)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC, out_dtype=ACC)
        dlg += tl.sum(ds * dist.to(ACC), 1)

    dq = dq * scale
    g_ptrs = DQ + b * sgb + h * sgh + r * sgr + my[:, None] * sgy + mx[:, None] * sgx + offs_d[None, :] * sgd
    g_mask = row_ok[:, None] & (offs_d < D)[None, :]
    if ACCUM:
        # the other pass of the decomposed form stored its dq here (same dtype, same owner)
        dq += tl.load(g_ptrs, mask=g_mask, other=0.0).to(ACC)
    tl.store(g_ptrs, dq.to(DQ.dtype.element_ty), mask=g_mask)
    # per-program partial sums, head-major, summed later in a fixed order (deterministic)
    tl.store(DLG + (h * BATCH + b) * DLG_P + DLG_OFF + r * NUM_M_BLOCKS + pid_m, tl.sum(dlg, 0))


@triton.jit
def _masa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_, LG,
    sqb, sqh, sqr, sqy, sqx, sqd,
    skb, skh, skr, sky, skx, skd,
    svb, svh, svr, svy, svx, svd,
    sdob, sdoh, sdor, sdoy, sdox, sdod,
    slb, slh, slr, sly, slx,
    seb, seh, ser, sey, sex,
    sgb, sgh, sgr, sgy, sgx, sgd,
    swb, swh, swr, swy, swx, swd,
    HEADS, R, X, N, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr, ACCUM: tl.constexpr,
):
    # one program owns a block of keys and walks every query block
    pid_n = tl.program_id(1)
    pid_z = tl.program_id(0).to(tl.int64)
    r = pid_z % R
    bh = pid_z // R
    h = bh % HEADS
    b = bh // HEADS

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K + b * skb + h * skh + r * skr, offs_n, X, sky, skx, skd, offs_d, N, D)
    v = _load_tile(V + b * svb + h * svh + r * svr, offs_n, X, svy, svx, svd, offs_dv, N, DV)
    q_base = Q + b * sqb + h * sqh + r * sqr
    do_base = DO + b * sdob + h * sdoh + r * sdor
    l_base = LSE + b * slb + h * slh + r * slr
    e_base = DELTA + b * seb + h * seh + r * ser
    lg = tl.load(LG + h).to(ACC)

    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC)
    for m0 in range(0, N, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        q = _load_tile(q_base, offs_m, X, sqy, sqx, sqd, offs_d, N, D)
        do = _load_tile(do_base, offs_m, X, sdoy, sdox, sdod, offs_dv, N, DV)
        my = offs_m // X
        mx = offs_m % X
        lse = tl.load(l_base + my * sly + mx * slx, mask=row_ok, other=0.0)
        delta = tl.load(e_base + my * sey + mx * sex, mask=row_ok, other=0.0)
        s, dist = _logits(q, k, offs_m, offs_n, X, N, lg, scale, ACC, PREC)
        p = tl.exp(s - lse[:, None])
        p = tl.where(row_ok[:, None] & (offs_n < N)[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC, out_dtype=ACC)

    nk_y = offs_n // X
    nk_x = offs_n % X
    col_ok = offs_n < N
    dk = dk * scale
    dk_ptrs = DK + b * sgb + h * sgh + r * sgr + nk_y[:, None] * sgy + nk_x[:, None] * sgx + offs_d[None, :] * sgd
    dk_mask = col_ok[:, None] & (offs_d < D)[None, :]
    if ACCUM:
        dk += tl.load(dk_ptrs, mask=dk_mask, other=0.0).to(ACC)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=dk_mask)
    dv_ptrs = DV_ + b * swb + h * swh + r * swr + nk_y[:, None] * swy + nk_x[:, None] * swx + offs_dv[None, :] * swd
    tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & (offs_dv < DV)[None, :])


# ---------------------------------------------------------------- configuration and resources


def _geometry(shape, axis: Optional[str]) -> Tuple[int, int, int]:
    """(R, Y, X) of the problems for a (B, heads, H, W, ...) tensor."""
    H, W = shape[2], shape[3]
    if axis is None:
        return 1, H, W
    if axis == "w":
        return H, 1, W
    return W, 1, H


def _strides(t: torch.Tensor, axis: Optional[str], with_feature: bool = True):
    """t's strides mapped to (b, h, r, y, x[, f]) for the given axis."""
    sb, sh, s2, s3 = t.stride()[:4]
    if axis is None:
        st = (sb, sh, 0, s2, s3)
    elif axis == "w":
        st = (sb, sh, s2, 0, s3)
    else:
        st = (sb, sh, s3, 0, s2)
    return st + ((t.stride(4),) if with_feature else ())


KERNELS = ("_masa_fwd_kernel", "_masa_bwd_dq_kernel", "_masa_bwd_dkdv_kernel")


# (BLOCK_M, BLOCK_N, num_warps) per kernel and padded head dim, for fp16/bf16 and for fp32
# ("tf32x3" dots). BLOCK_M is the query tile, BLOCK_N the key tile. Chosen with
# tests/_compile_harness.py as the largest tiles that ptxas compiles without register spills
# for sm_90a and sm_80. fp32 beyond head dim 128 spills at every tile size: can_run refuses it.
_TILES = {
    "half": {
        "_masa_fwd_kernel": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 32, 4), 256: (32, 32, 4)},
        "_masa_bwd_dq_kernel": {16: (64, 64, 4), 32: (64, 64, 4), 64: (32, 64, 4), 128: (32, 32, 4),
                                256: (16, 32, 4)},
        "_masa_bwd_dkdv_kernel": {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 32, 4), 128: (32, 32, 4),
                                  256: (32, 16, 4)},
    },
    "fp32": {
        "_masa_fwd_kernel": {16: (64, 64, 4), 32: (64, 64, 4), 64: (32, 64, 4), 128: (32, 32, 8)},
        "_masa_bwd_dq_kernel": {16: (64, 64, 4), 32: (64, 32, 4), 64: (32, 32, 8), 128: (16, 32, 8)},
        "_masa_bwd_dkdv_kernel": {16: (64, 64, 4), 32: (32, 64, 4), 64: (32, 32, 8), 128: (16, 32, 8)},
    },
}
FP32_MAX_HEAD_DIM = 128


def configs(N: int, D: int, DV: int, dtype: torch.dtype) -> Dict[str, Tuple[dict, dict]]:
    """{kernel name: (constexprs, launch options)} for problems of N tokens and head dims D, DV.

    Tiles per padded head dim from _TILES, never larger than the problem (rows of 7 tokens get
    16-token tiles); fp64 (interpreter only) takes the fp32 tiles, 32 x 32 beyond them.
    """
    bd, bdv = C.pow2(D), C.pow2(DV)
    widest = max(bd, bdv)
    cap = C.pow2(N)
    table = _TILES["half" if dtype in (torch.float16, torch.bfloat16) else "fp32"]
    acc, prec = C.acc_tl(dtype), C.dot_precision(dtype)
    out = {}
    for name in KERNELS:
        bm, bn, warps = table[name].get(widest, (32, 32, 8))
        meta = dict(BLOCK_M=min(bm, cap), BLOCK_N=min(bn, cap), BLOCK_D=bd, BLOCK_DV=bdv, ACC=acc, PREC=prec)
        out[name] = (meta, dict(num_warps=warps))
    return out


# Shared memory of the kernels, in elements of the input dtype: a x the tiles a program streams
# through its loop (multi-buffered by Triton's pipeliner), b x the tiles it keeps (its own
# queries or keys and their gradients), c x the BLOCK_M x BLOCK_N logits tile, fitted as upper
# bounds of what the compiler allocates (sm_80 and sm_90a; fp32 keeps split "tf32x3" operands).
# tests/test_gpu_compile.py checks smem_bytes against the compiled kernels.
_SMEM_COEF = {
    ("_masa_fwd_kernel", 2): (2.0, 2.5, 0.5), ("_masa_fwd_kernel", 4): (2.5, 2.0, 0.5),
    ("_masa_bwd_dq_kernel", 2): (2.0, 1.5, 0.5), ("_masa_bwd_dq_kernel", 4): (1.0, 3.0, 0.5),
    ("_masa_bwd_dkdv_kernel", 2): (1.5, 2.0, 1.5), ("_masa_bwd_dkdv_kernel", 4): (0.5, 3.0, 3.0),
}


def smem_bytes(kernel: str, meta: dict, opts: dict, dtype: torch.dtype, arch: int = 90) -> int:
    """Shared memory (bytes) one block of kernel needs at config (meta, opts) for inputs of dtype."""
    e = 4 if C.elem_bytes(dtype) >= 4 else 2
    bm, bn, bd, bdv = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"], meta["BLOCK_DV"]
    if kernel == "_masa_bwd_dkdv_kernel":
        streamed, kept = bm * (bd + bdv), bn * (bd + bdv)
    elif kernel == "_masa_bwd_dq_kernel":
        streamed, kept = bn * (bd + bdv), bm * (bd + bdv)
    else:
        streamed, kept = bn * (bd + bdv), bm * bd
    a, b, c = _SMEM_COEF[(kernel, e)]
    return int(e * (a * streamed + b * kept + c * bm * bn))


def can_run(Ns, D: int, DV: int, dtype: torch.dtype, smem_limit: Optional[int]) -> Optional[str]:
    """None if the kernels can run problems of Ns tokens (one per pass) and head dims D, DV on a
    GPU whose blocks may use smem_limit bytes of shared memory (None: no GPU, the interpreter);
    else the reason."""
    if max(D, DV) > 256:
        return f"head dims up to 256 are supported, got d={D}, dv={DV}"
    if smem_limit is None:
        return None
    if dtype == torch.float32 and max(C.pow2(D), C.pow2(DV)) > FP32_MAX_HEAD_DIM:
        return (f"float32 head dims above {FP32_MAX_HEAD_DIM} spill registers in every tile size the "
                f"kernels can use (measured with ptxas), got d={D}, dv={DV}")
    for N in Ns:
        for name, (meta, opts) in configs(N, D, DV, dtype).items():
            need = smem_bytes(name, meta, opts, dtype)
            if need > smem_limit:
                return (f"{name} needs {need} bytes of shared memory per block at head dims d={D}, dv={DV} "
                        f"({str(dtype)[6:]}), more than the {smem_limit} this GPU allows")
    return None


# ---------------------------------------------------------------- launchers


def _pass_fwd(q, k, v, lg, scale: float, axis: Optional[str]):
    B, HEADS, H, W, D = q.shape
    DV = v.shape[-1]
    R, Y, X = _geometry(q.shape, axis)
    N = Y * X
    out = torch.empty(B, HEADS, H, W, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HEADS, H, W, device=q.device, dtype=C.acc_dtype(q.dtype))
    meta, opts = configs(N, D, DV, q.dtype)["_masa_fwd_kernel"]
    # problems on grid axis 0 (up to 2**31 - 1); axis 1 is limited to 65535 blocks
    grid = (B * HEADS * R, triton.cdiv(N, meta["BLOCK_M"]))
    _masa_fwd_kernel[grid](
        q, k, v, out, lse, lg,
        *_strides(q, axis), *_strides(k, axis), *_strides(v, axis), *_strides(out, axis),
        *_strides(lse, axis, with_feature=False),
        HEADS, R, X, N, D, DV, float(scale),
        **opts, **meta,
    )
    return out, lse


def _num_dlg_partials(shape, axis: Optional[str], D: int, DV: int, dtype) -> int:
    R, Y, X = _geometry(shape, axis)
    meta, _ = configs(Y * X, D, DV, dtype)["_masa_bwd_dq_kernel"]
    return R * triton.cdiv(Y * X, meta["BLOCK_M"])


def _pass_bwd(dout, q, k, v, o, lse, lg, scale: float, axis: Optional[str],
              dq, dk, dv, delta, dlg_part, dlg_off: int, accum: bool):
    """Gradients of one pass into dq, dk (added to their contents if accum), dv; dlog_gamma
    partials into dlg_part (HEADS, B, P) at column offset dlg_off. delta is scratch."""
    B, HEADS, H, W, D = q.shape
    DV = v.shape[-1]
    R, Y, X = _geometry(q.shape, axis)
    N = Y * X
    cfg = configs(N, D, DV, q.dtype)
    meta, opts = cfg["_masa_bwd_dq_kernel"]
    num_m = triton.cdiv(N, meta["BLOCK_M"])
    common = (*_strides(q, axis), *_strides(k, axis), *_strides(v, axis))
    stats = (*_strides(lse, axis, with_feature=False), *_strides(delta, axis, with_feature=False))
    _masa_bwd_dq_kernel[(B * HEADS * R, num_m)](
        q, k, v, o, dout, lse, delta, dq, dlg_part, lg,
        *common, *_strides(o, axis), *_strides(dout, axis), *stats, *_strides(dq, axis),
        HEADS, B, R, X, N, D, DV, float(scale), num_m, dlg_part.shape[-1], dlg_off,
        ACCUM=accum, **opts, **meta,
    )
    meta, opts = cfg["_masa_bwd_dkdv_kernel"]
    _masa_bwd_dkdv_kernel[(B * HEADS * R, triton.cdiv(N, meta["BLOCK_N"]))](
        q, k, v, dout, lse, delta, dk, dv, lg,
        *common, *_strides(dout, axis), *stats, *_strides(dk, axis), *_strides(dv, axis),
        HEADS, R, X, N, D, DV, float(scale),
        ACCUM=accum, **opts, **meta,
    )


def _log_gamma(log_gamma, q):
    return log_gamma.to(device=q.device, dtype=C.acc_dtype(q.dtype)).contiguous()


def forward(q, k, v, log_gamma, scale: float, decomposed: bool):
    """The whole op. q, k (B, heads, H, W, d), v (B, heads, H, W, dv), any strides; log_gamma (heads,).

    Returns (out, v_mid, lse_w, lse_h): out (B, heads, H, W, dv) contiguous in q.dtype; full
    form: lse_w the full-grid log-sum-exp, v_mid and lse_h empty; decomposed: v_mid / lse_w of
    the W pass, lse_h of the H pass. Statistics in fp32 (fp64 for fp64 inputs).
    """
    lg = _log_gamma(log_gamma, q)
    if not decomposed:
        out, lse = _pass_fwd(q, k, v, lg, scale, None)
        return out, out.new_empty((0,)), lse, lse.new_empty((0,))
    v_mid, lse_w = _pass_fwd(q, k, v, lg, scale, "w")
    out, lse_h = _pass_fwd(q, k, v_mid, lg, scale, "h")
    return out, v_mid, lse_w, lse_h


def backward(dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h, scale: float, decomposed: bool):
    """Gradients of forward: dq, dk, dv (contiguous, input dtypes) and dlog_gamma (heads,) in the
    accumulation dtype. The decomposed form runs the H pass, then the W pass adding into dq, dk."""
    B, HEADS, H, W, D = q.shape
    DV = v.shape[-1]
    acc = C.acc_dtype(q.dtype)
    lg = _log_gamma(log_gamma, q)
    dq = torch.empty(B, HEADS, H, W, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, HEADS, H, W, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, HEADS, H, W, DV, device=q.device, dtype=v.dtype)
    delta = torch.empty(B, HEADS, H, W, device=q.device, dtype=acc)
    if not decomposed:
        P = _num_dlg_partials(q.shape, None, D, DV, q.dtype)
        part = torch.empty(HEADS, B, P, device=q.device, dtype=acc)
        _pass_bwd(dout, q, k, v, out, lse_w, lg, scale, None, dq, dk, dv, delta, part, 0, False)
    else:
        p_h = _num_dlg_partials(q.shape, "h", D, DV, q.dtype)
        p_w = _num_dlg_partials(q.shape, "w", D, DV, q.dtype)
        part = torch.empty(HEADS, B, p_h + p_w, device=q.device, dtype=acc)
        dv_mid = torch.empty(B, HEADS, H, W, DV, device=q.device, dtype=v_mid.dtype)
        _pass_bwd(dout, q, k, v_mid, out, lse_h, lg, scale, "h", dq, dk, dv_mid, delta, part, 0, False)
        _pass_bwd(dv_mid, q, k, v, v_mid, lse_w, lg, scale, "w", dq, dk, dv, delta, part, p_h, True)
    dlg = C.sum_partials(part.view(HEADS, -1, 1)).view(HEADS)
    return dq, dk, dv, dlg
