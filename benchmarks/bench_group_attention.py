"""Benchmark: vitattn.group_attention against SReT's group attention and a permute + SDPA path.

Shapes are the SReT-T / SReT-S stages at 224^2 (d = 32 / 42):
stage 1 N = 784 with G = 8 (first pass) and G = 2 + a random permutation (recursive pass),
stage 2 N = 196 with G = 4, stage 3 N = 49 with G = 1; batch 256. The qkv and output
projections are left out (identical for every implementation).

Implementations (all from the same (B, heads, N, d) q, k, v):
* "SReT reference": as the official Group_Attention: a CPU randperm index (each call copies it
  to the device), x[:, :, idx] copies, (G, n, n) logits with matmul + softmax in the input
  dtype, argsort for the inverse and an x[:, :, inverse] copy.
* "permute+SDPA": index_select copies with a device permutation, F.scaled_dot_product_attention
  on (B, heads * G) batches of n tokens (a view, no copy), an inverse index_select copy.
* "vitattn <backend>": the op; the Triton kernels gather through perm in the loads and scatter
  in the stores (no copies).

Columns: fwd_ms and fwd_bwd_ms (median), peak_mib (peak extra memory of one forward+backward),
vs_sret and vs_sdpa (fwd+bwd speedup over those rows of the same shape).

    python benchmarks/bench_group_attention.py            # full (GPU)
    python benchmarks/bench_group_attention.py --quick    # small batch, CPU-friendly
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_device, cli, peak_memory_mb, time_fn  # noqa: E402

import importlib  # noqa: E402

import vitattn  # noqa: E402,F401
from vitattn.group_attention import group_attention, inverse_permutation, random_permutation  # noqa: E402

# the module itself (vitattn.group_attention may name the function once exported from vitattn)
ga_mod = importlib.import_module("vitattn.ops.group_attention.op")

# name: (N, heads, d, groups, permuted)
SHAPES = {
    "SReT-T s1": (784, 2, 32, 8, False),
    "SReT-T s1 rec": (784, 2, 32, 2, True),
    "SReT-T s2": (196, 4, 32, 4, False),
    "SReT-T s3": (49, 8, 32, 1, False),
    "SReT-S s1": (784, 3, 42, 8, False),
    "SReT-S s1 rec": (784, 3, 42, 2, True),
    "SReT-S s2": (196, 6, 42, 4, False),
    "SReT-S s3": (49, 12, 42, 1, False),
}
COLUMNS = ["shape", "N", "G", "perm", "heads", "d", "batch", "dtype", "impl", "fwd_ms", "fwd_bwd_ms",
           "vs_sret", "vs_sdpa", "peak_mib"]


def sret_reference(q, k, v, groups: int, perm_cpu, scale: float):
    """The official SReT Group_Attention math on (B, heads, N, d) tensors, input dtype throughout."""
    B, H, N, d = q.shape
    if perm_cpu is not None:
        q, k, v = q[:, :, perm_cpu], k[:, :, perm_cpu], v[:, :, perm_cpu]
        inverse = torch.argsort(perm_cpu)
    n = N // groups
    qg, kg, vg = (t.reshape(B, H, groups, n, -1) for t in (q, k, v))
    attn = ((qg @ kg.transpose(-2, -1)) * scale).softmax(dim=-1)
    x = (attn @ vg).reshape(B, H, N, -1)
    if perm_cpu is not None:
        x = x[:, :, inverse]
    return x


def permute_sdpa(q, k, v, groups: int, perm, inv, scale: float):
    B, H, N, d = q.shape
    if perm is not None:
        q, k, v = (t.index_select(2, perm) for t in (q, k, v))
    n = N // groups
    # (B, H, N, d) contiguous -> (B, H * G, n, d) is a view: the (B * G) batches of the issue
    qg, kg, vg = (t.reshape(B, H * groups, n, -1) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qg, kg, vg, scale=scale).reshape(B, H, N, -1)
    return out.index_select(2, inv) if perm is not None else out


def run(quick: bool, device) -> List[Dict]:
    device = bench_device(device)
    on_gpu = device.type == "cuda"
    batch = 256 if not quick else (32 if on_gpu else 2)
    dtypes = [torch.float16, torch.float32] if on_gpu else [torch.float32]
    shapes = SHAPES if (on_gpu or not quick) else {k: SHAPES[k] for k in ("SReT-T s1", "SReT-T s1 rec",
                                                                          "SReT-S s2", "SReT-S s3")}
    reps = dict(warmup=1, repeats=3) if quick else dict(warmup=3, repeats=10, min_time=0.2)
    rows: List[Dict] = []
    for name, (N, H, d, G, permuted) in shapes.items():
        for dtype in dtypes:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(batch, H, N, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
                       for _ in range(3))
            dy = torch.randn(batch, H, N, d, generator=g).to(device=device, dtype=dtype)
            scale = d ** -0.5
            perm = random_permutation(N, device=device) if permuted else None
            inv = inverse_permutation(perm) if permuted else None
            perm_cpu = perm.cpu() if permuted else None
            impls = [
                ("SReT reference", lambda: sret_reference(q, k, v, G, perm_cpu, scale)),
                ("permute+SDPA", lambda: permute_sdpa(q, k, v, G, perm, inv, scale)),
            ]
            ctx = ga_mod._context(q, v, G, perm)
            for backend in ("triton", "torch"):
                if ga_mod.dispatcher.reason(backend, ctx, auto=True) is None:
                    impls.append((f"vitattn {backend}",
                                  lambda _b=backend: group_attention(q, k, v, G, perm=perm, backend=_b)))
            base: Dict[str, float] = {}
            for impl, fn in impls:
                def fwd():
                    with torch.no_grad():
                        return fn()

                def fwd_bwd():
                    torch.autograd.grad(fn(), (q, k, v), dy)

                row = dict(shape=name, N=N, G=G, perm=permuted, heads=H, d=d, batch=batch,
                           dtype=str(dtype).replace("torch.", ""), impl=impl)
                row["fwd_ms"] = time_fn(fwd, device, **reps)
                row["fwd_bwd_ms"] = time_fn(fwd_bwd, device, **reps)
                row["peak_mib"] = peak_memory_mb(fwd_bwd, device)
                base.setdefault(impl, row["fwd_bwd_ms"])
                row["vs_sret"] = base["SReT reference"] / row["fwd_bwd_ms"]
                row["vs_sdpa"] = base["permute+SDPA"] / row["fwd_bwd_ms"] if "permute+SDPA" in base else None
                rows.append(row)
                print(f"{name} {row['dtype']} {impl}: fwd {row['fwd_ms']:.2f} ms, fwd+bwd {row['fwd_bwd_ms']:.2f} ms",
                      flush=True)
    return rows


def main() -> None:
    cli("bench_group_attention", run, COLUMNS, __doc__, quick_help="small batch, few repeats (CPU-friendly)")


if __name__ == "__main__":
    main()
