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
for fp64 inputs); backward recomputes probabilities in two deterministic kernels
(dk/dv over query blocks, dq and dlog_gamma over key blocks). No N x N (or
H x W x W) tensor is ever written.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

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
def _masa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV_, LG,
    sqb, sqh, sqr, sqy, sqx, sqd,
    skb, skh, skr, sky, skx, skd,
    svb, svh, svr, svy, svx, svd,
    sdob, sdoh, sdor, sdoy, sdox, sdod,
    slb, slh, slr, sly, slx,
    sgb, sgh, sgr, sgy, sgx, sgd,
    swb, swh, swr, swy, swx, swd,
    HEADS, R, X, N, D, DV, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
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
    dl_base = DELTA + b * slb + h * slh + r * slr
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
        delta = tl.load(dl_base + my * sly + mx * slx, mask=row_ok, other=0.0)
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
    dk_ptrs = DK + b * sgb + h * sgh + r * sgr + nk_y[:, None] * sgy + nk_x[:, None] * sgx + offs_d[None, :] * sgd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=col_ok[:, None] & (offs_d < D)[None, :])
    dv_ptrs = DV_ + b * swb + h * swh + r * swr + nk_y[:, None] * swy + nk_x[:, None] * swx + offs_dv[None, :] * swd
    tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=col_ok[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _masa_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DLG, LG,
    sqb, sqh, sqr, sqy, sqx, sqd,
    skb, skh, skr, sky, skx, skd,
    svb, svh, svr, svy, svx, svd,
    sdob, sdoh, sdor, sdoy, sdox, sdod,
    slb, slh, slr, sly, slx,
    sgb, sgh, sgr, sgy, sgx, sgd,
    HEADS, R, X, N, D, DV, scale, NUM_M_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ACC: tl.constexpr, PREC: tl.constexpr,
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
    lse = tl.load(LSE + b * slb + h * slh + r * slr + my * sly + mx * slx, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + r * slr + my * sly + mx * slx, mask=row_ok, other=0.0)
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

    g_ptrs = DQ + b * sgb + h * sgh + r * sgr + my[:, None] * sgy + mx[:, None] * sgx + offs_d[None, :] * sgd
    tl.store(g_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])
    # per-program partial sums, reduced on the host side in a fixed order (deterministic)
    tl.store(DLG + pid_z * NUM_M_BLOCKS + pid_m, tl.sum(dlg, 0))


# ---------------------------------------------------------------- launchers


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


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _config(N: int, D: int, DV: int, dtype: torch.dtype):
    bd, bdv = _pow2(D), _pow2(DV)
    widest = max(bd, bdv)
    cap = 64 if widest <= 64 else (32 if widest <= 128 else 16)
    if dtype == torch.float32 and widest > 64:
        cap = min(cap, 32)
    bm = bn = min(cap, _pow2(N))
    num_warps = 4 if bm * widest <= 64 * 64 else 8
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    # fp32 inputs: exact fp32 products (no silent TF32) so results match the reference
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv, ACC=acc, PREC=prec), num_warps


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masa_fwd(q, k, v, log_gamma, scale: float, axis: Optional[str]):
    """One grid-attention pass. q, k (B, heads, H, W, d), v (B, heads, H, W, dv), any strides.

    Returns out (B, heads, H, W, dv) contiguous in q.dtype and lse (B, heads, H, W) fp32/fp64.
    """
    B, HEADS, H, W, D = q.shape
    DV = v.shape[-1]
    R, Y, X = _geometry(q.shape, axis)
    N = Y * X
    out = torch.empty(B, HEADS, H, W, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, HEADS, H, W, device=q.device, dtype=_acc_dtype(q.dtype))
    lg = log_gamma.to(device=q.device, dtype=_acc_dtype(q.dtype)).contiguous()
    meta, warps = _config(N, D, DV, q.dtype)
    # problems on grid axis 0 (up to 2**31 - 1); axis 1 is limited to 65535 blocks
    grid = (B * HEADS * R, triton.cdiv(N, meta["BLOCK_M"]))
    _masa_fwd_kernel[grid](
        q, k, v, out, lse, lg,
        *_strides(q, axis), *_strides(k, axis), *_strides(v, axis), *_strides(out, axis),
        *_strides(lse, axis, with_feature=False),
        HEADS, R, X, N, D, DV, float(scale),
        num_warps=warps, **meta,
    )
    return out, lse


def masa_bwd(dout, q, k, v, out, lse, log_gamma, scale: float, axis: Optional[str]):
    """Gradients of one pass: dq, dk, dv (contiguous, input dtypes) and dlog_gamma (heads,)."""
    B, HEADS, H, W, D = q.shape
    DV = v.shape[-1]
    R, Y, X = _geometry(q.shape, axis)
    N = Y * X
    acc = _acc_dtype(q.dtype)
    # delta_i = rowsum(dO_i * O_i), laid out like lse
    delta = (dout.to(acc) * out.to(acc)).sum(-1).contiguous()
    lse = lse.contiguous()
    lg = log_gamma.to(device=q.device, dtype=acc).contiguous()
    dq = torch.empty(B, HEADS, H, W, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, HEADS, H, W, D, device=q.device, dtype=k.dtype)
    dv = torch.empty(B, HEADS, H, W, DV, device=q.device, dtype=v.dtype)
    meta, warps = _config(N, D, DV, q.dtype)
    common = (
        *_strides(q, axis), *_strides(k, axis), *_strides(v, axis), *_strides(dout, axis),
        *_strides(lse, axis, with_feature=False),
    )
    _masa_bwd_dkdv_kernel[(B * HEADS * R, triton.cdiv(N, meta["BLOCK_N"]))](
        q, k, v, dout, lse, delta, dk, dv, lg, *common, *_strides(dk, axis), *_strides(dv, axis),
        HEADS, R, X, N, D, DV, float(scale), num_warps=warps, **meta,
    )
    num_m = triton.cdiv(N, meta["BLOCK_M"])
    dlg_part = torch.empty(B * HEADS * R, num_m, device=q.device, dtype=acc)
    _masa_bwd_dq_kernel[(B * HEADS * R, num_m)](
        q, k, v, dout, lse, delta, dq, dlg_part, lg, *common, *_strides(dq, axis),
        HEADS, R, X, N, D, DV, float(scale), num_m, num_warps=warps, **meta,
    )
    dlg = dlg_part.view(B, HEADS, R * num_m).sum(dim=(0, 2))
    return dq, dk, dv, dlg


# ---------------------------------------------------------------- offline compile check

_FP32_PTRS = {"LSE", "LG", "DELTA", "DLG"}  # statistics: fp32 for every input dtype but fp64
_DATA_PTRS = {"Q", "K", "V", "O", "DO", "DK", "DV_", "DQ"}


def compile_offline(D: int, DV: int, dtype: torch.dtype, N: int = 3136, arch: int = 90):
    """Compile the three kernels for NVIDIA sm_<arch> without a GPU; {kernel: shared memory bytes}.

    The interpreter runs the kernels' Python, not the compiler: this lowers them to a cubin at
    the launch configuration masa_fwd/masa_bwd would use, so a construct that only the real
    compiler rejects shows up on a CPU-only machine. Needs the kernels defined without
    TRITON_INTERPRET.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    meta, warps = _config(N, D, DV, dtype)
    out = {}
    for fn in (_masa_fwd_kernel, _masa_bwd_dkdv_kernel, _masa_bwd_dq_kernel):
        kernel = getattr(fn, "fn", fn)
        sig, consts = {}, {}
        for i, a in enumerate(fn.arg_names):
            if a in meta:
                sig[a] = "constexpr"
                consts[(i,)] = meta[a]
            elif a == "scale":
                sig[a] = "fp32"
            elif a in _FP32_PTRS:
                sig[a] = "*fp32"
            elif a in _DATA_PTRS:
                sig[a] = f"*{names[dtype]}"
            else:
                sig[a] = "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
        assert "cubin" in compiled.asm, f"{kernel.__name__}: no cubin produced"
        out[kernel.__name__] = compiled.metadata.shared
    return out
