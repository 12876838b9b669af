"""MaSA on CPU: the C++ "cpu" backend against the PyTorch "torch" backend, in one run.

    python csrc/tools/bench_masa_cpu.py [--quick] [--threads N]

Forward and forward+backward times, their ratio (torch / cpu) and the peak extra memory
of one forward. The two backends are timed alternately call by call (so load from other
processes hits both alike); each time is the median over the rounds, and the ratio is
taken of the medians. Writes benchmarks/results/masa_cpu_vs_torch.{md,json}. Its verdict
is what vitattn/_extension.py's _cpu_auto_reason encodes ("auto" prefers "cpu" only
where it measured faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import vitattn  # noqa: E402
import vitattn._extension  # noqa: E402,F401  (registers "cpu")
from benchmarks.common import peak_memory_mb, write_results  # noqa: E402

COLUMNS = ["form", "B", "heads", "H", "W", "d", "dtype", "torch_fwd_ms", "cpu_fwd_ms", "fwd_speedup",
           "torch_fwd_bwd_ms", "cpu_fwd_bwd_ms", "fwd_bwd_speedup", "torch_fwd_peak_mib", "cpu_fwd_peak_mib"]


def cases(quick: bool):
    full = [(1, 4, 28, 28, 32), (1, 4, 56, 56, 16), (1, 4, 56, 56, 32), (1, 8, 14, 14, 32), (1, 16, 7, 7, 32),
            (8, 8, 14, 14, 32)]
    dec = [(1, 4, 56, 56, 16), (1, 4, 28, 28, 32), (1, 8, 14, 14, 32), (8, 16, 7, 7, 32)]
    if quick:
        full, dec = full[:1], dec[:1]
    return [("full", c) for c in full] + [("decomposed", c) for c in dec]


def paired(fns, rounds: int):
    """Median ms of each fn, calling them alternately (one warm-up call each first)."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for f, t in zip(fns, times):
            t0 = time.perf_counter()
            f()
            t.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def run(quick: bool = False, dtype=torch.float32):
    dev = torch.device("cpu")
    rows = []
    for form, (B, heads, H, W, d) in cases(quick):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, heads, H, W, d, generator=g).to(dtype) for _ in range(3))
        gamma = 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float32) / heads)  # RMT's per-head decays
        dec = form == "decomposed"
        row = dict(form=form, B=B, heads=heads, H=H, W=W, d=d, dtype=str(dtype).replace("torch.", ""))
        rounds = 3 if (H * W >= 3136 and not dec) else 9
        fwds, fwd_bwds = [], []
        for name in ("torch", "cpu"):
            fwds.append(lambda name=name: vitattn.masa(q, k, v, gamma, decomposed=dec, backend=name))
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]

            def fwd_bwd(name=name, leaves=leaves):
                out = vitattn.masa(*leaves, gamma, decomposed=dec, backend=name)
                out.backward(torch.ones_like(out))

            fwd_bwds.append(fwd_bwd)
        with torch.no_grad():
            row["torch_fwd_ms"], row["cpu_fwd_ms"] = paired(fwds, rounds)
            row["torch_fwd_peak_mib"] = peak_memory_mb(fwds[0], dev)
            row["cpu_fwd_peak_mib"] = peak_memory_mb(fwds[1], dev)
        row["torch_fwd_bwd_ms"], row["cpu_fwd_bwd_ms"] = paired(fwd_bwds, max(3, rounds // 2))
        row["fwd_speedup"] = row["torch_fwd_ms"] / row["cpu_fwd_ms"]
        row["fwd_bwd_speedup"] = row["torch_fwd_bwd_ms"] / row["cpu_fwd_bwd_ms"]
        print({c: row[c] for c in COLUMNS}, flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.quick)
    cmd = "python csrc/tools/bench_masa_cpu.py" + (" --quick" if args.quick else "") + (
        f" --threads {args.threads}" if args.threads else "")
    md = write_results("masa_cpu_vs_torch", rows, COLUMNS, torch.device("cpu"), cmd, args.out_dir)
    print(md)
