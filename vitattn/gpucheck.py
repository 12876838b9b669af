"""Validate a GPU machine in one command: ``python -m vitattn.gpucheck --out DIR``.

Runs, in order and each within its own time budget (seconds):

1. ``environment`` -- GPU, driver, torch / Triton versions, commit (into the summary);
2. ``build``       -- builds vitattn._C with its CUDA kernels for this GPU's architecture
   when the installed one lacks them (``pip install --no-build-isolation --no-deps -e .``);
3. ``tests-*``     -- the GPU tests with pytest: the "cuda" MaSA backend
   (tests/test_masa_cuda.py), host synchronisation and CUDA-graph capture
   (tests/test_gpu_runtime.py), then the op test files, whose Triton cases (bf16 included)
   run on the GPU when one is present;
4. ``bench-*``     -- every benchmark's GPU shape set, ``python benchmarks/bench_<op>.py
   --device cuda --out-dir DIR/benchmarks``;

and writes DIR/summary.json (one entry per step: status, seconds, budget, command, log),
DIR/report.md and DIR/logs/<step>.log. The whole run is planned to finish within
``--budget`` seconds (default 480, i.e. under 8 minutes on one H100/H200): a step gets the
smaller of its own budget and what is left after the summary's reserve; a step that does
not fit in what is left is skipped and says so; a step that runs out of its budget is
stopped and reported as timed out. Without a CUDA device it stops at once (exit code 2).

Needs a source checkout (the tests and benchmarks): found from this package's location, or
given with ``--repo``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

DEFAULT_BUDGET = 480.0
# seconds kept back for writing the summary and report
RESERVE = 5.0
NO_GPU_EXIT = 2


@dataclass
class Step:
    name: str
    budget: float  # seconds this step may take at most
    cmd: Optional[List[str]] = None  # None: run in-process (environment)
    env: Dict[str, str] = field(default_factory=dict)
    min_seconds: float = 10.0  # skipped when less than this is left
    why: str = ""  # what the step checks, for the report


@dataclass
class Result:
    name: str
    status: str  # passed, failed, timed out, skipped
    seconds: float
    budget: float
    command: str = ""
    log: str = ""
    detail: str = ""


def find_repo(explicit: Optional[str] = None) -> str:
    """The source checkout holding tests/ and benchmarks/ (explicit, or above this package)."""
    cands = [explicit] if explicit else [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.getcwd()]
    for c in cands:
        if c and os.path.isdir(os.path.join(c, "tests")) and os.path.isdir(os.path.join(c, "benchmarks")):
            return os.path.abspath(c)
    raise SystemExit(f"gpucheck: no source checkout with tests/ and benchmarks/ found (looked in {cands}); "
                     "run it from the repository or pass --repo PATH")


def cuda_arch(capability) -> str:
    """(9, 0) -> 'sm_90a' (the architecture-specific target the Triton and CUDA kernels use on Hopper)."""
    major, minor = capability
    return f"sm_{major}{minor}" + ("a" if major >= 9 else "")


def plan(repo: str, out: str, python: str = sys.executable, arch: Optional[str] = None,
         benches: Optional[Sequence[str]] = None, quick_bench: bool = False) -> List[Step]:
    """The steps of a validation run, in order, with their own time budgets (seconds)."""
    tests = os.path.join(repo, "tests")
    logs = os.path.join(out, "logs")

    def pytest(name: str, files: Sequence[str], budget: float, why: str, extra: Sequence[str] = ()) -> Step:
        junit = os.path.join(logs, f"{name}.xml")
        cmd = [python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}",
               *[os.path.join(tests, f) for f in files], *extra]
        return Step(name, budget, cmd, why=why, min_seconds=20.0)

    steps = [
        Step("environment", 10.0, None, min_seconds=0.0, why="GPU, driver, versions, commit"),
        Step("build", 120.0, [python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", repo],
             env={"VITATTN_CUDA_ARCHS": arch} if arch else {}, min_seconds=60.0,
             why="vitattn._C with its CUDA kernels (skipped when already built with them)"),
        pytest("tests-masa-cuda", ["test_masa_cuda.py"], 60.0, "MaSA 'cuda' backend vs the reference, fp32/fp16/bf16"),
        pytest("tests-gpu-runtime", ["test_gpu_runtime.py"], 40.0,
               "no host synchronisation (sync debug mode 'error'); RMT block fwd+bwd in a CUDA graph"),
        pytest("tests-triton-ops", ["test_masa.py", "test_group_attention.py", "test_sinkhorn.py",
                                    "test_dynamixer.py"], 100.0,
               "every op's Triton backend on the GPU against the references (bf16 included)",
               extra=["-k", "triton or bf16 or gpu or cuda"]),
    ]
    names = list(benches) if benches is not None else ["masa", "group_attention", "sinkhorn", "dynamixer"]
    for op in names:
        script = os.path.join(repo, "benchmarks", f"bench_{op}.py")
        cmd = [python, script, "--device", "cuda", "--out-dir", os.path.join(out, "benchmarks")]
        if quick_bench:
            cmd.insert(2, "--quick")
        steps.append(Step(f"bench-{op}", 30.0, cmd, min_seconds=15.0, why=f"benchmarks/bench_{op}.py GPU shape set"))
    return steps


def _run_command(cmd: List[str], env: Dict[str, str], timeout: float, log_path: str, cwd: str):
    """(return code or None on timeout, seconds); stdout and stderr go to log_path."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **env}, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            # the whole process group: pytest workers and compilers with it
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
    return rc, time.monotonic() - t0


def environment(repo: str) -> Dict[str, object]:
    import torch

    info: Dict[str, object] = dict(python=platform.python_version(), torch=torch.__version__,
                                   torch_cuda=torch.version.cuda, platform=platform.platform())
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # reported, not fatal: the Triton tests then fail with the reason
        info["triton"] = f"unavailable: {exc}"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1),
                    smem_per_block_optin=getattr(p, "shared_memory_per_block_optin", None),
                    devices=torch.cuda.device_count())
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                        timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["dirty"] = bool(dirty)
    except Exception:
        info["commit"] = "unknown"
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        info["driver"] = "unknown"
    return info


def extension_has_cuda(python: str = sys.executable) -> bool:
    """Whether the importable vitattn._C was built with its CUDA kernels (in a fresh process)."""
    code = "import vitattn._C as C; print(int(bool(getattr(C, 'with_cuda', False))))"
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    return res.returncode == 0 and res.stdout.strip().endswith("1")


def _junit_counts(path: str) -> str:
    """'N passed, F failed, S skipped' from a pytest junit XML file ('' if absent)."""
    if not os.path.exists(path):
        return ""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return ""
    suites = [root] if root.tag == "testsuite" else list(root)
    tests = sum(int(s.get("tests", 0)) for s in suites)
    failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
    skipped = sum(int(s.get("skipped", 0)) for s in suites)
    return f"{tests - failed - skipped} passed, {failed} failed, {skipped} skipped"


def execute(steps: List[Step], out: str, repo: str, budget: float = DEFAULT_BUDGET,
            run_command: Callable = _run_command, clock: Callable[[], float] = time.monotonic,
            has_cuda_ext: Callable[[], bool] = extension_has_cuda,
            env_info: Callable[[str], Dict[str, object]] = environment) -> Dict[str, object]:
    """Run the steps within budget seconds in all; write DIR/summary.json, report.md, logs/."""
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    start = clock()
    results: List[Result] = []
    info: Dict[str, object] = {}
    for st in steps:
        left = budget - (clock() - start) - RESERVE
        allowed = min(st.budget, left)
        if allowed < st.min_seconds:
            results.append(Result(st.name, "skipped", 0.0, st.budget,
                                  detail=f"not enough time left: {max(0.0, left):.0f} s of the {budget:.0f} s "
                                         f"budget remain, the step needs at least {st.min_seconds:.0f} s"))
            continue
        log = os.path.join(logs, f"{st.name}.log")
        cmd_text = " ".join(shlex.quote(c) for c in st.cmd) if st.cmd else ""
        if st.name == "environment":
            t0 = clock()
            info = env_info(repo)
            with open(log, "w") as f:
                json.dump(info, f, indent=2)
            results.append(Result(st.name, "passed", clock() - t0, st.budget, log=log))
            continue
        if st.name == "build" and has_cuda_ext():
            results.append(Result(st.name, "skipped", 0.0, st.budget,
                                  detail="vitattn._C already has its CUDA kernels"))
            continue
        rc, secs = run_command(st.cmd, st.env, allowed, log, repo)
        if rc is None:
            status = "timed out"
            detail = f"stopped after {allowed:.0f} s (its budget)"
        else:
            status = "passed" if rc == 0 else "failed"
            detail = "" if rc == 0 else f"exit code {rc}"
        counts = _junit_counts(os.path.join(logs, f"{st.name}.xml"))
        if counts:
            detail = (detail + "; " if detail else "") + counts
        results.append(Result(st.name, status, round(secs, 1), st.budget, cmd_text, log, detail))
    summary = dict(
        ok=all(r.status in ("passed", "skipped") for r in results) and
        not any(r.status == "skipped" and r.detail.startswith("not enough time") for r in results),
        seconds=round(clock() - start, 1), budget=budget, environment=info,
        steps=[asdict(r) for r in results],
    )
    write_summary(summary, out)
    return summary


def write_summary(summary: Dict[str, object], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    env = summary.get("environment") or {}
    lines = ["# vitattn GPU validation", ""]
    if env:
        lines += [f"- {k}: {v}" for k, v in env.items()] + [""]
    lines += [f"Total {summary['seconds']} s of a {summary['budget']} s budget; "
              f"{'all steps passed' if summary['ok'] else 'NOT all steps passed'}.", "",
              "| step | status | seconds | budget | detail |", "|---|---|---|---|---|"]
    for s in summary["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['budget']} | {s['detail']} |")
    lines.append("")
    for s in summary["steps"]:
        if s["command"]:
            lines.append(f"- `{s['name']}`: `{s['command']}` (log: {os.path.relpath(s['log'], out)})")
    bench_dir = os.path.join(out, "benchmarks")
    if os.path.isdir(bench_dir):
        for name in sorted(os.listdir(bench_dir)):
            if name.endswith(".md"):
                with open(os.path.join(bench_dir, name)) as f:
                    lines += ["", f"## {name}", "", f.read()]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def no_gpu_message() -> Optional[str]:
    """None when a CUDA device is usable, else why not."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
    return (f"gpucheck: no CUDA device is usable here (torch {torch.__version__}, a {build} build; "
            "torch.cuda.is_available() is False). Nothing was run: this command validates a GPU machine.")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vitattn.gpucheck", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for summary.json, report.md and logs/")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole run (default 480)")
    ap.add_argument("--repo", default=None, help="source checkout (default: the one holding this package)")
    ap.add_argument("--skip", action="append", default=[], metavar="STEP",
                    help="leave out a step (repeatable), e.g. --skip build")
    ap.add_argument("--quick-bench", action="store_true", help="pass --quick to the benchmarks")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    if args.budget <= RESERVE:
        ap.error(f"--budget must be more than {RESERVE:.0f} seconds")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    repo = find_repo(args.repo)
    out = os.path.abspath(args.out)
    if not args.dry_run:
        why = no_gpu_message()
        if why is not None:
            print(why, file=sys.stderr)
            return NO_GPU_EXIT
    arch = None
    if not args.dry_run:
        import torch

        arch = cuda_arch(torch.cuda.get_device_capability(0))
    steps = [s for s in plan(repo, out, arch=arch, quick_bench=args.quick_bench) if s.name not in set(args.skip)]
    unknown = set(args.skip) - {s.name for s in plan(repo, out)}
    if unknown:
        print(f"gpucheck: --skip names no step: {sorted(unknown)}", file=sys.stderr)
        return 1
    if args.dry_run:
        total = 0.0
        for s in steps:
            total += s.budget
            print(f"{s.name:20s} budget {s.budget:5.0f} s  {' '.join(s.cmd) if s.cmd else '(in-process)'}")
        print(f"sum of step budgets {total:.0f} s; whole run limited to {args.budget:.0f} s")
        return 0
    summary = execute(steps, out, repo, args.budget)
    print(open(os.path.join(out, "report.md")).read())
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
