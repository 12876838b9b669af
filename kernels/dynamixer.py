"""Triton kernels for DynaMixer's dynamic mixing: generate -> softmax -> mix, fused.

A *problem* is one (row, segment) pair: the L tokens of one row of x (N0, N1, N2, L, C)
and the C/S channels of segment s. Problem p = row * S + s. Given the compressed
R (N0, N1, N2, L, S*d) (problem p reads its L*d values R[row, i, s*d + k] as m = i*d + k):

    Z[p, i, j] = sum_m R[p, m] * Wg[i*L + j, m] + bg[i*L + j]
    P[p, :, j] = softmax_i Z[p, :, j]
    y[p, j, c] = sum_i P[p, i, j] * x[p, i, c]

Forward (one program = BLOCK_P problems, all i, a block of BLOCK_J columns at a time):
Z is formed by a tensor-core dot of R rows against the gathered Wg rows of the tile,
softmax runs over i inside the tile, y is a batched dot. Only y and the per-column
log-sum-exp lse[p, j] are written; Z and P never reach memory.

Backward:
* problem-major (_bwd_rows_kernel) recomputes P from R and lse: dP = x dy^T,
  delta_j = sum_i P dP, dZ = P (dP - delta), dx_mix = P dy, dR = dZ Wg (rows owned by the
  program; written in R's token-wise layout), and stores dZ (NP, L*L) once, in the input
  dtype (fp32 for fp32: the dtype its weight-gradient product takes anyway);
* _dw_kernel: dWg = dZ^T R and dbg = colsum dZ as a plain GEMM over the problems, tiled
  (BLOCK_N generate rows x BLOCK_K columns of R) and split over SPLIT fixed ranges of
  problems; the per-split partials are summed in a fixed order (_common.sum_partials).
  SPLIT depends only on the problem count, so the sums are grouped the same way on every
  GPU model (the SM count plays no part).

Weight-gradient traffic (DynaMixer-S stage 1 at B = 128, bf16: NP = 32768 problems, L = 32,
L*d = 64): dZ is written once and read once (NP x L*L x 2 B = 67 MB each way), R read
L*L / BLOCK_N = 8 times (4.2 MB each, from L2); about 0.17 GB in all against the 1.6 to
3 GB the former per-tile gather of x and dy moved. Expected H100 time of the whole mixing
backward at that shape: rows kernel about 0.2 GB (x, dy, R, lse, dx_mix, dR, dZ) and
2 x NP x (L*L*L*d + 2 L*L*C/S) = 5 GFLOP, the GEMM 2 x NP x L*L x L*d = 4.3 GFLOP; both
bandwidth-bound near 0.13 ms at 3 TB/s.

Every x-like tensor is addressed through its own strides (three leading dims, token, channel),
so transposed views are read and written in place.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _row_offset(offs_p, S, N1, N2, s0, s1, s2):
    """Element offset of the rows of problems offs_p in a tensor with leading strides s0, s1, s2."""
    row = offs_p // S
    b2 = row % N2
    b01 = row // N2
    return (b01 // N1) * s0 + (b01 % N1) * s1 + b2 * s2


@triton.jit
def _logits_tile(R, WG, BG, r_base, offs_p, p_ok, n_flat, n_ok, srl, src, D, LD,
                 HAS_BG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    """Z[p, n] for the problems offs_p and the generate rows n_flat: (BLOCK_P, BLOCK_N)."""
    z = tl.zeros((BLOCK_P, BLOCK_N), ACC)
    for k0 in range(0, LD, BLOCK_K):
        offs_m = k0 + tl.arange(0, BLOCK_K)
        m_ok = offs_m < LD
        r = tl.load(R + r_base[:, None] + (offs_m // D)[None, :] * srl + (offs_m % D)[None, :] * src,
                    mask=p_ok[:, None] & m_ok[None, :], other=0.0)
        w = tl.load(WG + n_flat[None, :] * LD + offs_m[:, None], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        z += tl.dot(r, w, input_precision=PREC, out_dtype=ACC)
    if HAS_BG:
        z += tl.load(BG + n_flat, mask=n_ok, other=0.0).to(ACC)[None, :]
    return z


@triton.jit
def _fwd_kernel(
    X, R, WG, BG, Y, LSE,
    sx0, sx1, sx2, sxl, sxc,
    sr0, sr1, sr2, srl, src,
    sy0, sy1, sy2, syl, syc,
    NP, S, N1, N2, L, CS, D, LD,
    HAS_BG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = offs_p < NP
    seg = offs_p % S
    x_base = _row_offset(offs_p, S, N1, N2, sx0, sx1, sx2) + seg * CS * sxc
    r_base = _row_offset(offs_p, S, N1, N2, sr0, sr1, sr2) + seg * D * src
    y_base = _row_offset(offs_p, S, N1, N2, sy0, sy1, sy2) + seg * CS * syc

    offs_i = tl.arange(0, BLOCK_I)
    i_ok = offs_i < L
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < CS
    # the problems' x block (P, I, C) stays in registers for every column block
    x = tl.load(X + x_base[:, None, None] + offs_i[None, :, None] * sxl + offs_c[None, None, :] * sxc,
                mask=p_ok[:, None, None] & i_ok[None, :, None] & c_ok[None, None, :], other=0.0)

    for j0 in range(0, L, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < L
        n_flat = tl.reshape(offs_i[:, None] * L + offs_j[None, :], (BLOCK_I * BLOCK_J,))
        n_ok = tl.reshape(i_ok[:, None] & j_ok[None, :], (BLOCK_I * BLOCK_J,))
        z = _logits_tile(R, WG, BG, r_base, offs_p, p_ok, n_flat, n_ok, srl, src, D, LD,
                         HAS_BG, BLOCK_P, BLOCK_I * BLOCK_J, BLOCK_K, ACC, PREC)
        z = tl.reshape(z, (BLOCK_P, BLOCK_I, BLOCK_J))
        z = tl.where(i_ok[None, :, None], z, float("-inf"))
        mx = tl.max(z, 1)
        e = tl.exp(z - mx[:, None, :])
        den = tl.sum(e, 1)
        p = e / den[:, None, :]
        tl.store(LSE + offs_p[:, None] * L + offs_j[None, :], mx + tl.log(den),
                 mask=p_ok[:, None] & j_ok[None, :])
        y = tl.dot(tl.permute(p.to(x.dtype), (0, 2, 1)), x, input_precision=PREC, out_dtype=ACC)  # (P, J, C)
        tl.store(Y + y_base[:, None, None] + offs_j[None, :, None] * syl + offs_c[None, None, :] * syc,
                 y.to(Y.dtype.element_ty),
                 mask=p_ok[:, None, None] & j_ok[None, :, None] & c_ok[None, None, :])


@triton.jit
def _bwd_rows_kernel(
    X, R, WG, BG, DY, LSE, DXM, DR, DZ,
    sx0, sx1, sx2, sxl, sxc,
    sr0, sr1, sr2, srl, src,
    sd0, sd1, sd2, sdl, sdc,
    sg0, sg1, sg2, sgl, sgc,
    se0, se1, se2, sel, sec,
    NP, S, N1, N2, L, CS, D, LD,
    HAS_BG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    # this program owns its problems' rows of dx_mix, dR (R's layout, strides se*) and dZ
    pid = tl.program_id(0).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = offs_p < NP
    seg = offs_p % S
    x_base = _row_offset(offs_p, S, N1, N2, sx0, sx1, sx2) + seg * CS * sxc
    r_base = _row_offset(offs_p, S, N1, N2, sr0, sr1, sr2) + seg * D * src
    dy_base = _row_offset(offs_p, S, N1, N2, sd0, sd1, sd2) + seg * CS * sdc
    dx_base = _row_offset(offs_p, S, N1, N2, sg0, sg1, sg2) + seg * CS * sgc
    dr_base = _row_offset(offs_p, S, N1, N2, se0, se1, se2) + seg * D * sec

    offs_i = tl.arange(0, BLOCK_I)
    i_ok = offs_i < L
    offs_c = tl.arange(0, BLOCK_C)
    c_ok = offs_c < CS
    x = tl.load(X + x_base[:, None, None] + offs_i[None, :, None] * sxl + offs_c[None, None, :] * sxc,
                mask=p_ok[:, None, None] & i_ok[None, :, None] & c_ok[None, None, :], other=0.0)
    dxm = tl.zeros((BLOCK_P, BLOCK_I, BLOCK_C), ACC)

    for j0 in range(0, L, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_ok = offs_j < L
        pj_ok = p_ok[:, None] & j_ok[None, :]
        n_flat = tl.reshape(offs_i[:, None] * L + offs_j[None, :], (BLOCK_I * BLOCK_J,))
        n_ok = tl.reshape(i_ok[:, None] & j_ok[None, :], (BLOCK_I * BLOCK_J,))
        z = _logits_tile(R, WG, BG, r_base, offs_p, p_ok, n_flat, n_ok, srl, src, D, LD,
                         HAS_BG, BLOCK_P, BLOCK_I * BLOCK_J, BLOCK_K, ACC, PREC)
        z = tl.reshape(z, (BLOCK_P, BLOCK_I, BLOCK_J))
        lse = tl.load(LSE + offs_p[:, None] * L + offs_j[None, :], mask=pj_ok, other=0.0)
        ok = pj_ok[:, None, :] & i_ok[None, :, None]
        p = tl.where(ok, tl.exp(z - lse[:, None, :]), 0.0)
        dy = tl.load(DY + dy_base[:, None, None] + offs_j[None, :, None] * sdl + offs_c[None, None, :] * sdc,
                     mask=pj_ok[:, :, None] & c_ok[None, None, :], other=0.0)  # (P, J, C)
        dp = tl.dot(x, tl.permute(dy, (0, 2, 1)), input_precision=PREC, out_dtype=ACC)  # (P, I, J)
        delta = tl.sum(p * dp, 1)  # (P, J): sum_i P dP = sum_c dy * y
        dz = p * (dp - delta[:, None, :])
        dxm += tl.dot(p.to(dy.dtype), dy, input_precision=PREC, out_dtype=ACC)  # (P, I, C)
        dz = tl.reshape(dz, (BLOCK_P, BLOCK_I * BLOCK_J)).to(DZ.dtype.element_ty)
        tl.store(DZ + offs_p[:, None] * (L * L) + n_flat[None, :], dz, mask=p_ok[:, None] & n_ok[None, :])
        for k0 in range(0, LD, BLOCK_K):
            offs_m = k0 + tl.arange(0, BLOCK_K)
            m_ok = offs_m < LD
            w = tl.load(WG + n_flat[:, None] * LD + offs_m[None, :], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            dr_ptrs = DR + dr_base[:, None] + (offs_m // D)[None, :] * sel + (offs_m % D)[None, :] * sec
            dr_mask = p_ok[:, None] & m_ok[None, :]
            # the first column block writes, the later ones add
            dr = tl.load(dr_ptrs, mask=dr_mask & (j0 > 0), other=0.0)
            tl.store(dr_ptrs, dr + tl.dot(dz.to(WG.dtype.element_ty), w, input_precision=PREC, out_dtype=ACC),
                     mask=dr_mask)

    tl.store(DXM + dx_base[:, None, None] + offs_i[None, :, None] * sgl + offs_c[None, None, :] * sgc,
             dxm.to(DXM.dtype.element_ty),
             mask=p_ok[:, None, None] & i_ok[None, :, None] & c_ok[None, None, :])


@triton.jit
def _dw_kernel(
    DZ, R, DWP, DBP,
    sr0, sr1, sr2, srl, src,
    NP, S, N1, N2, L, D, LD, P_PER_SPLIT,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
):
    # partial dWg[n, m] (and dbg[n]) over the problems of split pid_s: dZ^T R on tensor cores
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64)
    LL = L * L
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < LL
    offs_m = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = offs_m < LD
    dw = tl.zeros((BLOCK_N, BLOCK_K), ACC)
    db = tl.zeros((BLOCK_N,), ACC)
    p_start = pid_s * P_PER_SPLIT
    p_end = tl.minimum(p_start + P_PER_SPLIT, NP)
    for p0 in range(p_start, p_end, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        p_ok = offs_p < p_end
        dz = tl.load(DZ + offs_p[:, None] * LL + offs_n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0)
        r_base = _row_offset(offs_p, S, N1, N2, sr0, sr1, sr2) + (offs_p % S) * D * src
        r = tl.load(R + r_base[:, None] + (offs_m // D)[None, :] * srl + (offs_m % D)[None, :] * src,
                    mask=p_ok[:, None] & m_ok[None, :], other=0.0)
        dw += tl.dot(tl.trans(dz), r.to(dz.dtype), input_precision=PREC, out_dtype=ACC)
        db += tl.sum(dz.to(ACC), 0)
    tl.store(DWP + pid_s * LL * LD + offs_n[:, None] * LD + offs_m[None, :], dw,
             mask=n_ok[:, None] & m_ok[None, :])
    if pid_k == 0:
        tl.store(DBP + pid_s * LL + offs_n, db, mask=n_ok)


# ---------------------------------------------------------------- configuration


KERNELS = ("_fwd_kernel", "_bwd_rows_kernel", "_dw_kernel")
# problems per weight-gradient split: a constant, so the split (and the order of the
# partial sums) depends on the problem count alone
P_PER_SPLIT = 4096


def _rows_limits(dtype: torch.dtype):
    """(largest BLOCK_P, elements of the (P, L, C/S) block) for the backward rows kernel."""
    if dtype in (torch.float16, torch.bfloat16):
        return 8, 8192
    return 1, 1024  # fp32 (interpreter only: can_run refuses fp32 on a GPU)


def launch_configs(L: int, CS: int, LD: int, dtype: torch.dtype) -> Dict[str, Tuple[dict, dict]]:
    """{kernel name: (constexpr arguments, launch options)} for one problem geometry.

    BLOCK_P problems share a program: as many as keep the register-resident blocks (x and
    dx_mix (P, L, C/S), the logits (P, L, BLOCK_J)) within what ptxas compiles without spills
    (sm_90a/sm_80, measured: the forward up to 8192 elements per block, the backward rows kernel
    up to 8 problems and 8192 (fp16/bf16) elements; fp32 spills even at one 32 x 32 problem, so
    can_run refuses fp32 on a GPU); the
    generate-row chunk BLOCK_K keeps the (L * BLOCK_J) x BLOCK_K Wg tile in shared memory small.
    """
    acc, prec = C.acc_tl(dtype), C.dot_precision(dtype)
    bi, bc = C.pow2(L), C.pow2(CS)
    bj = 16
    half = dtype in (torch.float16, torch.bfloat16)
    wide = bi * bj  # generate rows per column block
    bk = min(C.pow2(LD), max(16, (4096 if half else 2048) // wide))

    def block_p(cap, elems):
        bp = cap
        while bp > 1 and (bp * bi * bc > elems or bp * bi * bj > elems):
            bp //= 2
        return bp

    # one BLOCK_P for both kernels: the backward must see the forward's problem blocking (a
    # different one gave wrong gradients in the interpreter)
    fwd = dict(BLOCK_P=min(block_p(16, 8192), block_p(*_rows_limits(dtype))), BLOCK_I=bi, BLOCK_J=bj, BLOCK_C=bc,
               BLOCK_K=bk, ACC=acc, PREC=prec)
    rows = dict(fwd)
    opts = lambda m: dict(num_warps=4 if m["BLOCK_P"] * bi * max(bc, bj) <= 4096 else 8, num_stages=1)
    rows_opts = opts(rows)
    ll = L * L
    dw = dict(BLOCK_P=32, BLOCK_N=min(128, C.pow2(ll)), BLOCK_K=min(128 if half else 64, C.pow2(LD)),
              ACC=acc, PREC=prec)
    dw_opts = dict(num_warps=8 if dw["BLOCK_N"] * dw["BLOCK_K"] >= 128 * 64 else 4, num_stages=2)
    return {"_fwd_kernel": (fwd, opts(fwd)), "_bwd_rows_kernel": (rows, rows_opts), "_dw_kernel": (dw, dw_opts)}


MAX_L = 64
MAX_LD = 512


def smem_bytes(kernel: str, meta: dict, opts: dict, dtype: torch.dtype, arch: int = 90) -> int:
    """Shared memory (bytes) one block of kernel needs at config (meta, opts) for inputs of dtype:
    the Wg tile of the logits product, the x block and the probabilities (and dy in the backward)
    as dot operands; fp32 keeps split "tf32x3" operands. Upper bounds of the compiled kernels
    (sm_80, sm_90a), checked by tests/test_gpu_compile.py."""
    e = 4 if dtype in (torch.float32, torch.float64) else 2
    grow = 1.6 if e == 4 else 1.0
    if kernel == "_dw_kernel":
        return int(e * 4 * meta["BLOCK_P"] * (meta["BLOCK_N"] + meta["BLOCK_K"]) + 256)
    p, bi, bj, bc, bk = meta["BLOCK_P"], meta["BLOCK_I"], meta["BLOCK_J"], meta["BLOCK_C"], meta["BLOCK_K"]
    elems = bk * bi * bj + p * bi * bc + p * bi * bj
    if kernel == "_bwd_rows_kernel":
        elems += p * bj * bc
    return int(e * grow * elems + 256)


def can_run(L: int, CS: int, LD: int, dtype: torch.dtype, smem_limit: Optional[int]) -> Optional[str]:
    """None if the kernels can mix rows of L tokens, C/S = CS channels per segment and L*d = LD on
    a GPU whose blocks may use smem_limit bytes of shared memory (None: no GPU, the interpreter);
    else the reason."""
    if L > MAX_L:
        return f"sequence lengths up to {MAX_L} are supported, got L={L}"
    if LD > MAX_LD:
        return f"L*d up to {MAX_LD} is supported, got L*d={LD}"
    if smem_limit is None:
        return None
    if dtype == torch.float32:
        # ptxas for sm_80/sm_90a spills 0.4-0.5 KB per thread in the backward rows kernel even at
        # one 32 x 32 problem per program on 8 warps (the split "tf32x3" operands): fp32 runs on
        # another backend (cuBLAS through "torch"), fp16/bf16 here
        return ("float32 is not run by the Triton DynaMixer kernels on a GPU: their backward spills "
                "registers (measured with ptxas for sm_80/sm_90a at DynaMixer-S stage 1); use "
                "fp16/bf16 (autocast) or another backend")
    _, elems = _rows_limits(dtype)
    if C.pow2(L) * C.pow2(CS) > elems:
        return (f"the backward kernel would spill registers: one problem's (L x C/S) block of "
                f"{C.pow2(L)} x {C.pow2(CS)} (padded) exceeds {elems} elements for {str(dtype)[6:]}")
    for name, (meta, opts) in launch_configs(L, CS, LD, dtype).items():
        need = smem_bytes(name, meta, opts, dtype)
        if need > smem_limit:
            return (f"{name} needs {need} bytes of shared memory per block at L={L}, C/S={CS}, L*d={LD} "
                    f"({str(dtype)[6:]}), more than the {smem_limit} this GPU allows")
    return None


# ---------------------------------------------------------------- launchers


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _dims(x: torch.Tensor):
    N0, N1, N2, L, C_ = x.shape
    return N0 * N1 * N2, N1, N2, L, C_


def _like_rows(r: torch.Tensor, last: int, dtype: torch.dtype) -> torch.Tensor:
    """A (N0, N1, N2, L, last) tensor laid out in r's token order when r is dense with its
    channels innermost (as the op's compress step writes it), else contiguous."""
    shape = tuple(r.shape[:-1]) + (last,)
    order = sorted(range(4), key=lambda k: -r.stride(k))
    if r.stride(-1) != 1 or not r.permute(*order, 4).is_contiguous():
        return torch.empty(shape, device=r.device, dtype=dtype)
    width = r.shape[-1]
    strides = [s // width * last for s in r.stride()[:-1]] + [1]
    return torch.empty_strided(shape, strides, device=r.device, dtype=dtype)


def mix_fwd(x, r, wg, bg, S: int, y: Optional[torch.Tensor] = None):
    """x (N0, N1, N2, L, C), r (N0, N1, N2, L, S*d), any strides -> y, lse (N0, N1, N2, S, L).

    y (x.dtype) is written into the given tensor, or into a new one laid out in r's token order.
    """
    rows, N1, N2, L, C_ = _dims(x)
    CS, D = C_ // S, r.shape[-1] // S
    LD = L * D
    if y is None:
        y = _like_rows(r, C_, x.dtype)
    lse = torch.empty(*x.shape[:3], S, L, device=x.device, dtype=C.acc_dtype(x.dtype))
    wg = wg.contiguous()
    bg_arg = wg if bg is None else bg.contiguous()
    meta, opts = launch_configs(L, CS, LD, x.dtype)["_fwd_kernel"]
    NP = rows * S
    _fwd_kernel[(triton.cdiv(NP, meta["BLOCK_P"]),)](
        x, r, wg, bg_arg, y, lse, *_strides(x), *_strides(r), *_strides(y),
        NP, S, N1, N2, L, CS, D, LD, HAS_BG=bg is not None, **opts, **meta,
    )
    return y, lse


def mix_bwd(dy, x, r, wg, bg, lse, S: int, dx_mix: Optional[torch.Tensor] = None):
    """Gradients of mix_fwd: dx_mix (x.dtype; into the given tensor or one laid out like r's
    tokens), dR (r's layout, fp32/fp64), dWg, dbg (fp32/fp64)."""
    rows, N1, N2, L, C_ = _dims(x)
    CS, D = C_ // S, r.shape[-1] // S
    LD = L * D
    NP = rows * S
    acc_t = C.acc_dtype(x.dtype)
    wg = wg.contiguous()
    bg_arg = wg if bg is None else bg.contiguous()
    lse = lse.contiguous()
    cfg = launch_configs(L, CS, LD, x.dtype)
    meta, opts = cfg["_bwd_rows_kernel"]
    dxm = _like_rows(r, C_, x.dtype) if dx_mix is None else dx_mix
    dr = _like_rows(r, r.shape[-1], acc_t)
    # dZ in the dtype of the weight-gradient product's operands
    dz = torch.empty(NP, L * L, device=x.device, dtype=x.dtype)
    _bwd_rows_kernel[(triton.cdiv(NP, meta["BLOCK_P"]),)](
        x, r, wg, bg_arg, dy, lse, dxm, dr, dz,
        *_strides(x), *_strides(r), *_strides(dy), *_strides(dxm), *_strides(dr),
        NP, S, N1, N2, L, CS, D, LD, HAS_BG=bg is not None, **opts, **meta,
    )
    wmeta, wopts = cfg["_dw_kernel"]
    splits = triton.cdiv(NP, P_PER_SPLIT)
    dwp = torch.empty(splits, L * L * LD, device=x.device, dtype=acc_t)
    dbp = torch.empty(splits, L * L, device=x.device, dtype=acc_t)
    grid = (triton.cdiv(L * L, wmeta["BLOCK_N"]), triton.cdiv(LD, wmeta["BLOCK_K"]), splits)
    _dw_kernel[grid](
        dz, r, dwp, dbp, *_strides(r), NP, S, N1, N2, L, D, LD, P_PER_SPLIT, **wopts, **wmeta,
    )
    dwg = C.sum_partials(dwp.view(1, splits, -1)).view(L * L, LD)
    dbg = C.sum_partials(dbp.view(1, splits, -1)).view(L * L)
    return dxm, dr, dwg, dbg
