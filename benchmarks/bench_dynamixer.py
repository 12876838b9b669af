"""Benchmark: vitattn.dynamixer against the official DynaMixerOp mixing, eager and torch.compile'd.

Shapes are the DynaMixer-S/M/L stage shapes of the issue, batch 128, on a (B, H, W, C) grid
with H = W = L: axis "w" mixes along W (rows of the grid), axis "h" along H (the official
block permutes and copies for it; vitattn reads a transposed view). The ``out`` projection
is left out of both sides (it is the same nn.Linear either way).

Columns: fwd_ms and fwd_bwd_ms (median), peak_mib (peak extra memory of one forward+backward),
saved_x (activation bytes autograd keeps for backward, the input itself included and
parameters excluded, divided by the input's bytes; eager only), speedup (fwd+bwd vs the eager official op on the same row).

    python benchmarks/bench_dynamixer.py            # full (GPU)
    python benchmarks/bench_dynamixer.py --quick    # small batch, CPU-friendly
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_device, cli, peak_memory_mb, saved_bytes, time_fn  # noqa: E402

import vitattn  # noqa: E402,F401
from vitattn import dynamixer  # noqa: E402

dm_mod = importlib.import_module("vitattn.ops.dynamixer.op")  # the module (vitattn may export a function of that name)

# name: (L, C, S, d)
SHAPES = {
    "DynaMixer-S": (32, 192, 8, 2),
    "DynaMixer-M": (16, 384, 16, 2),
    "DynaMixer-L": (32, 256, 8, 8),
}
COLUMNS = ["shape", "L", "C", "S", "d", "batch", "axis", "dtype", "impl", "fwd_ms", "fwd_bwd_ms", "speedup",
           "peak_mib", "saved_x"]


def official_mix(x, wc, bc, wg, bg, S: int):
    """The official DynaMixerOp.forward up to (not including) ``out``, on contiguous (B, L, C)."""
    B, L, C = x.shape
    d = wc.shape[0] // S
    w = F.linear(x, wc, bc).reshape(B, L, S, d).permute(0, 2, 1, 3).reshape(B, S, L * d)
    w = torch.softmax(F.linear(w, wg, bg).reshape(B, S, L, L), dim=-2)
    xs = x.reshape(B, L, S, C // S).permute(0, 2, 3, 1)
    return torch.matmul(xs, w).permute(0, 3, 1, 2).reshape(B, L, C)


def official_axis(grid, wc, bc, wg, bg, S: int, axis: str):
    """As the official block calls it: copies of the permuted grid for the H axis."""
    B, H, W, C = grid.shape
    if axis == "w":
        return official_mix(grid.reshape(-1, W, C), wc, bc, wg, bg, S).reshape(B, H, W, C)
    y = official_mix(grid.permute(0, 2, 1, 3).reshape(-1, H, C), wc, bc, wg, bg, S)
    return y.reshape(B, W, H, C).permute(0, 2, 1, 3)


def vitattn_axis(grid, wc, bc, wg, bg, S: int, axis: str, backend: str):
    if axis == "w":
        return dynamixer(grid, wc, bc, wg, bg, S, backend=backend)
    return dynamixer(grid.transpose(1, 2), wc, bc, wg, bg, S, backend=backend).transpose(1, 2)


def _inputs(L, C, S, d, batch, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
    grid = rnd(batch, L, L, C).requires_grad_(True)
    params = [rnd(S * d, C, scale=C ** -0.5), rnd(S * d, scale=0.1), rnd(L * L, L * d, scale=(L * d) ** -0.5),
              rnd(L * L, scale=0.1)]
    return grid, [p.requires_grad_(True) for p in params]


def _impls(quick: bool, device: torch.device, ctx: dict):
    out = [("official eager", official_axis, True)]
    compiled = torch.compile(official_axis, dynamic=False)
    out.append(("official compiled", compiled, False))
    for backend in ("triton", "torch"):
        why = dm_mod.dispatcher.reason(backend, ctx, auto=True)
        if why is None:
            out.append((f"vitattn {backend}", lambda *a, _b=backend: vitattn_axis(*a, backend=_b), True))
    return out


def run(quick: bool, device) -> List[Dict]:
    device = bench_device(device)
    on_gpu = device.type == "cuda"
    batch = 128 if not quick else (8 if on_gpu else 1)
    dtypes = [torch.float16, torch.float32] if on_gpu else [torch.float32]
    axes = ("w", "h") if not quick else ("h",)
    reps = dict(warmup=1, repeats=2) if quick else dict(warmup=3, repeats=10, min_time=0.2)
    rows: List[Dict] = []
    for name, (L, C, S, d) in SHAPES.items():
        for dtype in dtypes:
            grid, params = _inputs(L, C, S, d, batch, dtype, device)
            dy = torch.randn_like(grid)
            ctx = dict(device=device, dtype=dtype, L=L, C=C, S=S, d=d)
            impls = _impls(quick, device, ctx)
            for axis in axes:
                base = None
                for impl, fn, eager in impls:
                    if quick and not on_gpu and impl == "official compiled" and name != "DynaMixer-S":
                        continue  # compiling is slow on a shared CPU: one shape is enough to show it
                    args = (grid, *params, S, axis)

                    def fwd():
                        with torch.no_grad():
                            return fn(*args)

                    def fwd_bwd():
                        y = fn(*args)
                        torch.autograd.grad(y, [grid, *params], dy)

                    row = dict(shape=name, L=L, C=C, S=S, d=d, batch=batch, axis=axis,
                               dtype=str(dtype).replace("torch.", ""), impl=impl)
                    row["fwd_ms"] = time_fn(fwd, device, **reps)
                    row["fwd_bwd_ms"] = time_fn(fwd_bwd, device, **reps)
                    row["peak_mib"] = peak_memory_mb(fwd_bwd, device)
                    row["saved_x"] = saved_bytes(lambda: fn(*args), params) / (grid.numel() * grid.element_size()) if eager else None
                    if impl == "official eager":
                        base = row["fwd_bwd_ms"]
                    row["speedup"] = base / row["fwd_bwd_ms"] if base else None
                    rows.append(row)
                    print(f"{name} {row['dtype']} {axis} {impl}: fwd {row['fwd_ms']:.2f} ms, "
                          f"fwd+bwd {row['fwd_bwd_ms']:.2f} ms, saved_x {row['saved_x']}", flush=True)
    return rows


def main() -> None:
    cli("bench_dynamixer", run, COLUMNS, __doc__, quick_help="small batch, few repeats (CPU-friendly)")


if __name__ == "__main__":
    main()
