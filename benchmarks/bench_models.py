"""Benchmark: whole models (every one in vitattn.models.list_models()), fused vs reference backend.

For each model and each attention backend -- "fused" (attn_backend="auto": the Triton /
CUDA / C++ kernels wherever they can run) and "torch" (attn_backend="torch": the
PyTorch backend of every op) -- at 224x224:

* train_img_s: images/s of one training step (forward, cross-entropy, backward, SGD step);
* infer_img_s: images/s of an eval-mode forward under torch.no_grad();
* train_peak_mib / infer_peak_mib: peak extra memory of one step (GPU: allocator peak;
  CPU: peak of the running allocation total the profiler records during the step);
* train_speedup / infer_speedup: fused throughput over the same model's torch-backend
  throughput (on the fused row).

Both backends run the same weights and inputs, timed in alternating rounds (order flipped
every round, median per backend), so that load drifting on a shared machine hits both alike.
GPU: bf16 autocast (AMP); CPU: fp32, one intra-op thread (the CPU is shared; a fair
fused-vs-torch comparison needs both on the same single core). Where no fused kernel can run
(e.g. Sinkhorn on CPU: the Triton interpreter is never chosen automatically) both rows run the
same code, and their ratio shows the measurement noise.

    python benchmarks/bench_models.py                 # every model, GPU batch 64 / CPU batch 2
    python benchmarks/bench_models.py --quick         # rmt_t only, batch 1, few repeats (< 1 min on CPU)
    python benchmarks/bench_models.py --models rmt_s sret_t --batch 32
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_device, cli, peak_memory_mb, time_fn  # noqa: E402

import vitattn.models as models  # noqa: E402

COLUMNS = ["model", "params_m", "impl", "dtype", "batch", "res", "train_img_s", "infer_img_s", "train_speedup",
           "infer_speedup", "train_peak_mib", "infer_peak_mib"]
IMPLS = (("fused", "auto"), ("torch", "torch"))
QUICK_MODELS = ("rmt_t",)

# RMT-S goals of issue 7 (GPU): fused over torch-backend throughput
GOALS = {"rmt_s": dict(train_speedup=1.5, infer_speedup=2.0)}


def _amp(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def cpu_peak_mib(fn) -> float:
    """Peak extra memory of one call of fn() on the CPU, in MiB: the running sum of the CPU
    allocator's allocations and frees recorded by the profiler during the call.

    (common.peak_memory_mb's resident-set high-water mark reads ~0 here: after the timing runs
    the allocator reuses pages the process already holds.)"""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak / 2**20


def _peak(fn, device: torch.device) -> Optional[float]:
    return peak_memory_mb(fn, device) if device.type == "cuda" else cpu_peak_mib(fn)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class _Runner:
    """One model with one attention backend, its optimizer and its fixed batch."""

    def __init__(self, name: str, attn_backend: str, device: torch.device, batch: int, res: int,
                 state: Optional[Dict] = None):
        torch.manual_seed(0)
        model = models.create_model(name, attn_backend=attn_backend)
        if state is not None:  # both backends run the very same weights
            model.load_state_dict(state)
        self.model = model.to(device).to(memory_format=torch.channels_last)
        self.device = device
        g = torch.Generator(device="cpu").manual_seed(0)
        self.x = torch.randn(batch, 3, res, res, generator=g).to(device).contiguous(
            memory_format=torch.channels_last)
        self.y = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.params_m = sum(p.numel() for p in self.model.parameters()) / 1e6

    def train_step(self):
        self.opt.zero_grad(set_to_none=True)
        with _amp(self.device):
            loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()

    def infer(self):
        with torch.no_grad(), _amp(self.device):
            return self.model(self.x)


def _paired_ms(fns: Dict[str, object], device: torch.device, warmup: int, repeats: int,
               min_time: float = 0.0) -> Dict[str, float]:
    """Median ms per call of each fn, timed in alternating rounds (order flipped every round) so
    that load drifting on a shared machine hits every implementation alike."""
    import statistics
    import time as _time

    names = list(fns)
    times: Dict[str, List[float]] = {n: [] for n in names}
    for n in names:
        for _ in range(warmup):
            fns[n]()
    t0 = _time.perf_counter()
    r = 0
    while r < repeats or (_time.perf_counter() - t0) < min_time:
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            times[n].append(time_fn(fns[n], device, warmup=0, repeats=1))
        r += 1
        if r >= 200:
            break
    return {n: statistics.median(t) for n, t in times.items()}


def measure_model(name: str, device: torch.device, batch: int, res: int, reps: Dict, dtype: str) -> List[Dict]:
    """Rows (fused, torch) for one model: paired timing of training steps, then of inference."""
    runners: Dict[str, _Runner] = {}
    state = None
    for impl, backend in IMPLS:
        runners[impl] = _Runner(name, backend, device, batch, res, state)
        state = runners[impl].model.state_dict()
    rows = {impl: dict(model=name, impl=impl, dtype=dtype, batch=batch, res=res, params_m=r.params_m)
            for impl, r in runners.items()}
    for phase in ("train", "infer"):
        for r in runners.values():
            r.model.train(phase == "train")
        fns = {impl: (r.train_step if phase == "train" else r.infer) for impl, r in runners.items()}
        try:
            ms = _paired_ms(fns, device, **reps)
            for impl, t in ms.items():
                rows[impl][f"{phase}_img_s"] = batch / (t / 1e3)
                rows[impl][f"{phase}_peak_mib"] = _peak(fns[impl], device)
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            for impl in rows:
                rows[impl].setdefault(f"{phase}_img_s", "OOM")
        for r in runners.values():
            r.opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    fused, ref = rows["fused"], rows["torch"]
    for k in ("train", "infer"):
        a, b = fused.get(f"{k}_img_s"), ref.get(f"{k}_img_s")
        if isinstance(a, float) and isinstance(b, float):
            fused[f"{k}_speedup"] = a / b
    return [rows[impl] for impl, _ in IMPLS]


def run(quick: bool, device, model_names: Optional[Sequence[str]] = None, batch: Optional[int] = None,
        res: int = 224, repeats: Optional[int] = None) -> List[Dict]:
    device = bench_device(device)  # one intra-op thread on the shared CPU: see the module docstring
    on_gpu = device.type == "cuda"
    names = list(model_names) if model_names else (list(QUICK_MODELS) if quick else models.list_models())
    if batch is None:
        batch = 1 if quick and not on_gpu else (8 if quick else (64 if on_gpu else 2))
    reps = dict(warmup=1, repeats=3) if quick else (dict(warmup=3, repeats=10, min_time=1.0) if on_gpu
                                                    else dict(warmup=1, repeats=5))
    if repeats is not None:
        reps = dict(warmup=1, repeats=repeats)
    dtype = "bf16 amp" if on_gpu else "fp32"
    rows: List[Dict] = []
    for name in names:
        try:
            got = measure_model(name, device, batch, res, reps, dtype)
        except Exception as exc:  # one broken model must not hide the others' numbers
            err = f"error: {type(exc).__name__}: {exc}"[:120]
            got = [dict(model=name, impl=impl, dtype=dtype, batch=batch, res=res, train_img_s=err)
                   for impl, _ in IMPLS]
        for row in got:
            rows.append(row)
            print(f"{name} {row['impl']}: train {row.get('train_img_s')} img/s, infer {row.get('infer_img_s')} "
                  f"img/s, peak {row.get('train_peak_mib')} / {row.get('infer_peak_mib')} MiB", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def goals_report(rows: List[Dict], device: torch.device) -> str:
    """Lines on the issue's performance goals (they are stated for the GPU)."""
    out = []
    for r in rows:
        if r["impl"] != "fused":
            continue
        for k in ("train_speedup", "infer_speedup"):
            s = r.get(k)
            if isinstance(s, float) and s < 1.0:
                out.append(f"- {r['model']}: fused slower than the torch backend ({k} {s:.2f})")
        goal = GOALS.get(r["model"])
        if goal and device.type == "cuda":
            for k, want in goal.items():
                s = r.get(k)
                ok = isinstance(s, float) and s >= want
                out.append(f"- {r['model']} {k}: {s if s is None else round(s, 2)} (goal >= {want}): "
                           f"{'met' if ok else 'NOT met'}")
    return "\n".join(out)


def _options(ap) -> None:
    ap.add_argument("--models", nargs="*", default=None, help="model names (default: every registered model)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (after 1 warmup)")


def _goals_section(rows: List[Dict], device: torch.device) -> str:
    goals = goals_report(rows, device)
    return "\n## Goals\n\n" + goals + "\n" if goals else ""


def main() -> None:
    cli("bench_models", run, COLUMNS, __doc__, quick_help="rmt_t only, tiny batch, few repeats", options=_options,
        run_kwargs=lambda a: dict(model_names=a.models, batch=a.batch, res=a.res, repeats=a.repeats),
        appendix=_goals_section)


if __name__ == "__main__":
    main()
