"""python -m vitattn.gpucheck: the parts that run without a GPU (argument parsing, the plan and its
time budgets, budget handling with a fake clock, the summary files, the no-GPU exit)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from vitattn import gpucheck as gc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_arguments():
    a = gc.parse_args(["--out", "x"])
    assert a.out == "x" and a.budget == gc.DEFAULT_BUDGET and a.skip == [] and not a.dry_run
    a = gc.parse_args(["--out", "x", "--budget", "100", "--skip", "build", "--skip", "bench-masa"])
    assert a.budget == 100 and a.skip == ["build", "bench-masa"]
    with pytest.raises(SystemExit):
        gc.parse_args([])  # --out is required
    with pytest.raises(SystemExit):
        gc.parse_args(["--out", "x", "--budget", "1"])


def test_plan_fits_eight_minutes_and_covers_every_part(tmp_path):
    steps = gc.plan(ROOT, str(tmp_path), arch="sm_90a")
    names = [s.name for s in steps]
    assert names[:2] == ["environment", "build"]
    assert {"tests-masa-cuda", "tests-gpu-runtime", "tests-triton-ops"} <= set(names)
    assert {f"bench-{op}" for op in ("masa", "group_attention", "sinkhorn", "dynamixer")} <= set(names)
    # every step's own budget together (build included) stays inside the default budget
    assert sum(s.budget for s in steps) + gc.RESERVE <= gc.DEFAULT_BUDGET <= 8 * 60
    build = steps[1]
    assert build.env == {"VITATTN_CUDA_ARCHS": "sm_90a"}
    for s in steps[2:]:
        for arg in s.cmd:
            if arg.endswith(".py"):
                assert os.path.exists(arg), arg  # the test files and benchmark scripts exist
    bench = [s for s in steps if s.name == "bench-masa"][0]
    assert bench.cmd[2:4] == ["--device", "cuda"] and "--out-dir" in bench.cmd
    assert "--quick" in [s for s in gc.plan(ROOT, str(tmp_path), quick_bench=True) if s.name == "bench-masa"][0].cmd
    assert gc.cuda_arch((9, 0)) == "sm_90a" and gc.cuda_arch((8, 0)) == "sm_80"


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _fake_runner(clock, durations, rcs=None):
    """Steps take durations[name] seconds (capped at the allowed time, then time out)."""
    calls = []

    def run(cmd, env, timeout, log, cwd):
        name = os.path.basename(log)[:-4]
        calls.append((name, timeout))
        took = durations.get(name, 1.0)
        with open(log, "w") as f:
            f.write("fake\n")
        if took > timeout:
            clock.t += timeout
            return None, timeout
        clock.t += took
        return (rcs or {}).get(name, 0), took

    return run, calls


def _steps():
    return [gc.Step("environment", 10, None, min_seconds=0), gc.Step("build", 100, ["b"], min_seconds=30),
            gc.Step("tests-a", 100, ["t"], min_seconds=20), gc.Step("tests-b", 100, ["t"], min_seconds=20),
            gc.Step("bench-x", 50, ["x"], min_seconds=15)]


def test_budget_handling_skips_and_timeouts(tmp_path):
    clock = FakeClock()
    run, calls = _fake_runner(clock, {"build": 90, "tests-a": 150, "tests-b": 40, "bench-x": 10})
    summary = gc.execute(_steps(), str(tmp_path), ROOT, budget=180, run_command=run, clock=clock,
                         has_cuda_ext=lambda: False, env_info=lambda repo: {"gpu": "fake"})
    st = {s["name"]: s for s in summary["steps"]}
    assert st["environment"]["status"] == "passed"
    assert st["build"]["status"] == "passed"
    # tests-a may use only what is left of the whole budget (180 - 90 - reserve) and times out
    assert st["tests-a"]["status"] == "timed out" and "budget" in st["tests-a"]["detail"]
    assert dict(calls)["tests-a"] == pytest.approx(180 - 90 - gc.RESERVE)
    # nothing is left for the rest: skipped, saying why
    for name in ("tests-b", "bench-x"):
        assert st[name]["status"] == "skipped" and "not enough time left" in st[name]["detail"]
    assert summary["ok"] is False and summary["seconds"] <= 180
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["steps"][2]["status"] == "timed out"
    report = (tmp_path / "report.md").read_text()
    assert "timed out" in report and "not enough time left" in report and "gpu: fake" in report
    assert (tmp_path / "logs" / "environment.log").exists() and (tmp_path / "logs" / "tests-a.log").exists()


def test_all_steps_pass_and_build_is_skipped_when_built(tmp_path):
    clock = FakeClock()
    run, calls = _fake_runner(clock, {}, rcs={})
    summary = gc.execute(_steps(), str(tmp_path), ROOT, budget=480, run_command=run, clock=clock,
                         has_cuda_ext=lambda: True, env_info=lambda repo: {})
    st = {s["name"]: s for s in summary["steps"]}
    assert st["build"]["status"] == "skipped" and "already" in st["build"]["detail"]
    assert "build" not in dict(calls)
    assert summary["ok"] is True
    # each step got its own budget (nothing else constrained it)
    assert dict(calls)["tests-a"] == 100 and dict(calls)["bench-x"] == 50


def test_failed_step_and_junit_counts(tmp_path):
    clock = FakeClock()
    run, _ = _fake_runner(clock, {}, rcs={"tests-b": 1})
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "tests-b.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="1" skipped="2"/></testsuites>')
    summary = gc.execute(_steps(), str(tmp_path), ROOT, budget=480, run_command=run, clock=clock,
                         has_cuda_ext=lambda: True, env_info=lambda repo: {})
    st = {s["name"]: s for s in summary["steps"]}
    assert st["tests-b"]["status"] == "failed"
    assert st["tests-b"]["detail"] == "exit code 1; 1 passed, 2 failed, 2 skipped"
    assert summary["ok"] is False


def test_real_command_runner_times_out(tmp_path):
    log = str(tmp_path / "sleep.log")
    rc, secs = gc._run_command([sys.executable, "-c", "import time; time.sleep(30)"], {}, 1.0, log, str(tmp_path))
    assert rc is None and secs < 20
    rc, _ = gc._run_command([sys.executable, "-c", "print('hi')"], {}, 60.0, log, str(tmp_path))
    assert rc == 0 and "hi" in open(log).read()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_gpu_stops_at_once(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "vitattn.gpucheck", "--out", str(out)], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert res.returncode == gc.NO_GPU_EXIT
    assert "no CUDA device" in res.stderr and "Nothing was run" in res.stderr
    assert not out.exists()  # nothing was started


def test_dry_run_prints_the_plan():
    res = subprocess.run([sys.executable, "-m", "vitattn.gpucheck", "--out", "unused", "--dry-run"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert "tests-gpu-runtime" in res.stdout and "bench-dynamixer" in res.stdout and "480" in res.stdout
