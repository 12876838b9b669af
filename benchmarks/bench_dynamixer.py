"""Benchmark: vitattn.dynamixer against the official DynaMixerOp mixing, eager and torch.compile'd.

Shapes: the DynaMixer-S/M/L stage shapes at 224^2, batch 8 (vitattn/models/dynamixer.py,
patch 7 -> a 32x32 grid, 16x16 after the transition): every distinct (L, C, S, d) the models
run, on a (B, H, W, C) grid with H = W = L. Axis "w" mixes along W (rows of the grid), axis
"h" along H: the official block permutes and copies for it, vitattn reads the transposed view.
The ``out`` projection is left out of every method (the same nn.Linear either way).

Methods (role in the report):
* "vitattn:auto" (auto): backend="auto"; "backend" names what it chose;
* "vitattn:<backend>" (backend): every backend that can run here by name (cpu, torch; triton on GPU);
* "naive": the official DynaMixerOp.forward without ``out``, eager (linear, reshape/permute
  copies, the (B, S, L, L) logits, softmax over dim -2, matmul);
* "official_compiled" (peer): torch.compile of that same code (the best stock peer; its
  compile time, first forward+backward plus first inference call, is in compile_s).

Every method of one shape, axis and thread count is timed in one process with the calls
alternating (each method once per round, the order shuffled every round:
common.time_alternating); times are medians of wall-clock
calls. gflops counts the useful work of the op (compress, generate and mix GEMMs; the
backward twice the forward), not a backend's recomputation; frac_peak divides it by one
core's fp32 peak times the threads (benchmarks/common.py cpu_peak_gflops_per_core: measured
on the machine, stated in the header as fp32_peak_per_core). fwd_x and fwd_bwd_x: speed-up over the naive row of the same shape,
axis and threads; fwd_x_cpu and fwd_bwd_x_cpu (one thread): the same in CPU time of the
calling thread (fwd_cpu_ms, fwd_bwd_cpu_ms in the JSON), which leaves out waiting for a core on
a shared machine. peak_mib: peak memory allocated through PyTorch's CPU allocator during one
forward+backward (benchmarks/common.py PEAK_MEMORY_METHOD; the kernels' per-thread scratch,
kept between calls, is not in it).

    python benchmarks/bench_dynamixer.py                    # full (CPU: 1 and 2 threads)
    python benchmarks/bench_dynamixer.py --quick            # few repeats, one axis, no compile
    python benchmarks/bench_dynamixer.py --update-ranking   # and rewrite vitattn/ops/dynamixer/measured.json
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (auto_summary, bench_device, commit, cpu_peak_gflops_per_core, op_bench_main,  # noqa: E402
                    peak_memory_mb, time_alternating, write_ranking)

import vitattn  # noqa: E402
from vitattn import dynamixer  # noqa: E402
from vitattn.ops.dynamixer import backends as dm_backends  # noqa: E402

# (model, stage) label: (L, C, S, d) -- the distinct mixing shapes of the three models at 224^2
SHAPES = {
    "S s1": (32, 192, 8, 2),
    "S s2-4": (16, 384, 16, 2),
    "M s1-2": (32, 256, 8, 2),
    "M s3-4": (16, 512, 16, 2),
    "L s1": (32, 256, 8, 8),
    "L s2-4": (16, 512, 16, 8),
}
BATCH = 8
MEASURED_JSON = os.path.join(os.path.dirname(os.path.abspath(dm_backends.__file__)), "measured.json")
COLUMNS = ["shape", "model", "L", "C", "S", "d", "batch", "axis", "threads", "dtype", "method", "backend", "fwd_ms",
           "fwd_bwd_ms", "fwd_x", "fwd_bwd_x", "fwd_x_cpu", "fwd_bwd_x_cpu", "gflops", "gflops_fwd_bwd", "frac_peak",
           "peak_mib", "compile_s"]


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


def useful_gflop(L: int, C: int, S: int, d: int, batch: int) -> float:
    """Forward GFLOP of one call: compress, generate and mix GEMMs over every row of the grid."""
    rows, tokens = batch * L, batch * L * L
    return (2 * tokens * C * S * d + 2 * rows * S * L * L * L * d + 2 * rows * S * L * L * (C // S)) / 1e9


def _inputs(L, C, S, d, batch, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
    grid = rnd(batch, L, L, C).requires_grad_(True)
    params = [rnd(S * d, C, scale=C ** -0.5), rnd(S * d, scale=0.1), rnd(L * L, L * d, scale=(L * d) ** -0.5),
              rnd(L * L, scale=0.1)]
    return grid, [p.requires_grad_(True) for p in params]


def _methods(device: torch.device, ctx: dict, compile_peer: bool):
    """[(method, role, backend, fn(grid, *params, S, axis))] for one shape."""
    chosen = dm_backends.dispatcher.explain(ctx).chosen
    out = [("vitattn:auto", "auto", chosen, lambda *a: vitattn_axis(*a, backend="auto"))]
    for name in dm_backends.NAMES[1:]:
        if dm_backends.dispatcher.reason(name, ctx, auto=False) is None and not (
                name == "triton" and device.type == "cpu"):  # the interpreter is a testing tool
            out.append((f"vitattn:{name}", "backend", name, lambda *a, _b=name: vitattn_axis(*a, backend=_b)))
    out.append(("naive", "naive", None, official_axis))
    if compile_peer:
        out.append(("official_compiled", "peer", None, torch.compile(official_axis, dynamic=False)))
    return out


def run(quick: bool, device, threads: Optional[List[int]] = None, shapes: Optional[List[str]] = None,
        progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    device = bench_device(device)
    on_gpu = device.type == "cuda"
    thread_counts = [None] if on_gpu else (threads or ([1] if quick else [1, 2]))
    dtype = torch.float32
    axes = ("h",) if quick else ("w", "h")
    reps = dict(warmup=1, repeats=3, min_time=0.0) if quick else dict(warmup=2, repeats=9, min_time=1.0)
    compile_peer = not quick
    rows: List[Dict] = []
    for label, (L, C, S, d) in SHAPES.items():
        if shapes and label not in shapes:
            continue
        grid, params = _inputs(L, C, S, d, BATCH, dtype, device)
        dy = torch.randn_like(grid)
        ctx = dict(device=device, dtype=dtype, L=L, C=C, S=S, d=d)
        methods = _methods(device, ctx, compile_peer)
        gflop = useful_gflop(L, C, S, d, BATCH)
        compiled: set = set()  # axes the compiled peer has been compiled for
        for axis in axes:
            for nthreads in thread_counts:
                if nthreads is not None:
                    torch.set_num_threads(nthreads)
                if progress:
                    progress(f"{label} axis {axis} threads {nthreads}")
                fwd, fwd_bwd, compile_s = {}, {}, {}
                for method, _, _, fn in methods:
                    args = (grid, *params, S, axis)

                    def f(fn=fn, args=args):
                        with torch.no_grad():
                            return fn(*args)

                    def fb(fn=fn, args=args):
                        torch.autograd.grad(fn(*args), [grid, *params], dy)

                    if method == "official_compiled" and axis not in compiled:
                        t0 = time.perf_counter()  # first calls: tracing and compiling, both graphs
                        fb()
                        f()
                        compile_s[method] = time.perf_counter() - t0
                        compiled.add(axis)
                    fwd[method], fwd_bwd[method] = f, fb
                t_f, c_f = time_alternating(fwd, **reps)
                t_fb, c_fb = time_alternating(fwd_bwd, **reps)
                for method, role, backend, _ in methods:
                    row = dict(shape=label, model=label.split()[0], L=L, C=C, S=S, d=d, batch=BATCH, axis=axis,
                               threads=nthreads if nthreads is not None else "", dtype="float32",
                               method=method, role=role, backend=backend, tokens=L * L,
                               fwd_ms=t_f[method], fwd_bwd_ms=t_fb[method])
                    row["fwd_x"] = t_f["naive"] / t_f[method]
                    row["fwd_bwd_x"] = t_fb["naive"] / t_fb[method]
                    if nthreads == 1:  # the same ratios in thread CPU time (see common.time_alternating)
                        row["fwd_cpu_ms"], row["fwd_bwd_cpu_ms"] = c_f[method], c_fb[method]
                        row["fwd_x_cpu"] = c_f["naive"] / c_f[method]
                        row["fwd_bwd_x_cpu"] = c_fb["naive"] / c_fb[method]
                    row["gflops"] = gflop / (t_f[method] / 1e3)
                    row["gflops_fwd_bwd"] = 3 * gflop / (t_fb[method] / 1e3)
                    if not on_gpu:
                        row["frac_peak"] = row["gflops"] / (cpu_peak_gflops_per_core() * nthreads)
                    row["peak_mib"] = peak_memory_mb(fwd_bwd[method], device)
                    row["compile_s"] = compile_s.get(method)
                    rows.append(row)
                    print(f"{label} {axis} t{nthreads} {method}: fwd {row['fwd_ms']:.2f} ms ({row['fwd_x']:.2f}x), "
                          f"fwd+bwd {row['fwd_bwd_ms']:.2f} ms ({row['fwd_bwd_x']:.2f}x), "
                          f"{row['gflops']:.1f} GFLOP/s, peak {row['peak_mib']:.1f} MiB", flush=True)
    if not on_gpu:
        torch.set_num_threads(1)
    return rows


def summary(rows: List[Dict], device: torch.device) -> str:
    """The issue's goals per thread count (benchmarks/common.py auto_summary)."""
    return auto_summary(rows, lambda r: (r["shape"], r["axis"]))


def update_ranking(rows: List[Dict], command: str) -> Dict:
    """measured.json for "auto" (benchmarks/common.py write_ranking)."""
    return write_ranking(MEASURED_JSON, rows, lambda r: dm_backends.shape_class(dict(L=r["L"])),
                         f"benchmarks/results/bench_dynamixer.md: `{command}` at {commit()} (fp32, batch {BATCH}, "
                         "one thread; fastest first by the geometric mean of forward and forward+backward times)")


def main() -> None:
    op_bench_main("bench_dynamixer", run, COLUMNS, __doc__, shapes=list(SHAPES), measured_json=MEASURED_JSON, summary=summary,
                  update_ranking=update_ranking, quick_help="few repeats, one axis, one thread, no compile")


if __name__ == "__main__":
    main()
