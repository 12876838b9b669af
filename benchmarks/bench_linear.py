"""Benchmark: the models' linear layers, F.linear (MKL's sgemm) against oneDNN (vitattn.nn.linear).

Why it exists: vitattn/nn/_linear.py routes the models' fp32 CPU linear layers through oneDNN
where ``cpu_linear_choice()`` says it is faster; this is the measurement behind that rule.

Shapes: the token projections of the four benchmarked models at 224x224, batch 8 (M = tokens
x batch rows, K inputs, N outputs), plus two small calls around MIN_MACS:
  RMT-T s1 qk / fc1 / fc2   M 25088, 64 -> 128, 64 -> 192, 192 -> 64
  RMT-T s3 fc1 / fc2        M 1568, 256 -> 768, 768 -> 256
  SReT-T s1 qkv             M 6272, 64 -> 192
  DynaMixer-S s1 proj / fc1 M 8192, 192 -> 192, 192 -> 576
  small                     M 8, 384 -> 96 (below MIN_MACS: F.linear either way), M 256, 64 -> 64

Methods, on the same fp32 x, weight, bias: ``F.linear`` and ``onednn`` (vitattn.nn.linear with
VITATTN_CPU_LINEAR=onednn; calls under MIN_MACS run F.linear whatever the setting). Forward
under no_grad, forward+backward = autograd.grad of x, weight and bias. Per shape and thread
count the calls alternate in one process; times are medians (common.time_alternating).
GFLOP/s: 2 M K N forward, three times that forward+backward; peak_frac divides by the threads
times one core's fp32 peak as measured on the machine (common.cpu_peak_gflops_per_core, in the
header). fwd_x / fwd_bwd_x: F.linear's time over this row's.

    python benchmarks/bench_linear.py            # 1 and 2 threads
    python benchmarks/bench_linear.py --quick    # 1 thread, fewer repeats
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cli, cpu_peak_gflops_per_core, environ, time_alternating  # noqa: E402

from vitattn.nn import _linear  # noqa: E402

COLUMNS = ["shape", "M", "K", "N", "threads", "method", "fwd_ms", "fwd_bwd_ms", "fwd_x", "fwd_bwd_x", "fwd_gflops",
           "fwd_peak_frac", "fwd_bwd_gflops"]
SHAPES = {
    "RMT-T s1 qk": (25088, 64, 128),
    "RMT-T s1 fc1": (25088, 64, 192),
    "RMT-T s1 fc2": (25088, 192, 64),
    "RMT-T s3 fc1": (1568, 256, 768),
    "RMT-T s3 fc2": (1568, 768, 256),
    "SReT-T s1 qkv": (6272, 64, 192),
    "DynaMixer-S s1 proj": (8192, 192, 192),
    "DynaMixer-S s1 fc1": (8192, 192, 576),
    "small 8x384x96": (8, 384, 96),
    "small 256x64x64": (256, 64, 64),
}


def _with_onednn(fn):
    """fn called with VITATTN_CPU_LINEAR=onednn (F.linear ignores it: both methods pay the same)."""
    def call():
        with environ({"VITATTN_CPU_LINEAR": "onednn"}):
            return fn()
    return call


def run(quick: bool, device: torch.device) -> List[Dict]:
    if device.type != "cpu":
        raise SystemExit("bench_linear measures the CPU GEMM choice only (--device cpu)")
    missing = _linear._onednn_missing()
    if missing:
        raise SystemExit(f"bench_linear: oneDNN cannot run here: {missing}")
    rows: List[Dict] = []
    for threads in ([1] if quick else [1, 2]):
        torch.set_num_threads(threads)
        for name, (M, K, N) in SHAPES.items():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(M, K, generator=g)
            w = torch.randn(N, K, generator=g) * K ** -0.5
            b = torch.randn(N, generator=g)
            xg, wg, bg = (t.clone().requires_grad_() for t in (x, w, b))
            dy = torch.randn(M, N, generator=g)

            def fwd(f):
                def call():
                    with torch.no_grad():
                        return f(x, w, b)
                return call

            def fwd_bwd(f):
                return lambda: torch.autograd.grad(f(xg, wg, bg), (xg, wg, bg), dy)

            methods = {"F.linear": F.linear, "onednn": _linear.linear}
            calls_f = {m: _with_onednn(fwd(f)) for m, f in methods.items()}
            calls_b = {m: _with_onednn(fwd_bwd(f)) for m, f in methods.items()}
            repeats, min_time = (5, 0.2) if quick else (15, 1.0)
            tf, _ = time_alternating(calls_f, warmup=2, repeats=repeats, min_time=min_time)
            tb, _ = time_alternating(calls_b, warmup=2, repeats=repeats, min_time=min_time)
            flops = 2.0 * M * K * N
            for m in methods:
                row = dict(shape=name, M=M, K=K, N=N, threads=threads, method=m, dtype="float32",
                           role="naive" if m == "F.linear" else "backend",
                           fwd_ms=tf[m], fwd_bwd_ms=tb[m], fwd_x=tf["F.linear"] / tf[m],
                           fwd_bwd_x=tb["F.linear"] / tb[m], fwd_gflops=flops / tf[m] * 1e-6,
                           fwd_bwd_gflops=3 * flops / tb[m] * 1e-6)
                row["fwd_peak_frac"] = row["fwd_gflops"] / (threads * cpu_peak_gflops_per_core())
                rows.append(row)
                print(f"{name} t{threads} {m}: fwd {tf[m]:.3f} ms ({row['fwd_gflops']:.0f} GFLOP/s), "
                      f"fwd+bwd {tb[m]:.3f} ms", file=sys.stderr, flush=True)
    return rows


def appendix(rows: List[Dict], device: torch.device) -> str:
    name, why = _linear.cpu_linear_choice()
    return (f"\nvitattn.nn.linear on this machine (VITATTN_CPU_LINEAR unset or as set): {name} -- {why}; "
            f"calls under {_linear.MIN_MACS} multiply-adds run F.linear.\n")


if __name__ == "__main__":
    cli("bench_linear", run, COLUMNS, __doc__, quick_help="one thread, fewer repeats", appendix=appendix)
