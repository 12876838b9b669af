"""The main job's report (vitattn/bench.py) from a small result set, and the CPU peak-memory
helper the benchmarks share (benchmarks/common.py)."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

from vitattn import bench
from vitattn.benchmarks import common

CPU = torch.device("cpu")
FLEX_REASON = "FlexAttention does not support backward on CPU. Please set the input requires_grad to False."


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- a small benchmark, measured for real


def _dense(q, k, v):
    """The naive code: the (heads, N, N) logits and probabilities materialised."""
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


def _chunked(q, k, v):
    """Something that never holds more than 64 query rows' logits (stands in for vitattn)."""
    return torch.cat([_dense(q[:, :, i:i + 64], k, v) for i in range(0, q.shape[2], 64)], 2)


class FakeAttention:
    """A benchmark module: run(quick, device, progress) -> rows in the common schema, except that
    the peer uses the legacy "impl" key and FlexAttention's backward is a legacy failure note."""

    @staticmethod
    def run(quick, device, progress=None):
        rows = []
        for n in (256, 512):
            g = torch.Generator().manual_seed(n)
            q, k, v = (torch.randn(1, 2, n, 16, generator=g, requires_grad=True) for _ in range(3))
            dy = torch.randn(1, 2, n, 16, generator=g)
            methods = [("vitattn:auto", _chunked, dict(backend="chunked")), ("naive_dense", _dense, {}),
                       ("sdpa_no_bias", F.scaled_dot_product_attention, {})]
            for name, fn, extra in methods:
                if progress:
                    progress(f"N={n} {name}")

                def fwd_bwd(fn=fn):
                    torch.autograd.grad(fn(q, k, v), (q, k, v), dy)

                with torch.no_grad():
                    fn(q, k, v)
                rows.append(dict(form="full", heads=2, N=n, d=16, dtype="float32", method=name,
                                 fwd_ms=common.time_fn(lambda fn=fn: fn(q, k, v), device, warmup=1, repeats=1),
                                 fwd_bwd_ms=common.time_fn(fwd_bwd, device, warmup=1, repeats=1),
                                 peak_mib=common.peak_memory_mb(fwd_bwd, device), **extra))
            rows.append(dict(form="full", heads=2, N=n, d=16, dtype="float32", impl="compiled peer",
                             fwd_ms=rows[-2]["fwd_ms"] * 0.8, note=f"failed: NotImplementedError: {FLEX_REASON}"))
            print(f"N={n}: done")  # a benchmark's own printout: kept out of the job's stdout
            os.write(2, b"USDT:2026-12-01 01:16:27 8282:8282 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
            os.write(1, b"[W1201 CPUAllocator.cpp:245] Memory block of unknown size was allocated before the "
                        b"profiling started, profiler results will not include the deallocation event\n")
        return rows


class FakeLegacyThreads:
    """Legacy keys ("impl", a grid side L), two thread counts, a forward that ran out of memory."""

    @staticmethod
    def run(quick, device):
        rows = []
        for threads in (1, 2):
            for L, d in ((16, 2), (32, 2), (32, 8)):
                base = L * L * d / 1000
                for impl, t in (("official eager", 2.0), ("official compiled", 1.5), ("vitattn torch", 1.0)):
                    rows.append(dict(shape=f"S{L}-{d}", L=L, d=d, threads=threads, dtype="float32", impl=impl,
                                     fwd_ms=base * t / threads, fwd_bwd_ms=3 * base * t / threads,
                                     peak_mib=0.5 * L * t))
        rows[-1]["fwd_ms"] = "OOM"
        return rows


class FakeBroken:
    @staticmethod
    def run(quick, device):
        raise RuntimeError("this benchmark is broken")


MODULES = {"fake_attention": FakeAttention, "fake_legacy": FakeLegacyThreads}


class _FdCapture:
    """What reaches file descriptors 1 and 2 (a module fixture cannot use capfd)."""

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.files = [tempfile.TemporaryFile() for _ in range(2)]
        self.saved = [os.dup(1), os.dup(2)]
        self.streams = sys.stdout, sys.stderr
        for fd, f in zip((1, 2), self.files):
            os.dup2(f.fileno(), fd)
        # Python-level writes go to the same descriptors (pytest may have replaced sys.stdout)
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
        return self

    def __exit__(self, *exc):
        for s in (sys.stdout, sys.stderr):
            s.flush()
            s.close()
        sys.stdout, sys.stderr = self.streams
        for fd, old in zip((1, 2), self.saved):
            os.dup2(old, fd)
            os.close(old)
        self.out, self.err = [(f.seek(0), f.read().decode("utf-8"), f.close())[1] for f in self.files]


def _run_main(out, modules=MODULES, extra=()):
    with _FdCapture() as cap:
        code = bench.main(["--device", "cpu", "--out-dir", str(out), *extra], modules=dict(modules))
    with open(out / "report.json") as f:
        report = json.load(f)
    with open(out / "report.md") as f:
        md = f.read()
    return code, report, md, cap


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The main job on the fake benchmarks, once (with plots where matplotlib is installed):
    (exit code, report.json, report.md, captured output, out dir)."""
    out = tmp_path_factory.mktemp("report")
    (out / "fake_attention_fwd_bwd_ms.png").write_bytes(b"stale")  # an old report's plot
    (out / "masa_time.png").write_bytes(b"stale")  # a benchmark this run does not run
    threads = torch.get_num_threads()
    try:
        return (*_run_main(out), out)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- the job: output, report, plots


def test_output_progress_on_stderr_one_line_on_stdout(job):
    code, report, md, cap, out = job
    assert code == 0
    # stdout: one line, where the report is and the headline numbers; progress on stderr only
    lines = cap.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("report: ") and str(out / "report.md") in lines[0]
    assert re.search(r"fake_attention \d+\.\d\d×/\d+\.\d\d×", lines[0])
    assert "[1/2] fake_attention: 8 rows" in cap.err and "[2/2] fake_legacy: 18 rows" in cap.err
    assert "N=256: done" not in cap.out + cap.err  # the benchmark's printout went to report.json
    assert "N=256: done" in report["ops"]["fake_attention"]["output"]
    for noise in ("USDT", "Memory block of unknown size", "SyncActivityProfilerHandler"):
        assert noise not in cap.out and noise not in cap.err
        assert not any(noise in line for op in report["ops"].values() for line in op["output"])


def test_plots_written_and_stale_ones_removed(job, tmp_path):
    pytest.importorskip("matplotlib")
    code, report, md, cap, out = job
    names = sorted(os.listdir(out))
    assert "fake_attention_fwd_bwd_ms.png" not in names and "masa_time.png" not in names
    for op in MODULES:
        for kind in bench.PLOT_KINDS:
            png = out / f"{op}_{kind}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
            assert f"![{op}_{kind}.png]({op}_{kind}.png)" in md
    # a run that makes no plots removes them, and its report shows none
    for name in names:
        if name.endswith(".png"):
            (tmp_path / name).write_bytes(b"old")
    code, report2, md2, cap2 = _run_main(tmp_path, modules={"fake_legacy": FakeLegacyThreads}, extra=("--no-plots",))
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".png")]
    assert "![" not in md2


def test_report_structure(job):
    code, report, md, cap, out = job
    ops = report["ops"]
    # summary first, then one section per op in the order run, then the environment
    heads = re.findall(r"^## (.+)$", md, flags=re.M)
    assert heads == ["Summary", "fake_attention", "fake_legacy", "Environment"]
    summary = md.split("## Summary")[1].split("## fake_attention")[0]
    assert "| op | backend (auto) | device | threads | dtype |" in summary
    # fake_attention: one row; fake_legacy: one per thread count, its auto stand-in footnoted
    assert len(re.findall(r"^\| fake_attention \| chunked \| cpu \| 1 \| float32 \| 2 \|", summary, re.M)) == 1
    assert len(re.findall(r"^\| fake_legacy \| torch \[\^\d+\] \| cpu \| [12] \|", summary, re.M)) == 2
    assert "the first vitattn backend it lists" in summary
    assert "peak bytes allocated through PyTorch's CPU allocator" in md

    # the speed-ups are the naive time over vitattn's, per shape, their geomean in the summary
    rows = ops["fake_attention"]["rows"]
    ratios = []
    for n in (256, 512):
        auto = next(r for r in rows if r["N"] == n and r["role"] == "auto")
        naive = next(r for r in rows if r["N"] == n and r["role"] == "naive")
        ratios.append(naive["fwd_bwd_ms"] / auto["fwd_bwd_ms"])
    s = next(x for x in report["summary"] if x["op"] == "fake_attention")
    assert s["vs_naive_fwd_bwd_ms"]["geomean"] == pytest.approx(math.sqrt(ratios[0] * ratios[1]))
    legacy = [x for x in report["summary"] if x["op"] == "fake_legacy"]
    assert sorted(x["threads"] for x in legacy) == [1, 2]
    for x in legacy:  # official eager 2.0, vitattn torch 1.0, official compiled 1.5 (the only peer)
        assert x["vs_naive_fwd_bwd_ms"]["geomean"] == pytest.approx(2.0)
        assert x["vs_peer_fwd_bwd_ms"]["geomean"] == pytest.approx(1.5)

    # roles: the bound (no bias) is no peer; legacy "impl" became the method
    roles = {r["method"]: r["role"] for r in rows}
    assert roles == {"vitattn:auto": "auto", "naive_dense": "naive", "sdpa_no_bias": "bound", "compiled peer": "peer"}

    # a comparison that cannot run here is n/a with its reason as a footnote, not a failure
    flex = [r for r in rows if r["method"] == "compiled peer"]
    assert all(r["unavailable"]["fwd_bwd_ms"] == FLEX_REASON and not r.get("failed") for r in flex)
    section = md.split("## fake_attention")[1].split("## fake_legacy")[0]
    marks = re.findall(r"\| compiled peer \|[^\n]*?n/a (\[\^\d+\])", section)
    assert len(marks) == 2 and marks[0] == marks[1]
    assert f"{marks[0]}: {FLEX_REASON}" in section
    assert "failed" not in section
    oom = md.split("## fake_legacy")[1]
    assert re.search(r"n/a \[\^(\d+)\]", oom) and "out of memory on this device" in oom


def test_dense_reference_memory_is_its_n_by_n_cost(job):
    code, report, md, cap, out = job
    rows = report["ops"]["fake_attention"]["rows"]
    for n in (256, 512):
        naive = next(r for r in rows if r["N"] == n and r["role"] == "naive")
        chunked = next(r for r in rows if r["N"] == n and r["role"] == "auto")
        logits_mib = 2 * n * n * 4 / 2**20  # one (heads, N, N) fp32 tensor
        assert naive["peak_mib"] >= 2 * logits_mib  # logits and probabilities, at least
        assert 0 < chunked["peak_mib"] < naive["peak_mib"]
    # and the comparison table shows it (the naive peak column is not 0)
    table = md.split("## fake_attention")[1].split("All rows")[0]
    line = next(x for x in table.splitlines() if x.startswith("| N=512"))
    assert float(line.split("|")[8]) >= 2 * 2 * 512 * 512 * 4 / 2**20


def test_plot_data_one_series_per_method(job):
    code, report, md, cap, out = job
    for op, data in report["ops"].items():
        rows = data["rows"]
        pd = data["plot_data"]
        assert pd["time"] and pd["memory"], op
        for kind in ("time", "memory"):
            covered = []
            for panel in pd[kind]:
                members = [r for r in rows if all(r.get(k) == v for k, v in panel["keys"].items())]
                assert set(panel["series"]) == {r["method"] for r in members}, (op, panel["title"])
                for name, s in panel["series"].items():
                    for points in s["points"].values():
                        xs = [p[0] for p in points]
                        assert xs == sorted(set(xs)), (op, name, points)  # one point per size: a line
                covered += members
            assert len(covered) == len(rows)  # the panels split the rows, each row in one
        # fake_legacy splits by threads and by d (two shapes share L = 32)
        if op == "fake_legacy":
            assert {tuple(sorted(p["keys"])) for p in pd["time"]} == {("d", "threads")}
            assert {r["tokens"] for r in rows} == {256, 1024}
        sp = pd["speedup"]
        assert len(sp["labels"]) == len(set(sp["labels"])) == len(data["comparisons"])
        assert all(x is None or x > 0 for x in sp["fwd_bwd_ms"])


def test_failed_benchmark_is_reported_and_others_kept(tmp_path):
    code, report, md, cap = _run_main(tmp_path, modules={"broken": FakeBroken, "fake_legacy": FakeLegacyThreads},
                                      extra=("--no-plots",))
    assert code == 1
    assert "RuntimeError: this benchmark is broken" in report["ops"]["broken"]["error"]
    assert "| broken | benchmark failed |" in md and "## fake_legacy" in md
    out = cap.out.splitlines()
    assert len(out) == 1 and "FAILED: broken" in out[0]


def test_normalize_legacy_rows():
    r = bench.normalize_row("masa", dict(form="full", H=14, W=14, impl="vitattn:cpu", fwd_ms=1.0))
    assert (r["method"], r["role"], r["backend"], r["tokens"]) == ("vitattn:cpu", "backend", "cpu", 196)
    r = bench.normalize_row("x", dict(n=49, impl="reference eager", fwd_ms="OOM", fwd_bwd_ms="OOM"))
    assert r["role"] == "naive" and r["fwd_ms"] is None and r["unavailable"]["fwd_ms"].startswith("out of memory")
    r = bench.normalize_row("x", dict(method="rmt_reference", note="failed: ValueError: a real bug"))
    assert r["failed"] == "ValueError: a real bug" and "unavailable" not in r
    assert bench.infer_role("reference compiled") == "peer"
    assert bench.infer_role("official compiled") == "peer"
    assert bench.infer_role("vitattn auto") == "auto"
    r = common.mark_unavailable(dict(method="flex"), "no CPU backward", "fwd_bwd_ms", "peak_mib")
    n = bench.normalize_row("x", r)
    assert n["fwd_bwd_ms"] is None and n["unavailable"] == {"fwd_bwd_ms": "no CPU backward", "peak_mib": "no CPU backward"}


def test_one_benchmark_covering_several_ops():
    rows = [dict(op=op, n=n, dtype="float32", method=m, fwd_ms=t * n, fwd_bwd_ms=2 * t * n)
            for op in ("sinkhorn", "ot_attention") for n in (49, 196)
            for m, t in (("reference eager", 3.0), ("vitattn:auto", 1.0 if op == "sinkhorn" else 2.0))]
    report = bench.build_report({"sinkhorn": {"rows": rows, "error": None, "seconds": 1.0}},
                                {"device_type": "cpu", "cpu_threads": "1"}, "cmd", True)
    summary = {s["op"]: s for s in report["summary"]}
    assert set(summary) == {"sinkhorn", "sinkhorn: ot_attention"}
    assert summary["sinkhorn"]["vs_naive_fwd_ms"]["geomean"] == pytest.approx(3.0)
    assert summary["sinkhorn: ot_attention"]["vs_naive_fwd_ms"]["geomean"] == pytest.approx(1.5)
    panels = report["ops"]["sinkhorn"]["plot_data"]["time"]
    assert sorted(p["title"] for p in panels) == ["ot_attention", "sinkhorn"]
    assert "sinkhorn 3.00×/3.00×, sinkhorn: ot_attention 1.50×/1.50×" in bench.headline(report)


# ---------------------------------------------------------------- the CPU peak-memory helper


def test_cpu_peak_memory_counts_the_dense_result():
    a, b = torch.randn(2048, 64), torch.randn(64, 2048)
    a @ b  # warm up
    mib = common.peak_memory_mb(lambda: a @ b, CPU)  # a 2048 x 2048 fp32 result: 16 MiB
    assert 16 <= mib < 16.5


def test_cpu_peak_memory_is_zero_without_allocations():
    a, b = torch.randn(2048, 64), torch.randn(64, 2048)
    out = torch.empty(2048, 2048)
    torch.mm(a, b, out=out)
    assert common.peak_allocated_bytes(lambda: torch.mm(a, b, out=out), CPU) < 1024


def test_cpu_peak_memory_is_the_peak_not_the_sum():
    def fn():
        big = torch.ones(4 * 2**20)  # 16 MiB, freed before the next allocation
        del big
        return torch.ones(2**20)  # 4 MiB, alive at the end

    assert 16 * 2**20 <= common.peak_allocated_bytes(fn, CPU) < 17 * 2**20


def test_cpu_peak_memory_runs_the_call_on_one_thread():
    # the profiler records the calling thread's allocations only: the call runs single-threaded
    seen = []
    torch.set_num_threads(2)
    common.peak_allocated_bytes(lambda: seen.append(torch.get_num_threads()), CPU)
    assert seen == [1] and torch.get_num_threads() == 2


def test_cpu_peak_memory_keeps_profiler_noise_away(capfd):
    a = torch.randn(256, 256)
    early = torch.randn(1024)  # freed inside the profiled call: the allocator's "unknown size" warning

    def fn():
        nonlocal early
        early = None
        print("fn's own line")
        return a @ a

    common.peak_memory_mb(fn, CPU)
    cap = capfd.readouterr()
    assert "fn's own line" in cap.out
    for noise in ("USDT", "Memory block of unknown size", "profiler_start"):
        assert noise not in cap.out and noise not in cap.err


def test_time_alternating_shuffles_the_order_every_round():
    # every call once per round, and no call always behind the same one (a call's time
    # depends on what ran before it: caches, memory handed back to the OS)
    seen = []
    calls = {name: (lambda name=name: seen.append(name)) for name in "abcd"}
    wall, cpu = common.time_alternating(calls, warmup=0, repeats=12)
    rounds = [seen[i:i + 4] for i in range(0, len(seen), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1
    before_b = {r[r.index("b") - 1] for r in rounds if r[0] != "b"}
    assert len(before_b) > 1
    assert set(wall) == set(cpu) == set("abcd") and all(t >= 0 for t in wall.values())
    # the same order on a rerun (a fixed seed)
    again = []
    common.time_alternating({n: (lambda n=n: again.append(n)) for n in "abcd"}, warmup=0, repeats=12)
    assert again == seen


def test_time_alternating_medians_and_failing_calls():
    import time as _time

    def slow():
        _time.sleep(0.004)

    def broken():
        raise RuntimeError("cannot run here")

    wall, cpu = common.time_alternating({"slow": slow, "broken": broken, "fast": lambda: None}, warmup=1,
                                        repeats=5, skip_failing=True)
    assert wall["broken"] is None and cpu["broken"] is None
    assert wall["slow"] >= 4.0 > wall["fast"]
    assert cpu["slow"] < 4.0  # sleeping is not CPU time
    with pytest.raises(RuntimeError, match="cannot run here"):
        common.time_alternating({"broken": broken}, warmup=1, repeats=1)


def test_time_rounds_lists_and_max_time():
    import time as _time

    wall, cpu = common.time_rounds({"a": lambda: _time.sleep(0.002), "b": lambda: None}, warmup=0, repeats=7)
    assert len(wall["a"]) == len(wall["b"]) == len(cpu["a"]) == 7
    assert min(wall["a"]) >= 2.0 > max(wall["b"])
    # max_time stops after the round that passes it, but not before min_repeats rounds
    wall, _ = common.time_rounds({"a": lambda: _time.sleep(0.01)}, warmup=0, repeats=50, max_time=0.0,
                                 min_repeats=3)
    assert len(wall["a"]) == 3
    # time_alternating: the medians of the same rounds
    med, _ = common.time_alternating({"a": lambda: _time.sleep(0.002)}, warmup=0, repeats=5, max_time=0.0,
                                     min_repeats=2)
    assert med["a"] >= 2.0


def test_paired_ratio_follows_a_drifting_machine():
    # the machine slows down 3x halfway through: within each round b takes twice as long as a,
    # so every per-round ratio is 2; the ratio of the medians is not
    a = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0]
    b = [2.0, 2.0, 2.0, 6.0, 6.0, 6.0, 6.0]
    b_shifted = [2.0, 2.0, 2.0, 2.0, 6.0, 6.0, 6.0]  # in round 4 the slowdown came between a's call and b's
    assert common.paired_ratio(b, a) == 2.0
    assert common.paired_ratio(b_shifted, a) == 2.0
    assert abs(statistics.median(b_shifted) / statistics.median(a) - 2.0 / 3.0) < 1e-12
    with pytest.raises(ValueError, match="equally long"):
        common.paired_ratio([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="non-empty"):
        common.paired_ratio([], [])
