"""Benchmark: vitattn.group_attention (SReT's group / permuted attention) against the naive
dense code and SDPA, at the SReT-T / SReT-S stage shapes.

Shapes (224^2 input, batch 8 on CPU; d = 32 for SReT-T, 42 for SReT-S; from
vitattn/models/sret.py): stage 1 N = 784 tokens in 8 contiguous groups, and its recursive
pass in 2 groups of a random permutation; stage 2 N = 196 in 4 groups; stage 3 N = 49 in one
group. The qkv and output projections are left out (the same for every method).

Methods, all on the same (B, heads, N, d) q, k, v (fp32):
* naive: the official SReT Group_Attention code: a CPU randperm index, x[:, :, idx] copies,
  (G, n, n) logits by matmul, * scale, softmax, matmul, argsort for the inverse and an
  x[:, :, inverse] copy (role "naive": the baseline of every speed-up);
* sdpa_permuted: index_select copies, F.scaled_dot_product_attention on the (B, heads * G)
  batches of n tokens (views), an inverse index_select copy (the best stock peer);
* vitattn:auto (backend="auto"; the backend it chose is in "backend") and vitattn:<backend>
  for every vitattn backend that can run on the device ("cpu": the C++ kernels, which gather
  and scatter through perm inside; "torch"; on GPU "triton").

Timing: per shape and thread count the methods' calls alternate in one process (a round
calls each method once, in an order shuffled every round: common.time_alternating);
fwd_ms / fwd_bwd_ms are the medians of the wall times (forward under
no_grad; forward+backward = autograd.grad of all of q, k, v), fwd_cpu_ms / fwd_bwd_cpu_ms the
medians of the process CPU time of the same calls (with one thread: the time not lost to
other processes; with two: the CPU work of both). GFLOP/s count the model FLOPs, 2 N n (d + dv)
per (batch, head) forward and three times that for forward+backward (no recomputation);
peak_frac = GFLOP/s / (threads x one core's fp32 peak), the peak measured on the machine
(benchmarks/common.py cpu_peak_gflops_per_core; the header's fp32_peak_per_core). peak_mib: the allocator peak of one forward+backward (benchmarks/common.py
PEAK_MEMORY_METHOD); the C++ kernels' per-thread scratch (packed K^T/V and tiles of one group,
kept between calls, about 0.1-0.6 MiB per thread here) is outside the allocator and not in it.
vs_naive_* / vs_sdpa_*: speed-up (their time / this row's time); speedup_2t: the same
method's 1-thread time / its 2-thread time.

    python benchmarks/bench_group_attention.py                       # CPU: batch 8, 1 and 2 threads
    python benchmarks/bench_group_attention.py --quick               # small batch, few repeats
    python benchmarks/bench_group_attention.py --update-ranking      # also write the "auto" ranking
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (bench_device, cli, commit, cpu_peak_gflops_per_core, peak_memory_mb,  # noqa: E402
                    time_alternating_seq)

import vitattn  # noqa: E402
from vitattn import group_attention  # noqa: E402
from vitattn.ops.group_attention import backends as ga_backends  # noqa: E402
from vitattn.ops.group_attention.op import _context, inverse_permutation, random_permutation  # noqa: E402

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
QUICK_SHAPES = ("SReT-T s1", "SReT-T s1 rec", "SReT-S s2", "SReT-S s3")
COLUMNS = ["shape", "N", "G", "n", "perm", "heads", "d", "batch", "threads", "method", "backend", "fwd_ms",
           "fwd_bwd_ms", "vs_naive_fwd", "vs_naive_fwd_bwd", "vs_sdpa_fwd_bwd", "fwd_gflops", "fwd_bwd_gflops",
           "fwd_peak_frac", "speedup_2t", "peak_mib", "fwd_cpu_ms", "fwd_bwd_cpu_ms"]
MEASURED_JSON = os.path.join(os.path.dirname(ga_backends.__file__), "measured.json")


def naive_group_attention(q, k, v, groups: int, perm_cpu, scale: float):
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


def sdpa_permuted(q, k, v, groups: int, perm, inv, scale: float):
    B, H, N, d = q.shape
    if perm is not None:
        q, k, v = (t.index_select(2, perm) for t in (q, k, v))
    n = N // groups
    # (B, H, N, d) contiguous -> (B, H * G, n, d) is a view
    qg, kg, vg = (t.reshape(B, H * groups, n, -1) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qg, kg, vg, scale=scale).reshape(B, H, N, -1)
    return out.index_select(2, inv) if perm is not None else out


def _methods(q, k, v, G, perm, perm_cpu, inv, scale, device):
    """[(method, role, backend, fn)] for one shape: naive, the peer, auto, each backend."""
    ctx = _context(q, v, G, perm)
    chosen = vitattn.explain("group_attention", q, k, v, G, perm=perm).chosen
    out = [("naive", "naive", None, lambda: naive_group_attention(q, k, v, G, perm_cpu, scale)),
           ("sdpa_permuted", "peer", None, lambda: sdpa_permuted(q, k, v, G, perm, inv, scale)),
           ("vitattn:auto", "auto", chosen, lambda: group_attention(q, k, v, G, perm=perm, scale=scale))]
    for name in ga_backends.NAMES[1:]:
        if ga_backends.dispatcher.reason(name, ctx, auto=True) is None:
            out.append((f"vitattn:{name}", "backend", name,
                        lambda _b=name: group_attention(q, k, v, G, perm=perm, scale=scale, backend=_b)))
    return out


def run(quick: bool, device, progress: Optional[Callable[[str], None]] = None,
        threads: Sequence[int] = (1, 2)) -> List[Dict]:
    device = bench_device(device)
    on_gpu = device.type == "cuda"
    batch = (32 if quick else 256) if on_gpu else (2 if quick else 8)
    dtypes = [torch.float16, torch.float32] if on_gpu else [torch.float32]
    names = list(SHAPES) if (on_gpu or not quick) else list(QUICK_SHAPES)
    thread_counts = [None] if on_gpu else ([1] if quick else list(threads))
    rounds = 3 if quick else 9
    rows: List[Dict] = []
    before = torch.get_num_threads()
    try:
        for name in names:
            N, H, d, G, permuted = SHAPES[name]
            n = N // G
            for dtype in dtypes:
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(batch, H, N, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
                           for _ in range(3))
                dy = torch.randn(batch, H, N, d, generator=g).to(device=device, dtype=dtype)
                scale = d ** -0.5
                perm = random_permutation(N, device=device, generator=torch.Generator(device=device).manual_seed(1)) \
                    if permuted else None
                inv = inverse_permutation(perm) if permuted else None
                perm_cpu = perm.cpu() if permuted else None
                flops = 2.0 * batch * H * N * n * (d + d)
                per_method: Dict[str, Dict[int, Dict]] = {}
                for nt in thread_counts:
                    if nt is not None:
                        torch.set_num_threads(nt)
                    if progress is not None:
                        progress(f"{name} {str(dtype)[6:]}" + (f" {nt}t" if nt else ""))
                    methods = _methods(q, k, v, G, perm, perm_cpu, inv, scale, device)

                    def fwd_of(fn):
                        def fwd():
                            with torch.no_grad():
                                return fn()
                        return fwd

                    def fwd_bwd_of(fn):
                        return lambda: torch.autograd.grad(fn(), (q, k, v), dy)

                    fwd_ms, fwd_cpu = time_alternating_seq([fwd_of(m[3]) for m in methods], device, rounds)
                    fb_ms, fb_cpu = time_alternating_seq([fwd_bwd_of(m[3]) for m in methods], device, rounds)
                    block = []
                    for i, (method, role, backend, fn) in enumerate(methods):
                        row = dict(op="group_attention", shape=name, N=N, G=G, n=n, perm=permuted, heads=H, d=d,
                                   batch=batch, tokens=N, dtype=str(dtype).replace("torch.", ""),
                                   threads=nt if nt is not None else torch.get_num_threads(), method=method, role=role, backend=backend,
                                   fwd_ms=fwd_ms[i], fwd_bwd_ms=fb_ms[i])
                        row["fwd_gflops"] = flops / fwd_ms[i] / 1e6
                        row["fwd_bwd_gflops"] = 3 * flops / fb_ms[i] / 1e6
                        row["gflops"] = row["fwd_gflops"]
                        if not on_gpu:
                            row["fwd_peak_frac"] = row["fwd_gflops"] / (nt * cpu_peak_gflops_per_core())
                            row["fwd_bwd_peak_frac"] = row["fwd_bwd_gflops"] / (nt * cpu_peak_gflops_per_core())
                            row["fwd_cpu_ms"], row["fwd_bwd_cpu_ms"] = fwd_cpu[i], fb_cpu[i]
                        row["peak_mib"] = peak_memory_mb(fwd_bwd_of(fn), device)
                        block.append(row)
                        per_method.setdefault(method, {})[nt] = row
                    base = {r["method"]: r for r in block}
                    for row in block:
                        for key, ref in (("naive", "naive"), ("sdpa", "sdpa_permuted")):
                            for m in ("fwd", "fwd_bwd"):
                                row[f"vs_{key}_{m}"] = base[ref][f"{m}_ms"] / row[f"{m}_ms"]
                        if nt is not None and nt > 1 and 1 in per_method.get(row["method"], {}):
                            one = per_method[row["method"]][1]
                            row["speedup_2t"] = one["fwd_ms"] / row["fwd_ms"]
                            row["speedup_2t_fwd_bwd"] = one["fwd_bwd_ms"] / row["fwd_bwd_ms"]
                        rows.append(row)
                        print(f"{name} {row['dtype']} {row['threads']}t {row['method']}: fwd {row['fwd_ms']:.2f} ms "
                              f"(x{row['vs_naive_fwd']:.2f} naive), fwd+bwd {row['fwd_bwd_ms']:.2f} ms "
                              f"(x{row['vs_naive_fwd_bwd']:.2f})", file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


def summary(rows: List[Dict], device: torch.device) -> str:
    """Geometric means and ranges of vitattn:auto's speed-ups over the naive code, per thread count."""
    out = ["", "## vitattn:auto against the naive code (speed-up = naive time / auto time)", ""]
    out.append("| threads | dtype | fwd geomean | fwd min | fwd+bwd geomean | fwd+bwd min | auto's backends |")
    out.append("|---|---|---|---|---|---|---|")
    keys = sorted({(r["threads"], r["dtype"]) for r in rows})
    for nt, dt in keys:
        auto = [r for r in rows if r["role"] == "auto" and r["threads"] == nt and r["dtype"] == dt]
        if not auto:
            continue
        gm = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs))
        f = [r["vs_naive_fwd"] for r in auto]
        b = [r["vs_naive_fwd_bwd"] for r in auto]
        used = ", ".join(sorted({str(r["backend"]) for r in auto}))
        out.append(f"| {nt} | {dt} | {gm(f):.2f} | {min(f):.2f} | {gm(b):.2f} | {min(b):.2f} | {used} |")
    two = [r for r in rows if r["role"] == "auto" and r.get("speedup_2t")]
    if two:
        s = [r["speedup_2t"] for r in two]
        sb = [r["speedup_2t_fwd_bwd"] for r in two]
        out.append("")
        out.append(f"2 threads against 1 (vitattn:auto): forward x{min(s):.2f} to x{max(s):.2f}, "
                   f"forward+backward x{min(sb):.2f} to x{max(sb):.2f}")
    return "\n".join(out) + "\n"


def update_ranking(rows: List[Dict], device: torch.device, command: str) -> Dict:
    """measured.json for this device type: per shape class the vitattn backends ordered by their
    forward+backward time (mean ratio to the fastest over the class's shapes; single-threaded
    rows where there are any)."""
    mine = [r for r in rows if r["role"] == "backend"]
    if any(r["threads"] == 1 for r in mine):
        mine = [r for r in mine if r["threads"] == 1]
    by_shape: Dict[tuple, List[Dict]] = {}
    for r in mine:
        by_shape.setdefault((r["shape"], r["dtype"]), []).append(r)
    ratios: Dict[str, Dict[str, List[float]]] = {}
    for members in by_shape.values():
        r0 = members[0]
        ctx = dict(group_size=r0["n"], permuted=r0["perm"])
        cls = ga_backends.shape_class(ctx)
        best = min(r["fwd_bwd_ms"] for r in members)
        for r in members:
            ratios.setdefault(cls, {}).setdefault(r["backend"], []).append(r["fwd_bwd_ms"] / best)
    table = {cls: sorted(per, key=lambda b: sum(per[b]) / len(per[b])) for cls, per in sorted(ratios.items())}
    data = {}
    if os.path.exists(MEASURED_JSON):
        with open(MEASURED_JSON) as f:
            data = json.load(f)
    data[device.type] = table
    sources = data.get("source") if isinstance(data.get("source"), dict) else {}
    sources[device.type] = (f"benchmarks/results/bench_group_attention.json: `{command}` at commit {commit()}, "
                            "vitattn backends ordered by forward+backward median time per shape class "
                            "(single-threaded rows)")
    data["source"] = sources
    with open(MEASURED_JSON, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    return data


def main() -> None:
    state: Dict[str, object] = {}

    def options(ap):
        ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (CPU)")
        ap.add_argument("--update-ranking", action="store_true",
                        help=f"write the per-shape-class backend order of this device type to {MEASURED_JSON}")

    def run_kwargs(args):
        state["update"] = args.update_ranking
        return {"threads": args.threads}

    def appendix(rows, device):
        text = summary(rows, device)
        if state.get("update"):
            cmd = "python benchmarks/bench_group_attention.py" + " ".join(
                a for a in [""] + sys.argv[1:])
            data = update_ranking(rows, device, cmd.strip())
            text += f"\nauto ranking written to vitattn/ops/group_attention/measured.json: {json.dumps(data[device.type])}\n"
        return text

    cli("bench_group_attention", run, COLUMNS, __doc__, quick_help="small batch, few repeats (CPU-friendly)",
        options=options, run_kwargs=run_kwargs, appendix=appendix)


if __name__ == "__main__":
    main()
