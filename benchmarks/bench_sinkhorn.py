"""Benchmark: vitattn.ot_attention (SeTformer's Sinkhorn OT token mixer) against the naive dense code.

Shapes: the four SeTformer-Mini stages at 224^2, batch 8 (vitattn/models/setformer.py): tokens
n = 56^2, 28^2, 14^2, 7^2, references m = 8^2, 8^2, 7^2, 4^2, heads 2, 4, 8, 16, head dim 32,
eps 0.1, 5 iterations, with the model's Gaussian position filter (tau 0.1).

Methods (role in the report):
* "vitattn:auto" (auto): backend="auto"; "backend" names what it chose;
* "vitattn:<backend>" (backend): every backend that can run here by name (cpu, torch; triton on GPU);
* "naive": vitattn.reference.sinkhorn.ot_attention, the dense log-domain loop as OTKE's
  OTKernel writes it (an (n, m) score matrix, two logsumexps per iteration, autograd through
  every iteration);
* "naive_compiled" (peer): torch.compile of that same code (full runs only: inductor needs
  minutes for the unrolled loop on a 2-core CPU; its compile time is in compile_s);
* "pot" (peer, forward only): POT's ``ot.sinkhorn(..., method="sinkhorn_log")`` on one problem
  per call times the problems, when POT is installed.

Every method of one shape and thread count is timed in one process with the calls alternating
(the order shuffled every round: common.time_alternating); times are medians of wall-clock
calls. gflops counts the op's useful work: the score GEMM
(2 n m d), two (n, m) exponential passes per iteration counted as 2 n m flops each, and the two
aggregation GEMMs (2 n m dv each); the backward twice the forward. frac_peak divides it by one
core's fp32 peak times the threads (benchmarks/common.py cpu_peak_gflops_per_core: measured
on the machine, stated in the header as fp32_peak_per_core; the exponentials make the true
limit lower). fwd_x and fwd_bwd_x:
speed-up over the naive row of the same shape and threads; at one thread also in CPU time of
the calling thread (fwd_x_cpu, fwd_bwd_x_cpu). peak_mib: peak memory allocated through
PyTorch's CPU allocator during one forward+backward (benchmarks/common.py PEAK_MEMORY_METHOD).

    python benchmarks/bench_sinkhorn.py                    # full (CPU: 1 and 2 threads)
    python benchmarks/bench_sinkhorn.py --quick            # few repeats, one thread, no compile
    python benchmarks/bench_sinkhorn.py --update-ranking   # and rewrite vitattn/ops/sinkhorn/measured.json
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (auto_summary, bench_device, commit, cpu_peak_gflops_per_core, mark_unavailable,  # noqa: E402
                    op_bench_main, peak_memory_mb, time_alternating, write_ranking)

from vitattn import gaussian_filter_2d, ot_attention  # noqa: E402
from vitattn.ops.sinkhorn import backends as sk_backends  # noqa: E402
from vitattn.ops.sinkhorn import reference as sk_reference  # noqa: E402

# label: (heads, n side, m side) of SeTformer-Mini at 224^2; head dim 32 everywhere
SHAPES = {
    "Mini s1": (2, 56, 8),
    "Mini s2": (4, 28, 8),
    "Mini s3": (8, 14, 7),
    "Mini s4": (16, 7, 4),
}
BATCH, HEAD_DIM, EPS, ITERS, TAU = 8, 32, 0.1, 5, 0.1
MEASURED_JSON = os.path.join(os.path.dirname(os.path.abspath(sk_backends.__file__)), "measured.json")
COLUMNS = ["shape", "heads", "n", "m", "d", "iters", "batch", "threads", "dtype", "method", "backend", "fwd_ms",
           "fwd_bwd_ms", "fwd_x", "fwd_bwd_x", "fwd_x_cpu", "fwd_bwd_x_cpu", "gflops", "gflops_fwd_bwd", "frac_peak",
           "peak_mib", "compile_s"]


def useful_gflop(problems: int, n: int, m: int, d: int, iters: int) -> float:
    """Forward GFLOP of one call (see the docstring)."""
    return problems * (2 * n * m * d + 2 * iters * 2 * n * m + 2 * 2 * n * m * d) / 1e9


def naive(x, ref, v, filt):
    return sk_reference.ot_attention(x, ref, v, eps=EPS, iters=ITERS, pos_filter=filt)


def _pot():
    try:
        import ot  # noqa: F401
        return ot
    except Exception:
        return None


def _methods(device: torch.device, ctx: dict, compile_peer: bool):
    """[(method, role, backend, fn(x, ref, v, filt))] for one shape."""
    chosen = sk_backends.dispatcher.explain(ctx).chosen
    out = [("vitattn:auto", "auto", chosen,
            lambda x, r, v, f: ot_attention(x, r, v, eps=EPS, iters=ITERS, pos_filter=f, backend="auto"))]
    for name in sk_backends.NAMES[1:]:
        if sk_backends.dispatcher.reason(name, ctx, auto=False) is None and not (
                name == "triton" and device.type == "cpu"):  # the interpreter is a testing tool
            out.append((f"vitattn:{name}", "backend", name,
                        lambda x, r, v, f, _b=name: ot_attention(x, r, v, eps=EPS, iters=ITERS, pos_filter=f,
                                                                 backend=_b)))
    out.append(("naive", "naive", None, naive))
    if compile_peer:
        out.append(("naive_compiled", "peer", None, torch.compile(naive, dynamic=False)))
    return out


def _pot_forward(ot, x, ref, filt):
    """POT's log-domain Sinkhorn on every problem of the call, one problem at a time (its API
    takes one cost matrix), on the same scores and marginals; the aggregation GEMMs added."""
    n, m = x.shape[-2], ref.shape[-2]
    a = torch.full((n,), 1.0 / n, dtype=x.dtype)
    b = torch.full((m,), 1.0 / m, dtype=x.dtype)
    out = []
    with torch.no_grad():
        scores = (x @ ref.transpose(-1, -2)) * filt
        for s in scores.reshape(-1, n, m):
            out.append(ot.sinkhorn(a, b, -s, EPS, method="sinkhorn_log", numItermax=ITERS, stopThr=0.0))
    return out


def _inputs(heads: int, n: int, m: int, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g), dim=-1)
    x = unit(BATCH, heads, n, HEAD_DIM).to(device=device, dtype=dtype).requires_grad_(True)
    ref = unit(heads, m, HEAD_DIM).to(device=device, dtype=dtype).requires_grad_(True)
    v = torch.randn(BATCH, heads, n, HEAD_DIM, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    return x, ref, v


def run(quick: bool, device, threads: Optional[List[int]] = None, shapes: Optional[List[str]] = None,
        progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    device = bench_device(device)
    on_gpu = device.type == "cuda"
    thread_counts = [None] if on_gpu else (threads or ([1] if quick else [1, 2]))
    dtype = torch.float32
    reps = dict(warmup=1, repeats=3, min_time=0.0) if quick else dict(warmup=2, repeats=9, min_time=1.0)
    pot = None if quick else _pot()
    rows: List[Dict] = []
    for label, (heads, side, mside) in SHAPES.items():
        if shapes and label not in shapes:
            continue
        n, m = side * side, mside * mside
        x, ref, v = _inputs(heads, n, m, dtype, device)
        filt = gaussian_filter_2d(side, side, m, sigma=TAU, device=device)
        dy = torch.randn_like(v)
        ctx = dict(device=device, dtype=dtype, kind="ot_attention", n=n, m=m, d=HEAD_DIM, dv=HEAD_DIM)
        methods = _methods(device, ctx, compile_peer=not quick)
        gflop = useful_gflop(BATCH * heads, n, m, HEAD_DIM, ITERS)
        compiled = False
        for nthreads in thread_counts:
            if nthreads is not None:
                torch.set_num_threads(nthreads)
            if progress:
                progress(f"{label} threads {nthreads}")
            fwd, fwd_bwd, compile_s = {}, {}, {}
            for method, _, _, fn in methods:

                def f(fn=fn):
                    with torch.no_grad():
                        return fn(x, ref, v, filt)

                def fb(fn=fn):
                    torch.autograd.grad(fn(x, ref, v, filt), (x, ref, v), dy)

                if method == "naive_compiled" and not compiled:
                    t0 = time.perf_counter()  # first calls: tracing and compiling both graphs
                    fb()
                    f()
                    compile_s[method] = time.perf_counter() - t0
                    compiled = True
                fwd[method], fwd_bwd[method] = f, fb
            if pot is not None and not on_gpu:
                fwd["pot"] = lambda: _pot_forward(pot, x.detach(), ref.detach(), filt)
            t_f, c_f = time_alternating(fwd, **reps)
            t_fb, c_fb = time_alternating(fwd_bwd, **reps)
            entries = [(mt, role, be) for mt, role, be, _ in methods] + ([("pot", "peer", None)] if "pot" in fwd else [])
            for method, role, backend in entries:
                row = dict(shape=label, heads=heads, n=n, m=m, d=HEAD_DIM, iters=ITERS, batch=BATCH,
                           threads=nthreads if nthreads is not None else "", dtype="float32",
                           method=method, role=role, backend=backend, tokens=n, fwd_ms=t_f[method])
                row["fwd_x"] = t_f["naive"] / t_f[method]
                row["gflops"] = gflop / (t_f[method] / 1e3)
                if not on_gpu:
                    row["frac_peak"] = row["gflops"] / (cpu_peak_gflops_per_core() * nthreads)
                if nthreads == 1:
                    row["fwd_cpu_ms"] = c_f[method]
                    row["fwd_x_cpu"] = c_f["naive"] / c_f[method]
                if method in t_fb:
                    row["fwd_bwd_ms"] = t_fb[method]
                    row["fwd_bwd_x"] = t_fb["naive"] / t_fb[method]
                    row["gflops_fwd_bwd"] = 3 * gflop / (t_fb[method] / 1e3)
                    if nthreads == 1:
                        row["fwd_bwd_cpu_ms"] = c_fb[method]
                        row["fwd_bwd_x_cpu"] = c_fb["naive"] / c_fb[method]
                    row["peak_mib"] = peak_memory_mb(fwd_bwd[method], device)
                    row["compile_s"] = compile_s.get(method)
                else:
                    mark_unavailable(row, "POT's Sinkhorn is timed forward only (one problem per call, no autograd)",
                                     "fwd_bwd_ms", "fwd_bwd_x", "peak_mib")
                rows.append(row)
                print(f"{label} t{nthreads} {method}: fwd {row['fwd_ms']:.2f} ms ({row['fwd_x']:.2f}x), "
                      f"fwd+bwd {row.get('fwd_bwd_ms', float('nan')):.2f} ms "
                      f"({row.get('fwd_bwd_x', float('nan')):.2f}x), {row['gflops']:.1f} GFLOP/s", flush=True)
    if not on_gpu:
        torch.set_num_threads(1)
    return rows


def summary(rows: List[Dict], device: torch.device) -> str:
    """The issue's goals per thread count (benchmarks/common.py auto_summary)."""
    return auto_summary(rows, lambda r: r["shape"])


def update_ranking(rows: List[Dict], command: str) -> Dict:
    """measured.json for "auto" (benchmarks/common.py write_ranking)."""
    return write_ranking(MEASURED_JSON, rows, lambda r: sk_backends.shape_class(dict(kind="ot_attention", n=r["n"], m=r["m"])),
                         f"benchmarks/results/bench_sinkhorn.md: `{command}` at {commit()} (fp32, batch {BATCH}, "
                         "one thread; fastest first by the geometric mean of forward and forward+backward times)")


def main() -> None:
    op_bench_main("bench_sinkhorn", run, COLUMNS, __doc__, shapes=list(SHAPES), measured_json=MEASURED_JSON, summary=summary,
                  update_ranking=update_ranking, quick_help="few repeats, one thread, no compile")


if __name__ == "__main__":
    main()
