"""Benchmark: vitattn.depthwise_conv2d_nhwc against the code RMT runs for its depthwise
convolutions (nn.Conv2d on the channels-last view of (B, H, W, C) activations).

Shapes: every distinct depthwise convolution of RMT-T and RMT-S at 224^2, batch 8
(vitattn/models/rmt.py): the positional encoding (3x3 on embed_dim), LePE (5x5 on
embed_dim) and the FFN's local mixing (3x3 on the FFN width, mlp ratio 3 for RMT-T, 4 for
RMT-S), per stage: 56^2, 28^2, 14^2, 7^2 with 64/128/256/512 channels.

Methods (role in the report):
* "vitattn:auto" (auto): backend="auto"; "backend" names what it chose;
* "vitattn:<backend>" (backend): every backend that can run here by name (cpu, torch);
* "naive": F.conv2d on x.permute(0, 3, 1, 2) and back, as the official DWConv2d does (on the
  CPU oneDNN's channels-last depthwise kernel, its backward through autograd).

Every method of one shape and thread count is timed in one process with the calls alternating
(the order shuffled every round: common.time_alternating); times are medians of wall-clock
calls. gflops counts 2 * taps multiply-adds per output element
(the backward twice the forward); the op is memory-bound at these sizes, so gbps (the bytes of
x and y, forward) is the number to hold against the machine's memory bandwidth; frac_peak
divides gflops by one core's measured fp32 peak times the threads (header:
fp32_peak_per_core). fwd_x, fwd_bwd_x: speed-up over the naive row of the same shape and threads.
peak_mib: peak memory allocated through PyTorch's CPU allocator during one forward+backward.

    python benchmarks/bench_depthwise_conv.py                    # full (CPU: 1 and 2 threads)
    python benchmarks/bench_depthwise_conv.py --quick            # few repeats, one thread
    python benchmarks/bench_depthwise_conv.py --update-ranking   # and rewrite vitattn/ops/depthwise_conv/measured.json
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (auto_summary, bench_device, commit, cpu_peak_gflops_per_core, op_bench_main,  # noqa: E402
                    peak_memory_mb, time_alternating, write_ranking)

from vitattn import depthwise_conv2d_nhwc  # noqa: E402
from vitattn.ops.depthwise_conv import backends as dc_backends  # noqa: E402

# label: (H = W, C, k) -- the distinct depthwise convolutions of RMT-T / RMT-S at 224^2
SHAPES = {
    "s1 pos/LePE 3x3": (56, 64, 3),
    "s1 LePE 5x5": (56, 64, 5),
    "s1 FFN-T 3x3": (56, 192, 3),
    "s1 FFN-S 3x3": (56, 256, 3),
    "s2 LePE 5x5": (28, 128, 5),
    "s2 FFN-T 3x3": (28, 384, 3),
    "s3 LePE 5x5": (14, 256, 5),
    "s3 FFN-T 3x3": (14, 768, 3),
    "s4 LePE 5x5": (7, 512, 5),
    "s4 FFN-T 3x3": (7, 1536, 3),
}
BATCH = 8
MEASURED_JSON = os.path.join(os.path.dirname(os.path.abspath(dc_backends.__file__)), "measured.json")
COLUMNS = ["shape", "HW", "C", "k", "batch", "threads", "method", "backend", "fwd_ms", "fwd_bwd_ms", "fwd_x",
           "fwd_bwd_x", "gflops", "gbps", "frac_peak", "peak_mib"]


def official(x, w, b, pad: int):
    """RMT's DWConv2d.forward: nn.Conv2d on the channels-last view."""
    return F.conv2d(x.permute(0, 3, 1, 2), w, b, 1, pad, 1, x.shape[-1]).permute(0, 2, 3, 1)


def run(quick: bool, device, threads: Optional[List[int]] = None, shapes: Optional[List[str]] = None,
        progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    device = bench_device(device)
    on_gpu = device.type == "cuda"
    thread_counts = [None] if on_gpu else (threads or ([1] if quick else [1, 2]))
    reps = dict(warmup=1, repeats=3, min_time=0.0) if quick else dict(warmup=2, repeats=9, min_time=1.0)
    rows: List[Dict] = []
    for label, (hw, C, k) in SHAPES.items():
        if shapes and label not in shapes:
            continue
        g = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, hw, hw, C, generator=g).to(device).requires_grad_()
        w = (torch.randn(C, 1, k, k, generator=g) / k).to(device).requires_grad_()
        b = torch.randn(C, generator=g).to(device).requires_grad_()
        dy = torch.randn(BATCH, hw, hw, C, generator=g).to(device)
        ctx = dict(device=device, dtype=torch.float32, C=C, kh=k, kw=k, HW=hw * hw, grad=False)
        chosen = dc_backends.dispatcher.explain(ctx).chosen
        # "auto" may choose per call: its forward is timed under no_grad (an inference call), its
        # forward+backward with gradients (a training call); "backend" names the inference choice
        methods = [("vitattn:auto", "auto", chosen, lambda *a: depthwise_conv2d_nhwc(*a))]
        for name in dc_backends.NAMES[1:]:
            if dc_backends.dispatcher.reason(name, ctx, auto=False) is None:
                methods.append((f"vitattn:{name}", "backend", name,
                                lambda *a, _b=name: depthwise_conv2d_nhwc(*a, backend=_b)))
        methods.append(("naive", "naive", None, official))
        flop = 2 * BATCH * hw * hw * C * k * k
        moved = 2 * BATCH * hw * hw * C * 4
        for nthreads in thread_counts:
            if nthreads is not None:
                torch.set_num_threads(nthreads)
            if progress:
                progress(f"{label} threads {nthreads}")
            fwd, fwd_bwd = {}, {}
            for method, _, _, fn in methods:
                def f(fn=fn):
                    with torch.no_grad():
                        return fn(x, w, b, k // 2)

                def fb(fn=fn):
                    torch.autograd.grad(fn(x, w, b, k // 2), [x, w, b], dy)

                fwd[method], fwd_bwd[method] = f, fb
            t_f, _ = time_alternating(fwd, **reps)
            t_fb, _ = time_alternating(fwd_bwd, **reps)
            for method, role, backend, _ in methods:
                row = dict(shape=label, HW=hw, C=C, k=k, batch=BATCH, threads=nthreads if nthreads is not None else "",
                           method=method, role=role, backend=backend, tokens=hw * hw, fwd_ms=t_f[method],
                           fwd_bwd_ms=t_fb[method])
                row["fwd_x"] = t_f["naive"] / t_f[method]
                row["fwd_bwd_x"] = t_fb["naive"] / t_fb[method]
                row["gflops"] = flop / 1e9 / (t_f[method] / 1e3)
                row["gbps"] = moved / 1e9 / (t_f[method] / 1e3)
                if not on_gpu:
                    row["frac_peak"] = row["gflops"] / (cpu_peak_gflops_per_core() * nthreads)
                row["peak_mib"] = peak_memory_mb(fwd_bwd[method], device)
                rows.append(row)
                print(f"{label} t{nthreads} {method}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_x']:.2f}x), "
                      f"fwd+bwd {row['fwd_bwd_ms']:.3f} ms ({row['fwd_bwd_x']:.2f}x), {row['gbps']:.1f} GB/s",
                      flush=True)
    if not on_gpu:
        torch.set_num_threads(1)
    return rows


def summary(rows: List[Dict], device: torch.device) -> str:
    return auto_summary(rows, lambda r: r["shape"])


def update_ranking(rows: List[Dict], command: str) -> Dict:
    """measured.json for "auto", ranked separately for inference (forward time) and training
    (forward+backward time) calls: each row enters write_ranking twice, once per mode, with
    both its times set to that mode's time (write_ranking ranks by sqrt(fwd_ms * fwd_bwd_ms))."""
    per_mode = []
    for r in rows:
        for grad, t in ((False, r["fwd_ms"]), (True, r["fwd_bwd_ms"])):
            per_mode.append(dict(r, fwd_ms=t, fwd_bwd_ms=t, grad=grad))
    return write_ranking(MEASURED_JSON, per_mode,
                         lambda r: dc_backends.shape_class(dict(kh=r["k"], kw=r["k"], HW=r["HW"] ** 2, C=r["C"],
                                                                     grad=r["grad"])),
                         f"benchmarks/results/bench_depthwise_conv.md: `{command}` at {commit()} (fp32, batch "
                         f"{BATCH}, one thread; per class, fastest first by the geometric mean of the forward "
                         "time (infer) or the forward+backward time (train))")


def main() -> None:
    op_bench_main("bench_depthwise_conv", run, COLUMNS, __doc__, shapes=list(SHAPES), measured_json=MEASURED_JSON,
                  summary=summary, update_ranking=update_ranking, quick_help="few repeats, one thread")


if __name__ == "__main__":
    main()
