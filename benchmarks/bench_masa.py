"""Benchmark: vitattn.masa (RMT's Manhattan self-attention) against the naive dense code,
SDPA and FlexAttention, at the RMT-S stage shapes.

Shapes (224^2 input, batch 8 on CPU; RMT-S: embed dims 64/128/256/512, heads 4/4/8/16,
stages 1-3 decomposed, stage 4 full), plus a full-form 28 x 28 grid and the detection
backbone's stage 4 (800 x 1344 input: a 25 x 42 grid):
  RMT-S s1   decomposed 56 x 56, B 8, 4 heads, d 16
  RMT-S s2   decomposed 28 x 28, B 8, 4 heads, d 32
  RMT-S s3   decomposed and full 14 x 14, B 8, 8 heads, d 32
  RMT-S s4   full 7 x 7, B 8, 16 heads, d 32
  full 28    full 28 x 28, B 2, 8 heads, d 32
  det s4     full 25 x 42, B 1, 16 heads, d 32

Methods, all on the same (B, heads, H, W, d) q, k, v (fp32 on CPU) and per-head gamma:
* rmt_reference (role "naive", the baseline of every speed-up): the official RMT code's
  math -- the (heads, N, N) decay mask materialised, logits = q k^T + mask, softmax, @ v (for
  the decomposed form along W, then along H over the result);
* sdpa_float_mask (peer): F.scaled_dot_product_attention with that float mask;
* sdpa_no_bias (bound): SDPA without any bias (the same passes, no decay): PyTorch's CPU flash
  kernel, the floor for what the decay may cost;
* flex_attention_compiled (peer): torch.compile(flex_attention) with the Manhattan score_mod,
  forward only on CPU (PyTorch has no CPU backward for it: n/a with the reason);
* vitattn:auto (backend="auto", the backend it chose in "backend") and vitattn:<backend> for
  each vitattn backend that runs on the device ("cpu": the C++ kernels; "torch").

Timing: per shape and thread count the methods' calls alternate in one process (a round
calls each method once, in an order shuffled every round: common.time_alternating);
fwd_ms / fwd_bwd_ms are the medians of the wall times (forward under
no_grad; forward+backward = autograd.grad of q, k, v), fwd_cpu_ms / fwd_bwd_cpu_ms the medians
of the process CPU time of the same calls. GFLOP/s count the model FLOPs, 2 N_keys (d + dv) per
query row and pass, three times that for forward+backward; peak_frac = GFLOP/s / (threads x
one core's fp32 peak), the peak measured on the machine (benchmarks/common.py
cpu_peak_gflops_per_core; the header's fp32_peak_per_core).
fwd_peak_mib / peak_mib: allocator peak of one forward / forward+backward (benchmarks/common.py
PEAK_MEMORY_METHOD). vs_naive_* / vs_sdpa_* / vs_nobias_*: that method's time / this row's time;
speedup_2t: the same method's 1-thread time / its 2-thread time.

    python benchmarks/bench_masa.py                      # CPU: batch 8, 1 and 2 threads
    python benchmarks/bench_masa.py --quick              # small batch, few repeats
    python benchmarks/bench_masa.py --update-ranking     # also write vitattn/ops/masa/measured.json
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
from common import (bench_device, cli, commit, cpu_peak_gflops_per_core, mark_unavailable,  # noqa: E402
                    peak_memory_mb, time_alternating_seq)

import vitattn  # noqa: E402
from vitattn.ops.masa import backends as masa_backends  # noqa: E402
from vitattn.ops.masa.reference import axis_distance, manhattan_distance  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
COLUMNS = ["shape", "form", "B", "heads", "H", "W", "d", "threads", "method", "backend", "fwd_ms", "fwd_bwd_ms",
           "vs_naive_fwd", "vs_naive_fwd_bwd", "vs_nobias_fwd", "fwd_gflops", "fwd_peak_frac", "fwd_bwd_gflops",
           "speedup_2t", "fwd_peak_mib", "peak_mib", "fwd_cpu_ms", "fwd_bwd_cpu_ms"]
MEASURED_JSON = os.path.join(os.path.dirname(masa_backends.__file__), "measured.json")

# name: (form, B, heads, H, W, d) on CPU
CPU_SHAPES = {
    "RMT-S s1": ("decomposed", 8, 4, 56, 56, 16),
    "RMT-S s2": ("decomposed", 8, 4, 28, 28, 32),
    "RMT-S s3": ("decomposed", 8, 8, 14, 14, 32),
    "RMT-S s3 full": ("full", 8, 8, 14, 14, 32),
    "RMT-S s4": ("full", 8, 16, 7, 7, 32),
    "full 28": ("full", 2, 8, 28, 28, 32),
    "det s4": ("full", 1, 16, 25, 42, 32),
}
# two sizes per form, so that the report's plots draw lines
QUICK_CPU = {"RMT-S s2": ("decomposed", 2, 4, 28, 28, 32), "RMT-S s3": ("decomposed", 2, 8, 14, 14, 32),
             "RMT-S s4": ("full", 2, 16, 7, 7, 32), "full 28": ("full", 1, 8, 28, 28, 32)}
GPU_SHAPES = {
    "RMT-S s1": ("decomposed", 128, 4, 56, 56, 16),
    "RMT-S s2": ("decomposed", 128, 4, 28, 28, 32),
    "RMT-S s3": ("full", 128, 8, 14, 14, 32),
    "RMT-S s4": ("full", 128, 16, 7, 7, 32),
    "full 28": ("full", 64, 4, 28, 28, 32),
    "full 56": ("full", 16, 4, 56, 56, 32),
    "det s1": ("decomposed", 2, 4, 200, 336, 16),
    "det s3": ("full", 2, 8, 50, 84, 32),
}
QUICK_GPU = {"RMT-S s1": ("decomposed", 32, 4, 56, 56, 16), "RMT-S s3": ("full", 32, 8, 14, 14, 32)}
FLEX_NO_CPU_BACKWARD = "FlexAttention has no backward on CPU in PyTorch (forward only)"


# ---------------------------------------------------------------- the compared code


def rmt_reference(q, k, v, log_g, decomposed):
    """The official RMT pattern: materialised (heads, N, N) fp32 mask added to the logits."""
    B, h, H, W, d = q.shape
    k = k * d ** -0.5
    if not decomposed:
        mask = manhattan_distance(H, W, q.device) * log_g[:, None, None]
        qk = q.reshape(B, h, H * W, d) @ k.reshape(B, h, H * W, d).transpose(-1, -2) + mask
        return (torch.softmax(qk, -1).to(v.dtype) @ v.reshape(B, h, H * W, -1)).reshape(B, h, H, W, -1)
    mask_w = axis_distance(W, q.device) * log_g[:, None, None]
    mask_h = axis_distance(H, q.device) * log_g[:, None, None]
    qk = q @ k.transpose(-1, -2) + mask_w[None, :, None]
    mid = torch.softmax(qk, -1).to(v.dtype) @ v
    qh, kh, mh = q.transpose(2, 3), k.transpose(2, 3), mid.transpose(2, 3)
    qk = qh @ kh.transpose(-1, -2) + mask_h[None, :, None]
    return (torch.softmax(qk, -1).to(v.dtype) @ mh).transpose(2, 3)


def sdpa_masked(q, k, v, log_g, decomposed):
    B, h, H, W, d = q.shape
    if not decomposed:
        mask = (manhattan_distance(H, W, q.device) * log_g[:, None, None]).to(q.dtype)
        o = F.scaled_dot_product_attention(q.reshape(B, h, H * W, d), k.reshape(B, h, H * W, d),
                                           v.reshape(B, h, H * W, -1), attn_mask=mask)
        return o.reshape(B, h, H, W, -1)
    mask_w = (axis_distance(W, q.device) * log_g[:, None, None]).to(q.dtype)[:, None]
    mask_h = (axis_distance(H, q.device) * log_g[:, None, None]).to(q.dtype)[:, None]
    mid = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_w)
    o = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), mid.transpose(2, 3), attn_mask=mask_h)
    return o.transpose(2, 3)


def sdpa_no_bias(q, k, v, decomposed):
    """The same passes with no bias at all: SDPA's CPU flash kernel, the floor for the decay's cost."""
    B, h, H, W, d = q.shape
    if not decomposed:
        o = F.scaled_dot_product_attention(q.reshape(B, h, H * W, d), k.reshape(B, h, H * W, d),
                                           v.reshape(B, h, H * W, -1))
        return o.reshape(B, h, H, W, -1)
    mid = F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), mid.transpose(2, 3)).transpose(2, 3)


_FLEX: Dict[str, Callable] = {}


def flex_attention_fn(device) -> Optional[Callable]:
    """torch.compile(flex_attention) with the Manhattan score_mod, on (B, heads, N, d) problems."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception:
        return None
    if device.type not in _FLEX:
        _FLEX[device.type] = torch.compile(flex_attention, dynamic=False)
    compiled = _FLEX[device.type]

    def grid(q, k, v, log_g, X):
        def manhattan(score, b, hh, qi, kj):
            return score + log_g[hh] * ((qi // X - kj // X).abs() + (qi % X - kj % X).abs())

        return compiled(q, k, v, score_mod=manhattan)

    def run(q, k, v, log_g, decomposed):
        B, h, H, W, d = q.shape
        if not decomposed:
            o = grid(q.reshape(B, h, H * W, d), k.reshape(B, h, H * W, d), v.reshape(B, h, H * W, -1), log_g, W)
            return o.reshape(B, h, H, W, -1)
        # rows as (B, heads * H) problems of W tokens (head index hh // H), then columns
        lg_w, lg_h = log_g.repeat_interleave(H), log_g.repeat_interleave(W)
        flat = lambda t, n: t.reshape(B, h * n, t.shape[-2], t.shape[-1])
        mid = grid(flat(q, H), flat(k, H), flat(v, H), lg_w, W).reshape(q.shape[:4] + (-1,))
        qt, kt, mt = (t.transpose(2, 3).contiguous() for t in (q, k, mid))
        o = grid(flat(qt, W), flat(kt, W), flat(mt, W), lg_h, H)
        return o.reshape(B, h, W, H, -1).transpose(2, 3)

    return run


# ---------------------------------------------------------------- driver


def model_flops(form: str, B: int, heads: int, H: int, W: int, d: int, dv: int) -> float:
    """Forward FLOPs of the two GEMMs per pass (2 N_keys (d + dv) per query row)."""
    if form == "full":
        return 2.0 * B * heads * (H * W) ** 2 * (d + dv)
    return 2.0 * B * heads * (H * W) * (W + H) * (d + dv)


def _methods(q, k, v, gamma, decomposed, device):
    """[(method, role, backend, fn(q, k, v), has_backward)] for one shape."""
    log_g = torch.log(gamma)
    chosen = vitattn.explain("masa", q, k, v, gamma, decomposed=decomposed).chosen
    out = [("rmt_reference", "naive", None, lambda q, k, v: rmt_reference(q, k, v, log_g, decomposed), True),
           ("sdpa_float_mask", "peer", None, lambda q, k, v: sdpa_masked(q, k, v, log_g, decomposed), True),
           ("sdpa_no_bias", "bound", None, lambda q, k, v: sdpa_no_bias(q, k, v, decomposed), True)]
    flex = flex_attention_fn(device)
    if flex is not None:
        out.append(("flex_attention_compiled", "peer", None, lambda q, k, v: flex(q, k, v, log_g, decomposed),
                    device.type != "cpu"))
    out.append(("vitattn:auto", "auto", chosen,
                lambda q, k, v: vitattn.masa(q, k, v, gamma, decomposed=decomposed), True))
    ctx = dict(device=device, dtype=q.dtype, d=q.shape[-1], dv=v.shape[-1], H=q.shape[2], W=q.shape[3],
               B=q.shape[0], heads=q.shape[1], decomposed=decomposed)
    for name in masa_backends.NAMES[1:]:
        if masa_backends.dispatcher.reason(name, ctx, auto=True) is None:
            out.append((f"vitattn:{name}", "backend", name,
                        lambda q, k, v, _b=name: vitattn.masa(q, k, v, gamma, decomposed=decomposed, backend=_b),
                        True))
    return out


def run(quick: bool, device, progress: Optional[Callable[[str], None]] = None, dtype: Optional[torch.dtype] = None,
        threads: Sequence[int] = (1, 2)) -> List[Dict]:
    device = bench_device(device)
    on_gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    shapes = (QUICK_GPU if quick else GPU_SHAPES) if on_gpu else (QUICK_CPU if quick else CPU_SHAPES)
    thread_counts = [None] if on_gpu else ([1] if quick else list(threads))
    rounds = 3 if quick else 9
    rows: List[Dict] = []
    before = torch.get_num_threads()
    try:
        for name, (form, B, heads, H, W, d) in shapes.items():
            decomposed = form == "decomposed"
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, heads, H, W, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
                       for _ in range(3))
            dy = torch.randn(B, heads, H, W, d, generator=g).to(device=device, dtype=dtype)
            # RMT's per-head decays: 1 - 2^(-5 - 4 i / heads)
            gamma = torch.tensor([1 - 2 ** (-5 - 4 * i / heads) for i in range(heads)], device=device)
            flops = model_flops(form, B, heads, H, W, d, d)
            per_method: Dict[str, Dict[int, Dict]] = {}
            for nt in thread_counts:
                if nt is not None:
                    torch.set_num_threads(nt)
                if progress is not None:
                    progress(f"masa {name} {form}" + (f" {nt}t" if nt else ""))
                methods = _methods(q, k, v, gamma, decomposed, device)

                def fwd_of(fn):
                    def fwd():
                        with torch.no_grad():
                            return fn(q, k, v)
                    return fwd

                def fwd_bwd_of(fn):
                    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dy)

                fwd_ms, fwd_cpu = time_alternating_seq([fwd_of(m[3]) for m in methods], device, rounds,
                                                       skip_failing=True)
                with_bwd = [m for m in methods if m[4]]
                fb_ms, fb_cpu = time_alternating_seq([fwd_bwd_of(m[3]) for m in with_bwd], device, rounds,
                                                     skip_failing=True)
                fb = {m[0]: (t, c) for m, t, c in zip(with_bwd, fb_ms, fb_cpu)}
                block = []
                for i, (method, role, backend, fn, has_bwd) in enumerate(methods):
                    row = dict(op="masa", shape=name, form=form, B=B, heads=heads, H=H, W=W, d=d, tokens=H * W,
                               dtype=str(dtype).replace("torch.", ""),
                               threads=nt if nt is not None else torch.get_num_threads(),
                               method=method, role=role, backend=backend, fwd_ms=fwd_ms[i], fwd_cpu_ms=fwd_cpu[i])
                    if fwd_ms[i] is None:
                        mark_unavailable(row, "failed to run here", "fwd_ms", "fwd_bwd_ms")
                    elif has_bwd:
                        row["fwd_bwd_ms"], row["fwd_bwd_cpu_ms"] = fb[method]
                    else:
                        mark_unavailable(row, FLEX_NO_CPU_BACKWARD, "fwd_bwd_ms")
                    if row.get("fwd_ms"):
                        row["fwd_gflops"] = row["gflops"] = flops / row["fwd_ms"] / 1e6
                        row["fwd_peak_mib"] = peak_memory_mb(fwd_of(fn), device)
                    if row.get("fwd_bwd_ms"):
                        row["fwd_bwd_gflops"] = 3 * flops / row["fwd_bwd_ms"] / 1e6
                        row["peak_mib"] = peak_memory_mb(fwd_bwd_of(fn), device)
                    if not on_gpu and nt:
                        for m in ("fwd", "fwd_bwd"):
                            if row.get(f"{m}_gflops"):
                                row[f"{m}_peak_frac"] = row[f"{m}_gflops"] / (nt * cpu_peak_gflops_per_core())
                    block.append(row)
                    per_method.setdefault(method, {})[nt] = row
                base = {r["method"]: r for r in block}
                for row in block:
                    for key, ref in (("naive", "rmt_reference"), ("sdpa", "sdpa_float_mask"),
                                     ("nobias", "sdpa_no_bias")):
                        for m in ("fwd", "fwd_bwd"):
                            a, b = base[ref].get(f"{m}_ms"), row.get(f"{m}_ms")
                            if a and b:
                                row[f"vs_{key}_{m}"] = a / b
                    one = per_method.get(row["method"], {}).get(1)
                    if nt is not None and nt > 1 and one is not None:
                        for m, key in (("fwd", "speedup_2t"), ("fwd_bwd", "speedup_2t_fwd_bwd")):
                            if one.get(f"{m}_ms") and row.get(f"{m}_ms"):
                                row[key] = one[f"{m}_ms"] / row[f"{m}_ms"]
                    rows.append(row)
                    fb_txt = (f"{row['fwd_bwd_ms']:.2f} ms (x{row.get('vs_naive_fwd_bwd', float('nan')):.2f})"
                              if row.get("fwd_bwd_ms") else "n/a")
                    fwd_txt = (f"{row['fwd_ms']:.2f} ms (x{row.get('vs_naive_fwd', float('nan')):.2f} naive)"
                               if row.get("fwd_ms") else "n/a")
                    print(f"{name} {row['threads']}t {method}: fwd {fwd_txt}, fwd+bwd {fb_txt}", file=sys.stderr,
                          flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


def summary(rows: List[Dict], device: torch.device) -> str:
    """Per thread count: vitattn:auto's speed-ups over the naive code (geometric mean, minimum),
    the full form against SDPA without bias, and 2 threads against 1."""
    gm = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs))
    out = ["", "## vitattn:auto against the naive code (speed-up = naive time / auto time)", "",
           "| threads | dtype | fwd geomean | fwd min | fwd+bwd geomean | fwd+bwd min | auto's backends |",
           "|---|---|---|---|---|---|---|"]
    for nt, dt in sorted({(r["threads"], r["dtype"]) for r in rows}):
        auto = [r for r in rows if r["role"] == "auto" and r["threads"] == nt and r["dtype"] == dt
                and r.get("vs_naive_fwd") and r.get("vs_naive_fwd_bwd")]
        if not auto:
            continue
        f = [r["vs_naive_fwd"] for r in auto]
        b = [r["vs_naive_fwd_bwd"] for r in auto]
        used = ", ".join(sorted({str(r["backend"]) for r in auto}))
        out.append(f"| {nt} | {dt} | {gm(f):.2f} | {min(f):.2f} | {gm(b):.2f} | {min(b):.2f} | {used} |")
    out += ["", "Per shape (vitattn:auto): forward and forward+backward speed-up over the naive code, "
            "forward against SDPA without bias (>= 1: faster), achieved forward GFLOP/s and fraction of "
            f"threads x {cpu_peak_gflops_per_core():.0f} GFLOP/s (one core's measured fp32 peak)", "",
            "| shape | form | threads | backend | fwd ms | x naive fwd | fwd+bwd ms | x naive fwd+bwd | "
            "x sdpa_no_bias fwd | fwd GFLOP/s | fwd peak frac | x 2 threads |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["role"] != "auto":
            continue
        fmt = lambda x, p=2: "n/a" if x is None else f"{x:.{p}f}"
        out.append(f"| {r['shape']} | {r['form']} | {r['threads']} | {r['backend']} | {fmt(r.get('fwd_ms'))} | "
                   f"{fmt(r.get('vs_naive_fwd'))} | {fmt(r.get('fwd_bwd_ms'))} | {fmt(r.get('vs_naive_fwd_bwd'))} | "
                   f"{fmt(r.get('vs_nobias_fwd'))} | {fmt(r.get('fwd_gflops'), 1)} | "
                   f"{fmt(r.get('fwd_peak_frac'))} | {fmt(r.get('speedup_2t'))} |")
    return "\n".join(out) + "\n"


def update_ranking(rows: List[Dict], device: torch.device, command: str) -> Dict:
    """measured.json for this device type: per shape class (backends.shape_class) the vitattn
    backends ordered by forward+backward time (mean ratio to the fastest over the class's
    shapes; single-threaded rows where there are any)."""
    mine = [r for r in rows if r["role"] == "backend" and r.get("fwd_bwd_ms")]
    if any(r["threads"] == 1 for r in mine):
        mine = [r for r in mine if r["threads"] == 1]
    by_shape: Dict[tuple, List[Dict]] = {}
    for r in mine:
        by_shape.setdefault((r["shape"], r["form"], r["dtype"]), []).append(r)
    ratios: Dict[str, Dict[str, List[float]]] = {}
    for members in by_shape.values():
        r0 = members[0]
        cls = masa_backends.shape_class(dict(H=r0["H"], W=r0["W"], decomposed=r0["form"] == "decomposed"))
        best = min(r["fwd_bwd_ms"] for r in members)
        for r in members:
            ratios.setdefault(cls, {}).setdefault(r["backend"], []).append(r["fwd_bwd_ms"] / best)
    table = {cls: sorted(per, key=lambda b: sum(per[b]) / len(per[b])) for cls, per in sorted(ratios.items())}
    data: Dict = {}
    if os.path.exists(MEASURED_JSON):
        with open(MEASURED_JSON) as f:
            data = json.load(f)
    data[device.type] = table
    sources = data.get("source") if isinstance(data.get("source"), dict) else {}
    sources[device.type] = (f"benchmarks/results/bench_masa.json: `{command}` at commit {commit()}, vitattn "
                            "backends ordered by forward+backward median time per shape class (single-threaded rows)")
    data["source"] = sources
    with open(MEASURED_JSON, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    return data


def main(argv=None) -> None:
    state: Dict[str, object] = {}

    def options(ap):
        ap.add_argument("--dtype", default=None, choices=sorted(DTYPES))
        ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (CPU)")
        ap.add_argument("--update-ranking", action="store_true",
                        help=f"write the per-shape-class backend order of this device type to {MEASURED_JSON}")

    def run_kwargs(args):
        state["update"] = args.update_ranking
        return dict(dtype=DTYPES.get(args.dtype), threads=args.threads,
                    progress=lambda s: print(s, file=sys.stderr, flush=True))

    def appendix(rows, device):
        text = summary(rows, device)
        if state.get("update"):
            cmd = " ".join(["python benchmarks/bench_masa.py"] + sys.argv[1:])
            data = update_ranking(rows, device, cmd)
            text += f"\n\"auto\" ranking written to vitattn/ops/masa/measured.json: {json.dumps(data[device.type])}\n"
        return text

    cli("bench_masa", run, COLUMNS, __doc__, argv=argv, quick_help="small batches, few repeats (CPU-friendly)",
        options=options, run_kwargs=run_kwargs, appendix=appendix)


if __name__ == "__main__":
    main()
