"""Helpers shared by the Triton kernel modules: tile sizes, accumulation dtypes, the launch
resources of the current GPU, and a fixed-order reduction of per-program partial sums.

Like every module in kernels/, this imports nothing from vitattn.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Registers per thread a kernel's live tiles may need (fp32 elements of the accumulators and
# operands held in registers): above it ptxas spills. The kernels' configs stay below it and the
# can-run checks refuse shapes no config fits; tests/test_gpu_compile.py compiles the configs
# and checks that ptxas reports (almost) no spills.
REG_BUDGET = 160


def pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(int(n)))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs (interpreter only), fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of tl.dot on inputs of dtype.

    fp32: "tf32x3" (three TF32 tensor-core products, relative error about 1e-6, far inside
    the fp32 tolerances, measured by tests/test_gpu_compile.py's emulation test) instead of
    "ieee", whose FMA dots keep whole operand rows per thread and spill registers at every
    useful tile size. fp64 (interpreter only): "ieee". fp16/bf16 operands are exact in any
    mode ("tf32" is Triton's default there).
    """
    if dtype == torch.float64:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def smem_limit(device) -> Optional[int]:
    """Largest dynamic shared memory one block may use on device (opt-in limit), or None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)


def smem_reason(what: str, need: int, device) -> Optional[str]:
    """None if need bytes of shared memory fit one block on device, else the reason."""
    limit = smem_limit(device)
    if limit is None or need <= limit:
        return None
    return (f"{what} needs {need} bytes of shared memory per block, more than this GPU's "
            f"{limit} ({torch.cuda.get_device_name(device)})")


# ---------------------------------------------------------------- fixed-order partial sums


@triton.jit
def _sum_partials_kernel(P, OUT, R, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                         ACC: tl.constexpr):
    # OUT[a, k] = sum_r P[a, r, k]; P (A, R, K), OUT (A, K) contiguous. The order of the
    # additions depends only on R, K and the block sizes: the same on every GPU.
    a = tl.program_id(0).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    acc = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    base = P + a * R * K
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        acc += tl.load(base + offs_r[:, None].to(tl.int64) * K + offs_k[None, :],
                       mask=(offs_r < R)[:, None] & k_ok[None, :], other=0.0).to(ACC)
    tl.store(OUT + a * K + offs_k, tl.sum(acc, 0), mask=k_ok)


def sum_partials(part: torch.Tensor) -> torch.Tensor:
    """(A, R, K) contiguous partial sums -> (A, K) summed over R in a fixed order (accumulation dtype)."""
    A, R, K = part.shape
    out = torch.empty(A, K, device=part.device, dtype=acc_dtype(part.dtype))
    if A == 0 or K == 0:
        return out
    block_k = min(256, pow2(K, 1))
    block_r = max(1, min(pow2(R, 1), 2048 // block_k))
    _sum_partials_kernel[(A, triton.cdiv(K, block_k))](
        part, out, R, K, BLOCK_R=block_r, BLOCK_K=block_k, ACC=acc_tl(part.dtype), num_warps=4,
    )
    return out


def smem_bytes(kernel: str, meta: dict, opts: dict, dtype: torch.dtype, arch: int = 90) -> int:
    """Shared memory (bytes) of _sum_partials_kernel: at most one fp32 partial per column and warp
    for the cross-warp reduction of its tile."""
    return 4 * meta["BLOCK_K"] * opts.get("num_warps", 4) + 64
