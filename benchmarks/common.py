"""Timing, peak-memory and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# ---------------------------------------------------------------- the row schema
# Each benchmark's run(quick, device[, progress]) returns a list of flat dict rows (progress,
# when accepted, is called with a short label as each row starts). The main job's report
# (vitattn/bench.py) reads these keys; a row may carry more (extra shape parameters as
# int/str/bool, extra metrics as floats) and they are shown in its table. The main job runs
# masa, sinkhorn, group_attention, dynamixer and models, and any other bench_<name>.py that
# sets MAIN_JOB = True at module level.
ROW_KEYS = {
    "op": "the op (the report fills it in from the benchmark's name when absent)",
    "method": "what ran: 'vitattn:auto', 'vitattn:<backend>', or a peer's name ('rmt_reference', "
              "'sdpa_float_mask', 'flex_attention_compiled', ...); one plot line per method",
    "role": "'auto' (vitattn's default choice, backend='auto'), 'backend' (one named vitattn backend), "
            "'naive' (the naive dense PyTorch code a user would otherwise write: the baseline of every "
            "speed-up), 'peer' (another implementation of the same math: SDPA with the mask, compiled "
            "FlexAttention, the compiled reference), 'bound' (computes something simpler, e.g. SDPA "
            "without the bias: shown, never counted as a peer); inferred from the method when absent",
    "backend": "the vitattn backend that ran; for 'auto' the one it chose (vitattn.explain(...).chosen)",
    "form": "the variant that is not a size (MaSA 'full' / 'decomposed', ...): one plot panel per form",
    "shape": "a short label of the shape (e.g. 'RMT-S s1'), used on the speed-up chart",
    "tokens": "problem size: tokens per sequence or image (the plots' x axis)",
    "threads": "intra-op threads the row ran with (CPU)",
    "dtype": "'float32', 'bfloat16', ...",
    "fwd_ms": "median forward time, ms (None, with the reason in 'unavailable', when it cannot run)",
    "fwd_bwd_ms": "median forward+backward time, ms (same convention)",
    "peak_mib": "peak memory allocated during one forward+backward (peak_memory_mb), MiB",
    "gflops": "achieved GFLOP/s",
    "unavailable": "{metric: reason} for what cannot run on this device (e.g. FlexAttention's "
                   "backward on CPU): shown as n/a with the reason as a footnote (mark_unavailable)",
    "note": "free text",
}


def mark_unavailable(row: Dict, reason: str, *metrics: str) -> Dict:
    """Record that ``metrics`` cannot be measured for this row here, and why (the report shows
    n/a with the reason as a footnote, not a failure)."""
    na = row.setdefault("unavailable", {})
    for m in metrics:
        row[m] = None
        na[m] = reason
    return row



def bench_device(device) -> torch.device:
    """The benchmark's device; on the CPU, time single-threaded: the CPU is shared, and intra-op
    threads spinning against other processes make timings meaningless (measured 100x swings)."""
    device = torch.device(device)
    if device.type != "cuda":
        torch.set_num_threads(1)
    return device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeats: int = 5,
            min_time: float = 0.0) -> float:
    """Median wall time of fn() in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start_all) < min_time:
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize(device)
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 1000:
            break
    return statistics.median(times)


# ---------------------------------------------------------------- peak memory

# how peak_memory_mb measures, per device type (the report states it)
PEAK_MEMORY_METHOD = {
    "cpu": "peak bytes allocated through PyTorch's CPU allocator during one call: the running "
           "total of the allocation and free events the profiler records (profile_memory=True) "
           "over the call, at its highest, with one intra-op thread (the profiler sees the calling "
           "thread's allocations only, not those of at::parallel_for's workers). Blocks allocated "
           "before the call and freed in it are not seen (the figure is the peak of what the call "
           "itself allocates); memory allocated outside the allocator (oneDNN/BLAS scratch, a "
           "kernel's std::vector) is not counted.",
    "cuda": "torch.cuda.max_memory_allocated during one call minus torch.cuda.memory_allocated "
            "at its start (the caching allocator's allocated bytes, not its reserved cache).",
}

# what the profiler prints natively (kineto's USDT start/stop lines, the allocator's warning on
# freeing a block that was allocated before profiling started): noise, never shown
_NATIVE_NOISE = re.compile(
    r"^USDT:|SyncActivityProfilerHandler|ActivityProfilerController|Memory block of unknown size"
    r"|profiler results will not include the deallocation")


def is_profiler_noise(line: str) -> bool:
    return bool(_NATIVE_NOISE.search(line))


@contextlib.contextmanager
def quiet_native_output():
    """Capture what native code writes to file descriptors 1 and 2 inside the block and pass
    on every line except the profiler's noise (is_profiler_noise) to sys.stdout / sys.stderr."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    saved, files = [], []
    try:
        for fd in (1, 2):
            tmp = tempfile.TemporaryFile()
            saved.append(os.dup(fd))
            files.append(tmp)
            os.dup2(tmp.fileno(), fd)
    except OSError:  # no usable descriptors (embedded interpreters): leave output alone
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        for tmp in files:
            tmp.close()
        yield
        return
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        for stream, tmp in zip((sys.stdout, sys.stderr), files):
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            tmp.close()
            kept = [line for line in text.splitlines() if line.strip() and not is_profiler_noise(line)]
            if kept:
                stream.write("\n".join(kept) + "\n")
                stream.flush()


def _cpu_peak_allocated_bytes(fn: Callable[[], object]) -> int:
    from torch.autograd.profiler import profile  # not torch.profiler: that one imports torch._dynamo

    # one thread: allocations in at::parallel_for's worker threads are not recorded (measured:
    # a kernel allocating 4 MiB per task showed 4 MiB at 2 threads where 8 MiB were held)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with quiet_native_output():
            with profile(use_cpu=True, profile_memory=True) as prof:
                fn()
    finally:
        torch.set_num_threads(threads)
    events = [(e.start_ns(), e.nbytes()) for e in prof.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):  # stable: same-time events keep their order
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_allocated_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one call of fn() above what was allocated at its start
    (PEAK_MEMORY_METHOD says how, per device type); None on other devices. What fn returns
    is alive at the end of the call and so counts."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type == "cpu":
        return _cpu_peak_allocated_bytes(fn)
    return None


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak extra memory of one call of fn() in MiB: peak_allocated_bytes / 2**20 (None where
    it cannot be measured)."""
    peak = peak_allocated_bytes(fn, device)
    return None if peak is None else peak / 2**20


def environment(device: torch.device) -> Dict[str, str]:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "device_type": device.type,
        "cpu": _cpu_model(),
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": commit(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "absent"
    try:
        from vitattn import _C  # noqa: F401  (the compiled extension; absent without a compiler)

        env["cpu_isa"] = _C.cpu_isa()
    except Exception:
        pass
    if device.type == "cpu":
        env["fp32_peak_per_core"] = cpu_peak_source()
    try:
        env["load_avg"] = " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" (1/5/15 min, {os.cpu_count()} CPUs)"
    except OSError:
        pass
    return env


@contextlib.contextmanager
def environ(values: Dict[str, str]):
    """os.environ updated with values inside the block, restored (or removed) after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# One core's fp32 compute limit when it cannot be measured (no compiled extension): a Zen 3
# core with AVX2, 2 FMA pipes x 8 lanes x 2 flops x ~3 GHz.
ASSUMED_PEAK_GFLOPS_PER_CORE = 96.0
_peak_cache: Dict[str, object] = {}


def cpu_peak_gflops_per_core() -> float:
    """One core's fp32 compute limit in GFLOP/s, the denominator of every ``peak_frac``.

    Measured once per process by ``vitattn._C.cpu_fma_peak_gflops`` (independent FMA chains
    on one thread, with the instruction set the kernels run with; the best of eight 0.05 s
    runs, so a busy neighbour or a slow first run lowers it least); ASSUMED_PEAK_GFLOPS_PER_CORE without the
    extension. ``cpu_peak_source()`` says which, for the results' header.
    """
    if "gflops" not in _peak_cache:
        try:
            from vitattn import _C

            _peak_cache["gflops"] = max(_C.cpu_fma_peak_gflops(0.05) for _ in range(8))
            _peak_cache["source"] = f"measured: {_peak_cache['gflops']:.0f} GFLOP/s (vitattn._C.cpu_fma_peak_gflops)"
        except (ImportError, AttributeError) as e:
            _peak_cache["gflops"] = ASSUMED_PEAK_GFLOPS_PER_CORE
            _peak_cache["source"] = (f"assumed: {ASSUMED_PEAK_GFLOPS_PER_CORE:.0f} GFLOP/s (a Zen 3 core with AVX2; "
                                     f"not measured: {type(e).__name__})")
    return float(_peak_cache["gflops"])


def cpu_peak_source() -> str:
    cpu_peak_gflops_per_core()
    return str(_peak_cache["source"])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        # the results folder is what a run writes: its own changes do not make the code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)benchmarks/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def markdown_table(rows: List[Dict], columns: List[str]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
        return "" if x is None else str(x)

    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out)


def write_results(name: str, rows: List[Dict], columns: List[str], device: torch.device, command: str,
                  out_dir: Optional[str] = None) -> str:
    """Write <name>.json and <name>.md under benchmarks/results/ (or out_dir); return the markdown."""
    out_dir = out_dir or RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    env = environment(device)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump({"environment": env, "command": command, "rows": rows}, f, indent=1)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    md = f"# {name}\n\ncommand: `{command}`\n\n{header}\n\n{markdown_table(rows, columns)}\n"
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(md)
    return md


def saved_bytes(fn: Callable[[], object], skip: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward during fn().

    The storages of ``skip`` (inputs, parameters) are left out: they are kept whether or not
    anything is saved.
    """
    skipped = {t.untyped_storage().data_ptr() for t in skip}
    storages: Dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skipped:
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def cli(name: str, run: Callable[..., List[Dict]], columns: List[str], description: Optional[str], *,
        quick_help: Optional[str] = None, options: Optional[Callable[[argparse.ArgumentParser], None]] = None,
        run_kwargs: Optional[Callable[[argparse.Namespace], Dict]] = None,
        appendix: Optional[Callable[[List[Dict], torch.device], str]] = None,
        argv: Optional[Sequence[str]] = None) -> List[Dict]:
    """The ``__main__`` of benchmarks/<name>.py: parse --quick / --device / --out-dir (and the
    script's own flags, added by ``options``), call ``run(quick, device, **run_kwargs(args))``,
    write <name>.{md,json} with the command that reproduces the run, and print the markdown.

    ``appendix(rows, device)`` may return a markdown section added to the .md and the printout.
    """
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    own = len(ap._actions)
    if options is not None:
        options(ap)
    extra = ap._actions[own:]  # the script's own flags, echoed in the command when not default
    ap.add_argument("--out-dir", default=None, help=f"where to write {name}.{{md,json}}")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = run(args.quick, device, **(run_kwargs(args) if run_kwargs else {}))
    cmd = f"python benchmarks/{name}.py" + (" --quick" if args.quick else "") + f" --device {args.device}"
    for action in extra:
        value = getattr(args, action.dest)
        if value is None or value == action.default or value == []:
            continue
        flag = action.option_strings[-1]
        if isinstance(value, bool):
            cmd += f" {flag}"
        else:
            cmd += f" {flag} " + (" ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value))
    md = write_results(name, rows, columns, device, cmd, args.out_dir)
    section = appendix(rows, device) if appendix else ""
    if section:
        with open(os.path.join(args.out_dir or RESULTS_DIR, f"{name}.md"), "a") as f:
            f.write(section)
        md += section
    print(md)
    return rows


# ---------------------------------------------------------------- timing shared by the op and model benchmarks


def time_rounds(calls: Dict[object, Callable[[], object]], warmup: int = 1, repeats: int = 9,
                min_time: float = 0.0, *, device: Optional[torch.device] = None,
                cpu_clock: Callable[[], float] = time.thread_time, skip_failing: bool = False,
                max_time: Optional[float] = None, min_repeats: int = 3
                ) -> Tuple[Dict[object, List[float]], Dict[object, List[float]]]:
    """Wall and CPU milliseconds of every call in every round (lists indexed by round), each
    call made once per round.

    The order inside a round is shuffled (a fixed seed, so a rerun makes the same calls): a
    call is slower right after one that evicts its inputs from the caches or returns memory
    to the OS (measured: the vitattn call that always followed the SDPA peer ran 7-17% slower
    than the same call one place later). Shuffling gives every call every predecessor, and
    interleaving makes load drifting on a shared machine hit all calls alike.
    Rounds: ``repeats``, more until ``min_time`` seconds have passed (at most 200), fewer
    (but ``min_repeats``) once ``max_time`` seconds have passed.
    cpu_clock: time.thread_time (the calling thread; with one intra-op thread it leaves out
    the time the thread waited for a core) or time.process_time (all threads). device: CUDA
    calls are synchronised before each clock is read. skip_failing: a call that raises in its
    warm-up is left out (empty lists) instead of stopping the run."""
    def finish() -> None:
        if device is not None:
            sync(device)

    live = []
    for key, fn in calls.items():
        try:
            for _ in range(warmup):
                fn()
            live.append(key)
        except Exception:
            if not skip_failing:
                raise
    finish()
    order = random.Random(0)
    wall: Dict[object, List[float]] = {k: [] for k in calls}
    cpu: Dict[object, List[float]] = {k: [] for k in calls}
    start = time.perf_counter()
    while live and (min(len(wall[k]) for k in live) < repeats or time.perf_counter() - start < min_time):
        keys = list(live)
        order.shuffle(keys)
        for k in keys:
            t0, c0 = time.perf_counter(), cpu_clock()
            calls[k]()
            finish()
            cpu[k].append((cpu_clock() - c0) * 1e3)
            wall[k].append((time.perf_counter() - t0) * 1e3)
        rounds = len(wall[live[0]])
        if rounds >= 200 or (max_time is not None and rounds >= min_repeats
                             and time.perf_counter() - start > max_time):
            break
    return wall, cpu


def time_alternating(calls: Dict[object, Callable[[], object]], warmup: int = 1, repeats: int = 9,
                     min_time: float = 0.0, *, device: Optional[torch.device] = None,
                     cpu_clock: Callable[[], float] = time.thread_time, skip_failing: bool = False,
                     max_time: Optional[float] = None, min_repeats: int = 3
                     ) -> Tuple[Dict[object, Optional[float]], Dict[object, Optional[float]]]:
    """Median wall time and median CPU time (ms) of each call over :func:`time_rounds`'s rounds
    (None for a call left out by skip_failing)."""
    wall, cpu = time_rounds(calls, warmup, repeats, min_time, device=device, cpu_clock=cpu_clock,
                            skip_failing=skip_failing, max_time=max_time, min_repeats=min_repeats)
    med = lambda xs: statistics.median(xs) if xs else None
    return ({k: med(wall[k]) for k in calls}, {k: med(cpu[k]) for k in calls})


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median over rounds of num[i] / den[i] (two calls' times from the same rounds of
    :func:`time_rounds`): each ratio compares calls made seconds apart, so a machine whose
    speed drifts between rounds moves it far less than the ratio of the two medians."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio: needs two equally long, non-empty lists, got {len(num)} and {len(den)}")
    return statistics.median(a / b for a, b in zip(num, den))


def time_alternating_seq(fns: Sequence[Callable[[], object]], device: torch.device, rounds: int, warmup: int = 1,
                         *, skip_failing: bool = False) -> Tuple[List[Optional[float]], List[Optional[float]]]:
    """time_alternating over a list of calls, in process CPU time (all threads): the medians
    of wall and CPU milliseconds as two lists in the order of fns (bench_masa,
    bench_group_attention)."""
    wall, cpu = time_alternating(dict(enumerate(fns)), warmup, rounds, device=device, cpu_clock=time.process_time,
                                 skip_failing=skip_failing)
    return [wall[i] for i in range(len(fns))], [cpu[i] for i in range(len(fns))]


def geomean(xs: Sequence[float]) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def auto_summary(rows: List[Dict], shape_key: Callable[[Dict], object]) -> str:
    """Markdown: per thread count, forward and forward+backward speed-ups of vitattn:auto over
    the naive code (rows' fwd_x / fwd_bwd_x, and *_cpu at one thread), geometric mean and
    minimum over the shapes; then 2 threads over 1 per shape_key(row)."""
    auto = [r for r in rows if r["method"] == "vitattn:auto"]
    if not auto:
        return ""
    out = ["", "## Summary (vitattn:auto vs naive, fp32)", "",
           "| threads | time | fwd geomean | fwd min | fwd+bwd geomean | fwd+bwd min |", "|---|---|---|---|---|---|"]
    for t in sorted({r["threads"] for r in auto}, key=str):
        sel = [r for r in auto if r["threads"] == t]
        for clock, suffix in (("wall", ""), ("thread CPU", "_cpu")):
            if not all(f"fwd_x{suffix}" in r and f"fwd_bwd_x{suffix}" in r for r in sel):
                continue
            f, fb = [r[f"fwd_x{suffix}"] for r in sel], [r[f"fwd_bwd_x{suffix}"] for r in sel]
            out.append(f"| {t} | {clock} | {geomean(f):.2f} | {min(f):.2f} | {geomean(fb):.2f} | {min(fb):.2f} |")
    one = {shape_key(r): r for r in auto if r["threads"] == 1}
    two = {shape_key(r): r for r in auto if r["threads"] == 2}
    keys = [k for k in one if k in two]
    if keys:
        sf = [one[k]["fwd_ms"] / two[k]["fwd_ms"] for k in keys]
        sfb = [one[k]["fwd_bwd_ms"] / two[k]["fwd_bwd_ms"] for k in keys]
        out += ["", f"2 threads over 1 (vitattn:auto): forward geomean {geomean(sf):.2f} (min {min(sf):.2f}), "
                    f"forward+backward geomean {geomean(sfb):.2f} (min {min(sfb):.2f})"]
    return "\n".join(out) + "\n"


def write_ranking(path: str, rows: List[Dict], shape_class: Callable[[Dict], str], source: str) -> Dict:
    """Rewrite an op's measured.json for this run's device type: per shape class, the backends
    that ran by name (role "backend"), fastest first by the geometric mean of sqrt(fwd_ms x
    fwd_bwd_ms) over that class's rows at one thread (CPU) or on the GPU."""
    table: Dict[str, Dict[str, List[float]]] = {}
    for r in rows:
        if r["role"] != "backend" or r["threads"] not in (1, ""):
            continue
        table.setdefault(shape_class(r), {}).setdefault(r["backend"], []).append(
            math.sqrt(r["fwd_ms"] * r["fwd_bwd_ms"]))
    device_type = "cpu" if any(r["threads"] != "" for r in rows) else "cuda"
    data: Dict = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[device_type] = {cls: sorted(t, key=lambda b: geomean(t[b])) for cls, t in sorted(table.items())}
    data["source"] = source
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    return data


def op_bench_main(name: str, run: Callable[..., List[Dict]], columns: List[str], description: Optional[str], *,
                  shapes: Sequence[str], measured_json: str, summary: Callable[[List[Dict], torch.device], str],
                  update_ranking: Callable[[List[Dict], str], Dict], quick_help: str) -> None:
    """The ``__main__`` of an op benchmark with --threads, --shapes and --update-ranking: the
    summary appended to the results, and with --update-ranking the op's measured.json rewritten
    from this run (the command that produced it recorded there)."""
    state: Dict = {}

    def options(ap) -> None:
        ap.add_argument("--threads", type=int, nargs="+", default=None, help="CPU thread counts (default 1 2)")
        ap.add_argument("--shapes", nargs="+", default=None, choices=list(shapes), help="a subset of the shapes")
        ap.add_argument("--update-ranking", action="store_true",
                        help=f"rewrite {os.path.relpath(measured_json)} from this run ('auto' order per shape class)")

    def kwargs(args):
        state["update"] = args.update_ranking
        state["command"] = f"python benchmarks/{name}.py" + (" --quick" if args.quick else "")
        return dict(threads=args.threads, shapes=args.shapes)

    def appendix(rows, device):
        text = summary(rows, device)
        if state.get("update"):
            data = update_ranking(rows, state["command"])
            text += f"\nmeasured.json rewritten: {json.dumps({k: v for k, v in data.items() if k != 'source'})}\n"
        return text

    cli(name, run, columns, description, quick_help=quick_help, options=options, run_kwargs=kwargs, appendix=appendix)
