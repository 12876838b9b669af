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

Backward recomputes P from R and lse in two kernels (flash-attention style):
* problem-major (_bwd_rows_kernel): dP = x dy^T, delta_j = sum_i P dP, dZ = P (dP - delta),
  dx_mix = P dy, dR = dZ Wg (rows owned exclusively by the program), and delta for the next;
* weight-major (_bwd_weights_kernel): each program owns a block of Wg rows and a group of
  problem blocks; it recomputes P and dZ for its rows from lse and delta and accumulates
  dWg = dZ^T R and dbg = sum dZ, written as per-group partials summed in a fixed order.

Every x-like tensor is addressed through its own strides (three leading dims, token, channel),
so transposed views are read and written in place.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    X, R, WG, BG, DY, LSE, DXM, DR, DELTA,
    sx0, sx1, sx2, sxl, sxc,
    sr0, sr1, sr2, srl, src,
    sd0, sd1, sd2, sdl, sdc,
    sg0, sg1, sg2, sgl, sgc,
    NP, S, N1, N2, L, CS, D, LD,
    HAS_BG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    # DR is (NP, LD) contiguous in ACC and zero-filled; this program owns its rows exclusively
    pid = tl.program_id(0).to(tl.int64)
    offs_p = pid * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = offs_p < NP
    seg = offs_p % S
    x_base = _row_offset(offs_p, S, N1, N2, sx0, sx1, sx2) + seg * CS * sxc
    r_base = _row_offset(offs_p, S, N1, N2, sr0, sr1, sr2) + seg * D * src
    dy_base = _row_offset(offs_p, S, N1, N2, sd0, sd1, sd2) + seg * CS * sdc
    dx_base = _row_offset(offs_p, S, N1, N2, sg0, sg1, sg2) + seg * CS * sgc

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
        tl.store(DELTA + offs_p[:, None] * L + offs_j[None, :], delta, mask=pj_ok)
        dz = p * (dp - delta[:, None, :])
        dxm += tl.dot(p.to(dy.dtype), dy, input_precision=PREC, out_dtype=ACC)  # (P, I, C)
        dz = tl.reshape(dz, (BLOCK_P, BLOCK_I * BLOCK_J)).to(WG.dtype.element_ty)
        for k0 in range(0, LD, BLOCK_K):
            offs_m = k0 + tl.arange(0, BLOCK_K)
            m_ok = offs_m < LD
            w = tl.load(WG + n_flat[:, None] * LD + offs_m[None, :], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            dr_ptrs = DR + offs_p[:, None] * LD + offs_m[None, :]
            dr_mask = p_ok[:, None] & m_ok[None, :]
            dr = tl.load(dr_ptrs, mask=dr_mask, other=0.0)
            tl.store(dr_ptrs, dr + tl.dot(dz, w, input_precision=PREC, out_dtype=ACC), mask=dr_mask)

    tl.store(DXM + dx_base[:, None, None] + offs_i[None, :, None] * sgl + offs_c[None, None, :] * sgc,
             dxm.to(DXM.dtype.element_ty),
             mask=p_ok[:, None, None] & i_ok[None, :, None] & c_ok[None, None, :])


@triton.jit
def _bwd_weights_kernel(
    X, R, WG, BG, DY, LSE, DELTA, DWG, DBG,
    sx0, sx1, sx2, sxl, sxc,
    sr0, sr1, sr2, srl, src,
    sd0, sd1, sd2, sdl, sdc,
    NP, S, N1, N2, L, CS, D, LD, GROUPS,
    HAS_BG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_LD: tl.constexpr,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < L * L
    i_n = offs_n // L
    j_n = offs_n % L
    offs_m = tl.arange(0, BLOCK_LD)
    m_ok = offs_m < LD
    # this program's generate rows, reused for every problem block of its group
    w = tl.load(WG + offs_n[:, None] * LD + offs_m[None, :], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
    if HAS_BG:
        bg = tl.load(BG + offs_n, mask=n_ok, other=0.0).to(ACC)
    dw = tl.zeros((BLOCK_N, BLOCK_LD), ACC)
    db = tl.zeros((BLOCK_N,), ACC)

    for pb in range(pid_g, tl.cdiv(NP, BLOCK_P), GROUPS):
        offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        p_ok = offs_p < NP
        seg = offs_p % S
        x_base = _row_offset(offs_p, S, N1, N2, sx0, sx1, sx2) + seg * CS * sxc
        r_base = _row_offset(offs_p, S, N1, N2, sr0, sr1, sr2) + seg * D * src
        dy_base = _row_offset(offs_p, S, N1, N2, sd0, sd1, sd2) + seg * CS * sdc
        r = tl.load(R + r_base[:, None] + (offs_m // D)[None, :] * srl + (offs_m % D)[None, :] * src,
                    mask=p_ok[:, None] & m_ok[None, :], other=0.0)  # (P, LD)
        z = tl.dot(r, tl.trans(w), input_precision=PREC, out_dtype=ACC)  # (P, N)
        if HAS_BG:
            z += bg[None, :]
        pn_ok = p_ok[:, None] & n_ok[None, :]
        stat = offs_p[:, None] * L + j_n[None, :]
        lse = tl.load(LSE + stat, mask=pn_ok, other=0.0)
        delta = tl.load(DELTA + stat, mask=pn_ok, other=0.0)
        p = tl.where(pn_ok, tl.exp(z - lse), 0.0)
        # dP[p, n] = sum_c x[p, i_n, c] * dy[p, j_n, c]
        dp = tl.zeros((BLOCK_P, BLOCK_N), ACC)
        for c0 in range(0, CS, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            m3 = pn_ok[:, :, None] & (offs_c < CS)[None, None, :]
            xg = tl.load(X + x_base[:, None, None] + i_n[None, :, None] * sxl + offs_c[None, None, :] * sxc,
                         mask=m3, other=0.0)
            dyg = tl.load(DY + dy_base[:, None, None] + j_n[None, :, None] * sdl + offs_c[None, None, :] * sdc,
                          mask=m3, other=0.0)
            dp += tl.sum(xg.to(ACC) * dyg.to(ACC), 2)
        dz = p * (dp - delta)
        db += tl.sum(dz, 0)
        dw += tl.dot(tl.trans(dz.to(r.dtype)), r, input_precision=PREC, out_dtype=ACC)

    tl.store(DWG + pid_g * (L * L * LD) + offs_n[:, None] * LD + offs_m[None, :], dw,
             mask=n_ok[:, None] & m_ok[None, :])
    tl.store(DBG + pid_g * (L * L) + offs_n, db, mask=n_ok)


# ---------------------------------------------------------------- launchers


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def _acc(dtype: torch.dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def launch_configs(L: int, CS: int, LD: int, dtype: torch.dtype):
    """{kernel name: (constexpr arguments, launch options)} for one problem geometry.

    Shared by the launchers and by the offline compile check in the tests. Sizes were checked
    with ptxas for sm_90 at the DynaMixer shapes: a single stage, a 32 (fp16) / 16 (fp32) wide
    reduction chunk for L > 16 and 8-channel gathers in the weights kernel keep register spills
    small and shared memory under 100 KB (fp32).
    """
    _, acc = _acc(dtype)
    # fp32 inputs: exact fp32 products (no silent TF32) so results match the reference
    prec = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    bi, bc = _pow2(L), _pow2(CS)
    bk = min(64 if bi <= 16 else (32 if dtype in (torch.float16, torch.bfloat16) else 16), _pow2(LD))
    rows = dict(BLOCK_P=16, BLOCK_I=bi, BLOCK_J=16, BLOCK_C=bc, BLOCK_K=bk, ACC=acc, PREC=prec)
    rows_opts = dict(num_warps=4 if bi * bc <= 256 else 8, num_stages=1)
    block_ld = _pow2(LD)
    weights = dict(BLOCK_P=16, BLOCK_N=max(16, min(32, 8192 // block_ld)), BLOCK_LD=block_ld, BLOCK_C=8,
                   ACC=acc, PREC=prec)
    return {"_fwd_kernel": (rows, rows_opts), "_bwd_rows_kernel": (rows, rows_opts),
            "_bwd_weights_kernel": (weights, dict(num_warps=8, num_stages=1))}


def _strides(t: torch.Tensor):
    return tuple(t.stride())


def _dims(x: torch.Tensor):
    N0, N1, N2, L, C = x.shape
    return N0 * N1 * N2, N1, N2, L, C


def mix_fwd(x, r, wg, bg, S: int):
    """x (N0, N1, N2, L, C), r (N0, N1, N2, L, S*d), any strides -> y (x's layout), lse (N0, N1, N2, S, L)."""
    from vitattn.torch_backend.dynamixer import empty_tokenwise

    rows, N1, N2, L, C = _dims(x)
    CS, D = C // S, r.shape[-1] // S
    LD = L * D
    acc_t, _ = _acc(x.dtype)
    y = empty_tokenwise(x, C, x.dtype)
    lse = torch.empty(*x.shape[:3], S, L, device=x.device, dtype=acc_t)
    wg = wg.contiguous()
    bg_arg = wg if bg is None else bg.contiguous()
    meta, opts = launch_configs(L, CS, LD, x.dtype)["_fwd_kernel"]
    NP = rows * S
    _fwd_kernel[(triton.cdiv(NP, meta["BLOCK_P"]),)](
        x, r, wg, bg_arg, y, lse, *_strides(x), *_strides(r), *_strides(y),
        NP, S, N1, N2, L, CS, D, LD, HAS_BG=bg is not None, **opts, **meta,
    )
    return y, lse


def _groups(n_tiles: int, n_blocks: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = max(1, (4 * sms) // max(1, n_tiles))
    else:  # interpreter: a few groups so the partial-sum path is exercised
        target = 2
    return max(1, min(n_blocks, target))


def mix_bwd(dy, x, r, wg, bg, lse, S: int):
    """Gradients of mix_fwd: dx_mix (x's layout, x.dtype), dR (like r, fp32/fp64), dWg, dbg (fp32/fp64)."""
    from vitattn.torch_backend.dynamixer import empty_tokenwise

    rows, N1, N2, L, C = _dims(x)
    CS, D = C // S, r.shape[-1] // S
    LD = L * D
    NP = rows * S
    acc_t, _ = _acc(x.dtype)
    wg = wg.contiguous()
    bg_arg = wg if bg is None else bg.contiguous()
    lse = lse.contiguous()
    cfg = launch_configs(L, CS, LD, x.dtype)
    meta, opts = cfg["_bwd_rows_kernel"]
    dxm = empty_tokenwise(x, C, x.dtype)
    dr_p = torch.zeros(NP, LD, device=x.device, dtype=acc_t)  # (row, s, i, k) order
    delta = torch.empty(NP, L, device=x.device, dtype=acc_t)
    _bwd_rows_kernel[(triton.cdiv(NP, meta["BLOCK_P"]),)](
        x, r, wg, bg_arg, dy, lse, dxm, dr_p, delta,
        *_strides(x), *_strides(r), *_strides(dy), *_strides(dxm),
        NP, S, N1, N2, L, CS, D, LD, HAS_BG=bg is not None, **opts, **meta,
    )
    # (row, s, i, k) -> (N0, N1, N2, L, S*d), the token-wise layout of dR
    dr = dr_p.view(*x.shape[:3], S, L, D).transpose(3, 4).reshape(*x.shape[:3], L, S * D)

    wmeta, wopts = cfg["_bwd_weights_kernel"]
    n_tiles = triton.cdiv(L * L, wmeta["BLOCK_N"])
    n_blocks = triton.cdiv(NP, meta["BLOCK_P"])
    groups = _groups(n_tiles, n_blocks, x.device)
    dwg_part = torch.empty(groups, L * L, LD, device=x.device, dtype=acc_t)
    dbg_part = torch.empty(groups, L * L, device=x.device, dtype=acc_t)
    _bwd_weights_kernel[(n_tiles, groups)](
        x, r, wg, bg_arg, dy, lse, delta, dwg_part, dbg_part,
        *_strides(x), *_strides(r), *_strides(dy),
        NP, S, N1, N2, L, CS, D, LD, groups, HAS_BG=bg is not None, **wopts, **wmeta,
    )
    return dxm, dr, dwg_part.sum(0), dbg_part.sum(0)


# ---------------------------------------------------------------- offline compile check

_PTR_ACC = ("LSE", "DELTA", "DR", "DWG", "DBG")
_PTR_DATA = ("X", "R", "WG", "BG", "Y", "DY", "DXM")
_UNIT_STRIDES = ("sxc", "src", "syc", "sdc", "sgc")


def compile_offline(L: int, CS: int, LD: int, dtype: torch.dtype, arch: int = 90):
    """Compile the three kernels for NVIDIA sm_<arch> without a GPU; {kernel: shared memory bytes}.

    Checks that the kernels lower to a cubin at a geometry (the launch configs of
    launch_configs, unit channel strides as the JIT specialises them). Needs the kernels
    defined without TRITON_INTERPRET and the ptxas that ships with Triton.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    data, acc = names[dtype], "fp32"
    out = {}
    for name, (meta, opts) in launch_configs(L, CS, LD, dtype).items():
        fn = globals()[name]
        consts = dict(meta, HAS_BG=True, **{k: 1 for k in _UNIT_STRIDES if k in fn.arg_names})
        sig = {}
        for a in fn.arg_names:
            if a in consts:
                sig[a] = "constexpr"
            elif a in _PTR_ACC:
                sig[a] = f"*{acc}"
            elif a in _PTR_DATA:
                sig[a] = f"*{data}"
            else:
                sig[a] = "i32"
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(opts))
        assert "cubin" in compiled.asm, f"{name}: no cubin produced"
        out[name] = compiled.metadata.shared
    return out
