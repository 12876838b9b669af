"""Timing, peak-memory and reporting helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak extra memory of one call of fn() in MiB.

    GPU: torch.cuda.max_memory_allocated over the call. CPU: the growth of the process's
    resident-set high-water mark (Linux /proc, reset through clear_refs), or None where
    that is unavailable.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    try:
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        fn()
        return max(0, _rss_kib("VmHWM") - base) / 1024
    except OSError:
        return None


def environment(device: torch.device) -> Dict[str, str]:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "device_type": device.type,
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
    return env


def commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
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
