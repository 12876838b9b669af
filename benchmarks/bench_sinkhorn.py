"""Benchmark: vitattn.ot_attention (Sinkhorn OT token mixer) against the dense reference loop,
eager and torch.compile'd.

Grid of issue 3: problems P = B*heads in {64, 512} (B = P/8, heads = 8), tokens n in
{49, 196, 784, 3136}, references m in {16, 64}, iters in {10, 30}, head dim d = dv = 64.
The reference is vitattn.reference.sinkhorn.ot_attention: one logsumexp pass per
half-iteration, autograd through every iteration.

Columns: fwd_ms and fwd_bwd_ms (median), speedup (fwd+bwd against the eager reference on
the same row), peak_mib (peak extra memory of one forward+backward), saved_mib (what autograd
keeps for backward, the inputs excluded). A reference that runs out of memory gets "OOM".

    python benchmarks/bench_sinkhorn.py            # full grid (GPU)
    python benchmarks/bench_sinkhorn.py --quick    # a few small shapes, CPU-friendly (< 1 min);
                                                   # on CPU without the compiled reference
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_device, cli, peak_memory_mb, saved_bytes, time_fn  # noqa: E402

import importlib  # noqa: E402

# by import path: vitattn.sinkhorn may be the exported function rather than the module
sk_mod = importlib.import_module("vitattn.ops.sinkhorn.op")
ref_mod = importlib.import_module("vitattn.ops.sinkhorn.reference")

COLUMNS = ["problems", "n", "m", "iters", "d", "dtype", "impl", "fwd_ms", "fwd_bwd_ms", "speedup", "peak_mib",
           "saved_mib"]
HEADS = 8


def saved_mib(fn, inputs) -> float:
    """MiB of the distinct storages autograd saves during fn(), the inputs' own storages excluded."""
    return saved_bytes(fn, inputs) / 2**20


def _grid(quick: bool, on_gpu: bool):
    if not quick:
        return [(p, n, m, it) for p in (64, 512) for n in (49, 196, 784, 3136) for m in (16, 64) for it in (10, 30)]
    if on_gpu:
        return [(64, 196, 16, 10), (64, 3136, 64, 10)]
    return [(8, 49, 16, 10), (8, 196, 16, 10)]


def _impls(device: torch.device, dtype: torch.dtype, n: int, m: int, d: int, with_compiled: bool):
    ref = lambda x, r, v, eps, iters: ref_mod.ot_attention(x, r, v, eps=eps, iters=iters)
    out = [("reference eager", ref)]
    if with_compiled:
        out.append(("reference compiled", torch.compile(ref, dynamic=False)))
    ctx = dict(device=device, dtype=dtype, n=n, m=m, d=d, dv=d)
    for backend in ("triton", "torch"):
        if sk_mod.dispatcher.reason(backend, ctx, auto=True) is None:
            out.append((f"vitattn {backend}", lambda x, r, v, eps, iters, _b=backend:
                        sk_mod.ot_attention(x, r, v, eps=eps, iters=iters, backend=_b)))
    return out


def run(quick: bool, device) -> List[Dict]:
    device = bench_device(device)
    on_gpu = device.type == "cuda"
    d = 64
    dtypes = [torch.float16, torch.float32] if on_gpu and not quick else [torch.float32]
    reps = dict(warmup=1, repeats=3) if quick else dict(warmup=3, repeats=10, min_time=0.2)
    rows: List[Dict] = []
    for problems, n, m, iters in _grid(quick, on_gpu):
        for dtype in dtypes:
            g = torch.Generator(device="cpu").manual_seed(0)
            B = problems // HEADS
            mk = lambda *s: (torch.randn(*s, generator=g) * s[-1] ** -0.25).to(device=device, dtype=dtype)
            x = mk(B, HEADS, n, d).requires_grad_()
            r = mk(HEADS, m, d).requires_grad_()
            v = mk(B, HEADS, n, d).requires_grad_()
            dy = torch.randn(B, HEADS, n, d, generator=g).to(device=device, dtype=dtype)
            eps = 0.1
            # inductor needs minutes to compile the unrolled loop on this shared 2-core CPU:
            # the quick CPU run leaves the compiled reference out
            with_compiled = on_gpu or not quick
            base = None
            for impl, fn in _impls(device, dtype, n, m, d, with_compiled):
                row = dict(problems=problems, n=n, m=m, iters=iters, d=d, dtype=str(dtype).replace("torch.", ""),
                           impl=impl)

                def fwd():
                    with torch.no_grad():
                        return fn(x, r, v, eps, iters)

                def fwd_bwd():
                    y = fn(x, r, v, eps, iters)
                    torch.autograd.grad(y, (x, r, v), dy)

                try:
                    row["fwd_ms"] = time_fn(fwd, device, **reps)
                    row["fwd_bwd_ms"] = time_fn(fwd_bwd, device, **reps)
                    row["peak_mib"] = peak_memory_mb(fwd_bwd, device)
                    if impl != "reference compiled":
                        row["saved_mib"] = saved_mib(lambda: fn(x, r, v, eps, iters), (x, r, v))
                except torch.OutOfMemoryError:
                    row.update(fwd_ms="OOM", fwd_bwd_ms="OOM")
                    if on_gpu:
                        torch.cuda.empty_cache()
                if impl == "reference eager" and isinstance(row.get("fwd_bwd_ms"), float):
                    base = row["fwd_bwd_ms"]
                if base and isinstance(row.get("fwd_bwd_ms"), float):
                    row["speedup"] = base / row["fwd_bwd_ms"]
                rows.append(row)
                print(f"P={problems} n={n} m={m} iters={iters} {row['dtype']} {impl}: fwd {row.get('fwd_ms')} ms, "
                      f"fwd+bwd {row.get('fwd_bwd_ms')} ms, saved {row.get('saved_mib')} MiB", flush=True)
            if on_gpu:
                torch._dynamo.reset()  # fresh compile cache per shape (no recompile limit)
    return rows


def main() -> None:
    cli("bench_sinkhorn", run, COLUMNS, __doc__, quick_help="a few small shapes, few repeats (CPU-friendly)")


if __name__ == "__main__":
    main()
