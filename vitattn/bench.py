"""The main job: ``python -m vitattn.bench [--quick]``.

Runs every op's benchmark (benchmarks/bench_<op>.py, installed as vitattn.benchmarks) on the
best available device and writes one report: report.md, report.json and, when matplotlib
is importable, PNG plots of time and peak memory per method. The report goes to --out-dir,
by default benchmarks/results/ in a source checkout, ./vitattn-bench-results otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import time
from typing import Dict, List

import torch

BENCHMARKS = ("masa", "sinkhorn", "group_attention", "dynamixer", "models")


def _default_out_dir() -> str:
    from . import benchmarks

    here = os.path.dirname(os.path.abspath(benchmarks.__file__))
    # a source checkout (editable install): the committed results folder
    if os.path.exists(os.path.join(os.path.dirname(here), "setup.py")):
        return os.path.join(here, "results")
    return os.path.abspath("vitattn-bench-results")


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        fill = int(width * self.done / max(1, self.total))
        bar = "#" * fill + "." * (width - fill)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s {label[:60]:60s}")
        sys.stderr.flush()

    def item(self, label: str) -> None:
        sys.stderr.write(f"\r{' ' * 45}{label[:60]:60s}\r")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


def _plot(op: str, rows: List[Dict], out_dir: str) -> List[str]:
    """Time and peak memory against problem size, one line per method (matplotlib optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return []
    size_key = next((k for k in ("N", "n", "tokens", "H", "L", "img") if any(k in r for r in rows)), None)
    if size_key is None:
        return []
    files = []
    for metric, label in (("fwd_bwd_ms", "forward+backward time (ms)"), ("peak_mib", "peak extra memory (MiB)")):
        series: Dict[str, List] = {}
        for r in rows:
            if isinstance(r.get(metric), (int, float)) and isinstance(r.get(size_key), (int, float)):
                key = r.get("method", "?") + (f" [{r['form']}]" if "form" in r else "")
                series.setdefault(key, []).append((r[size_key], r[metric]))
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel(size_key)
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.set_title(f"{op}: {label}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(os.path.basename(path))
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes: under 2 minutes on a 2-core CPU")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)

    from .benchmarks.common import bench_device, environment, markdown_table

    # on a CPU every benchmark times single-threaded (see benchmarks/common.bench_device);
    # set here so that the environment recorded below says so
    device = bench_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = args.out_dir or _default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {unknown}; expected names from {BENCHMARKS}")

    command = "python -m vitattn.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    env = environment(device)
    report = {"environment": env, "command": command.strip(), "quick": args.quick, "ops": {}}
    md = [f"# vitattn benchmark report\n", f"command: `{command.strip()}`\n"]
    md += [f"- {k}: {v}" for k, v in env.items()]
    progress = Progress(len(names))
    t0 = time.perf_counter()
    for name in names:
        try:
            mod = importlib.import_module(f"{__package__}.benchmarks.bench_{name}")
            kw = {"progress": progress.item} if "progress" in inspect.signature(mod.run).parameters else {}
            rows = mod.run(quick=args.quick, device=device, **kw)
            error = None
        except Exception as exc:  # one broken benchmark must not hide the others; it is reported
            rows, error = [], f"{type(exc).__name__}: {exc}"
        progress.step(name)
        report["ops"][name] = {"rows": rows, "error": error}
        md.append(f"\n## {name}\n")
        if error:
            md.append(f"benchmark failed: `{error}`\n")
        if rows:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            md.append(markdown_table(rows, cols))
            plots = _plot(name, rows, out_dir)
            md += [f"\n![{p}]({p})" for p in plots]
    progress.close()
    md.append(f"\ntotal time: {time.perf_counter() - t0:.1f} s\n")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    print(f"\nreport written to {os.path.join(out_dir, 'report.md')}")
    failed = [n for n, r in report["ops"].items() if r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
