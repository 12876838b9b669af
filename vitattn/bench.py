"""The main job: ``python -m vitattn.bench [--quick]``.

Runs the benchmarks (benchmarks/bench_<op>.py and bench_models.py, installed as
vitattn.benchmarks; another bench_<name>.py joins by setting ``MAIN_JOB = True``) on the
best available device and writes one report: report.md (a summary
first: vitattn's default backend against the naive code and the best peer, per op; then a
section per op with its comparison table, plots and every row), report.json (the same data)
and PNG plots when matplotlib is installed (``pip install vitattn[bench]``). The report goes
to --out-dir, by default benchmarks/results/ in a source checkout, ./vitattn-bench-results
otherwise. Progress goes to stderr; stdout gets one line: where the report is and the
headline numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# run in this order; any other benchmarks/bench_<name>.py with a run() follows, by name
BENCHMARKS = ("masa", "sinkhorn", "group_attention", "dynamixer", "depthwise_conv", "models")
TIME_METRICS = ("fwd_ms", "fwd_bwd_ms")
MAIN_METRICS = TIME_METRICS + ("peak_mib",)
METRIC_LABEL = {"fwd_ms": "forward", "fwd_bwd_ms": "forward+backward"}
PLOT_KINDS = ("time", "memory", "speedup")
# keys that never describe the shape of a row
NOT_SHAPE = {"op", "method", "role", "backend", "note", "unavailable", "failed"}
_METRIC_NAME = re.compile(r"(_ms|_mib|_mb|_gb|gflops|flops|speedup|_s|_x|_frac|_fraction|_pct|_ratio|_bytes)$"
                          r"|^(vs_|saved|peak|speedup|frac|gflops|flops|compile_)")


# ============================================================ rows: the common schema


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def infer_role(method: str) -> str:
    """The role (benchmarks/common.py ROW_KEYS) of a row that does not state it, from its method."""
    m = method.lower()
    if re.search(r"(^|[^a-z])auto([^a-z]|$)", m) or m == "fused":
        return "auto"
    if m.startswith("vitattn") or m == "torch":  # bench_models names vitattn's torch backend "torch"
        return "backend"
    if re.search(r"no[_ -]?bias", m):
        return "bound"
    if "naive" in m or (re.search(r"reference|official", m) and "compile" not in m):
        return "naive"
    return "peer"


def _backend_of(method: str) -> Optional[str]:
    m = re.sub(r"^vitattn[\s:_/-]*", "", method, flags=re.I).strip(" ()")
    return m or None


def _tokens(row: Dict) -> Optional[int]:
    for key in ("tokens", "N", "n"):
        if _is_num(row.get(key)):
            return int(row[key])
    if _is_num(row.get("H")) and _is_num(row.get("W")):
        return int(row["H"] * row["W"])
    if _is_num(row.get("L")):  # DynaMixer: an L x L grid
        return int(row["L"] ** 2)
    return None


def _unavailable_reason(text: str) -> Optional[str]:
    """The reason when a failure says the comparison cannot run on this device (not a bug)."""
    if re.search(r"NotImplementedError|does not support|not supported|not implemented", text):
        return re.sub(r"^\s*\w*(Error|Exception):\s*", "", text).strip()
    return None


def normalize_row(op: str, row: Dict, defaults: Optional[Dict] = None) -> Dict:
    """A benchmark row in the common schema (benchmarks/common.py ROW_KEYS), legacy keys mapped:
    "impl" -> "method"; role/backend/tokens inferred when absent; a metric that holds a string
    ("OOM") or a failure that says the comparison cannot run here becomes n/a with its reason
    in "unavailable"; any other failure is kept in "failed"."""
    r = dict(row)
    if "method" not in r and "impl" in r:
        r["method"] = r.pop("impl")
    r["method"] = str(r.get("method", "?"))
    r.setdefault("op", op)
    for k, v in (defaults or {}).items():
        r.setdefault(k, v)
    r["role"] = r.get("role") or infer_role(r["method"])
    if not r.get("backend") and r["role"] == "backend":
        r["backend"] = _backend_of(r["method"])
    if r.get("tokens") is None:
        tokens = _tokens(r)
        if tokens is not None:
            r["tokens"] = tokens
    na = dict(r.get("unavailable") or {})
    for m in list(r):
        v = r[m]
        if isinstance(v, str) and _METRIC_NAME.search(m) and m not in NOT_SHAPE:
            if re.fullmatch(r"\s*OOM\s*|.*out of memory.*", v, flags=re.I):
                na[m], r[m] = "out of memory on this device", None
            elif re.match(r"\s*(error|failed)", v, flags=re.I):
                r.setdefault("failed", v)
                r[m] = None
    note = str(r.get("note") or "")
    if note.lower().startswith("failed:"):
        reason = note.split(":", 1)[1].strip()
        why = _unavailable_reason(reason)
        missing = [m for m in MAIN_METRICS if not _is_num(r.get(m))]
        if why and missing:
            for m in missing:
                na.setdefault(m, why)
            r["note"] = ""
        else:
            r["failed"] = reason
    if na:
        r["unavailable"] = na
    return r


def shape_keys(rows: Sequence[Dict]) -> List[str]:
    """The keys that describe a row's shape (and setting: dtype, threads): every key but the
    method/role ones and the metrics (float values or metric-like names), in first-seen order;
    "op" first when one benchmark's rows cover several ops."""
    keys: Dict[str, bool] = {"op": len({r.get("op") for r in rows}) > 1}
    for r in rows:
        for k, v in r.items():
            if k == "op":
                continue
            if k in NOT_SHAPE or _METRIC_NAME.search(k) or isinstance(v, (float, dict, list)):
                keys[k] = False
            else:
                keys.setdefault(k, True)
    return [k for k, ok in keys.items() if ok]


def _varying(rows: Sequence[Dict], keys: Iterable[str]) -> List[str]:
    return [k for k in keys if len({repr(r.get(k)) for r in rows}) > 1]


# ============================================================ comparisons


def _geomean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if _is_num(x) and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def compare(rows: Sequence[Dict]) -> List[Dict]:
    """One comparison per shape: vitattn's default ("auto") row against the naive code and the
    best peer (per metric: the fastest peer row), as speed-ups (other time / vitattn time)."""
    keys = shape_keys(rows)
    groups: Dict[Tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault(tuple(repr(r.get(k)) for k in keys), []).append(r)
    out = []
    for members in groups.values():
        auto = next((r for r in members if r["role"] == "auto"), None)
        stand_in = auto is None
        if stand_in:  # no "auto" row: the first vitattn backend listed (benchmarks list them in dispatch order)
            auto = next((r for r in members if r["role"] == "backend"), None)
        if auto is None:
            continue
        naive = next((r for r in members if r["role"] == "naive"), None)
        peers = [r for r in members if r["role"] == "peer"]
        c: Dict[str, Any] = {"shape": {k: members[0].get(k) for k in keys}, "auto": auto, "stand_in": stand_in,
                             "naive": naive, "best_peer": {}, "vs_naive": {}, "vs_peer": {}}
        for m in TIME_METRICS:
            mine = auto.get(m)
            ran = [p for p in peers if _is_num(p.get(m))]
            best = min(ran, key=lambda p: p[m]) if ran else None
            c["best_peer"][m] = best
            ok = _is_num(mine) and mine > 0
            c["vs_naive"][m] = naive[m] / mine if ok and naive is not None and _is_num(naive.get(m)) else None
            c["vs_peer"][m] = best[m] / mine if ok and best is not None else None
        out.append(c)
    return out


def summarize(op: str, comparisons: Sequence[Dict], device: str) -> List[Dict]:
    """Summary rows of one op: one per (threads, dtype), geometric means and ranges over shapes."""
    by_setting: Dict[Tuple, List[Dict]] = {}
    for c in comparisons:
        a = c["auto"]
        by_setting.setdefault((a.get("op"), a.get("threads"), a.get("dtype")), []).append(c)
    out = []
    for (row_op, threads, dtype), cs in by_setting.items():
        backends = list(dict.fromkeys(str(c["auto"].get("backend") or "not recorded") for c in cs))
        label = op if row_op in (None, op) else f"{op}: {row_op}"  # a benchmark that covers several ops
        row = {"op": label, "backend": ", ".join(backends), "device": device, "threads": threads, "dtype": dtype,
               "shapes": len(cs), "stand_in": any(c["stand_in"] for c in cs)}
        for kind in ("vs_naive", "vs_peer"):
            for m in TIME_METRICS:
                vals = [c[kind][m] for c in cs if _is_num(c[kind][m])]
                row[f"{kind}_{m}"] = {"geomean": _geomean(vals), "min": min(vals) if vals else None,
                                      "max": max(vals) if vals else None, "n": len(vals)}
        out.append(row)
    return out


# ============================================================ plots


def _panel_keys(rows: Sequence[Dict]) -> List[str]:
    """Keys that split an op's rows into plot panels so that, within a panel, each method has at
    most one point per problem size: "form", dtype and threads when they vary, then (greedily)
    whichever other shape key removes the most collisions with the fewest panels."""
    keys = [k for k in shape_keys(rows) if k != "tokens"]
    chosen = [k for k in ("op", "form", "dtype", "threads") if k in keys and _varying(rows, [k])]

    def collisions(ks):
        seen: Dict[Tuple, int] = {}
        for r in rows:
            key = (tuple(repr(r.get(k)) for k in ks), r["method"], r.get("tokens"))
            seen[key] = seen.get(key, 0) + 1
        panels = len({tuple(repr(r.get(k)) for k in ks) for r in rows})
        return sum(n - 1 for n in seen.values()), panels

    while True:
        dup, _ = collisions(chosen)
        if dup == 0:
            return chosen
        best = None
        for k in keys:
            if k in chosen or k == "shape":
                continue
            d, p = collisions(chosen + [k])
            if d < dup and (best is None or (d, p) < best[0]):
                best = ((d, p), k)
        if best is None:
            if "shape" in keys and "shape" not in chosen and collisions(chosen + ["shape"])[0] < dup:
                chosen.append("shape")
                continue
            return chosen
        chosen.append(best[1])


def _panel_title(keys: Sequence[str], values: Sequence[Any]) -> str:
    parts = [str(v) if k in ("op", "form", "shape", "dtype") else f"{k}={v}" for k, v in zip(keys, values)]
    parts = [p.replace("threads=", "threads ") for p in parts]
    return ", ".join(parts) or "all shapes"


def plot_data(rows: Sequence[Dict], comparisons: Sequence[Dict]) -> Dict[str, Any]:
    """What the plots draw, as data (tested without matplotlib): per panel one series per method,
    points (tokens, value) sorted by tokens; and vitattn's speed-up over the naive code per shape.
    An auto row's label names the backend it ran only when all its rows ran the same one."""
    plotted = [r for r in rows if _is_num(r.get("tokens"))]
    out: Dict[str, Any] = {"x": "tokens", "time": [], "memory": [], "speedup": None}
    if plotted:
        pkeys = _panel_keys(plotted)
        panels: Dict[Tuple, List[Dict]] = {}
        for r in plotted:
            panels.setdefault(tuple(r.get(k) for k in pkeys), []).append(r)
        for values, members in panels.items():
            title = _panel_title(pkeys, values)
            for kind, metrics in (("time", TIME_METRICS), ("memory", ("peak_mib",))):
                series: Dict[str, Dict[str, Any]] = {}
                for r in members:
                    s = series.setdefault(r["method"], {"role": r["role"], "points": {m: [] for m in metrics}})
                    for m in metrics:
                        if _is_num(r.get(m)):
                            s["points"][m].append((int(r["tokens"]), float(r[m])))
                for s in series.values():
                    for m in metrics:
                        s["points"][m].sort()
                if any(p for s in series.values() for p in s["points"].values()):
                    out[kind].append({"title": title, "keys": dict(zip(pkeys, values)), "series": series})
    labelled = [c for c in comparisons if any(_is_num(c["vs_naive"][m]) for m in TIME_METRICS)]
    if labelled:
        labels = shape_labels([c["shape"] for c in labelled])
        out["speedup"] = {"labels": labels, "backends": [str(c["auto"].get("backend") or "?") for c in labelled],
                          **{m: [c["vs_naive"][m] for c in labelled] for m in TIME_METRICS},
                          "naive": [c["naive"]["method"] for c in labelled]}
    return out


def shape_labels(shapes: Sequence[Dict]) -> List[str]:
    """Short distinct labels: the "shape" name if given, else the form and the problem size, plus
    whichever varying keys are needed to tell the shapes apart."""
    if not shapes:
        return []
    keys = list(shapes[0])
    order = [k for k in ("shape", "form") if k in keys]
    if "shape" not in order:
        order += [k for k in ("tokens",) if k in keys]
    varying = [k for k in keys if len({repr(s.get(k)) for s in shapes}) > 1]
    chosen = [k for k in order if k in varying or k in ("shape", "tokens")]
    for k in varying:
        if len({tuple(repr(s.get(c)) for c in chosen) for s in shapes}) == len(shapes):
            break
        if k not in chosen and k not in ("N", "n", "H", "W", "L") or (k in ("H", "W") and "tokens" not in chosen):
            before = len({tuple(repr(s.get(c)) for c in chosen) for s in shapes})
            if len({tuple(repr(s.get(c)) for c in chosen + [k]) for s in shapes}) > before:
                chosen.append(k)

    def fmt(k, v):
        if k in ("shape", "form"):
            return str(v)
        if k == "tokens":
            return f"N={v}"
        if k == "threads":
            return f"{v}t"
        return f"{k}={v}"

    return [" ".join(fmt(k, s.get(k)) for k in chosen if s.get(k) is not None) for s in shapes]


_ROLE_STYLE = {"auto": dict(lw=2.6, ls="-", marker="o"), "backend": dict(lw=1.4, ls="-", marker="s"),
               "naive": dict(lw=2.0, ls="--", marker="^", color="black"), "peer": dict(lw=1.4, ls="-.", marker="D"),
               "bound": dict(lw=1.2, ls=":", marker="x", color="0.55")}


def render_plots(op: str, data: Dict[str, Any], out_dir: str) -> List[str]:
    """PNGs of plot_data: <op>_time.png (log-log, forward and forward+backward side by side),
    <op>_memory.png, <op>_speedup.png. [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except Exception:
        return []
    plain = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    colors: Dict[str, Any] = {}
    palette = plt.get_cmap("tab10").colors

    def style(name, role):
        st = dict(_ROLE_STYLE.get(role, _ROLE_STYLE["peer"]))
        if "color" not in st:
            st["color"] = colors.setdefault(name, palette[len(colors) % len(palette)])
        return st

    def draw(ax, series, metric, ylabel, title):
        lows = []
        for name, s in sorted(series.items(), key=lambda kv: (list(_ROLE_STYLE).index(kv[1]["role"])
                                                              if kv[1]["role"] in _ROLE_STYLE else 9, kv[0])):
            pts = s["points"][metric]
            if not pts:
                continue
            st = style(name, s["role"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, color=st["color"], lw=st["lw"],
                    ls=st["ls"], marker=st["marker"], ms=5)
            lows += [p[1] for p in pts]
        ax.set_xscale("log")
        if lows and min(lows) <= 0:  # zeros have no place on a log axis: linear near zero
            ax.set_yscale("symlog", linthresh=max(1e-3, min([v for v in lows if v > 0] or [1.0])))
        else:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("problem size: tokens N (log)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        xs = sorted({p[0] for s in series.values() for p in s["points"][metric]})
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        if len(xs) <= 10:
            ax.xaxis.set_major_locator(ticker.FixedLocator(xs))
        ax.xaxis.set_major_formatter(plain)
        if len(xs) == 1:
            ax.set_xlim(xs[0] / 1.6, xs[0] * 1.6)
        ax.legend(fontsize=7, loc="best")

    files = []
    if data["time"]:
        n = len(data["time"])
        fig, axes = plt.subplots(n, 2, figsize=(11, 3.6 * n + 0.6), squeeze=False, layout="constrained")
        for i, panel in enumerate(data["time"]):
            for j, m in enumerate(TIME_METRICS):
                draw(axes[i][j], panel["series"], m, f"{METRIC_LABEL[m]} time, ms (log)",
                     f"{op} · {panel['title']} · {METRIC_LABEL[m]}")
        fig.suptitle(f"{op}: median time against problem size (lower is better)", fontsize=11)
        files.append(_save(fig, plt, out_dir, f"{op}_time.png"))
    if data["memory"]:
        n = len(data["memory"])
        cols = min(2, n)
        rows_ = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows_, cols, figsize=(max(8.0, 5.6 * cols), 3.8 * rows_ + 0.6), squeeze=False,
                                 layout="constrained")
        for i, panel in enumerate(data["memory"]):
            draw(axes[i // cols][i % cols], panel["series"], "peak_mib", "peak allocated, MiB (log)",
                 f"{op} · {panel['title']}")
        for i in range(n, rows_ * cols):
            axes[i // cols][i % cols].axis("off")
        fig.suptitle(f"{op}: peak memory allocated in one forward+backward (lower is better)", fontsize=11)
        files.append(_save(fig, plt, out_dir, f"{op}_memory.png"))
    sp = data.get("speedup")
    if sp:
        labels = sp["labels"]
        width = 0.38
        fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(labels) + 2), 4.4), layout="constrained")
        xs = list(range(len(labels)))
        for j, m in enumerate(TIME_METRICS):
            vals = [v if _is_num(v) and v > 0 else float("nan") for v in sp[m]]
            bars = ax.bar([x + (j - 0.5) * width for x in xs], vals, width, label=METRIC_LABEL[m],
                          color=("tab:blue", "tab:orange")[j])
            for b, v in zip(bars, sp[m]):
                y = v if _is_num(v) and v > 0 else 1.0
                ax.annotate(f"{v:.2f}×" if _is_num(v) else "n/a", (b.get_x() + b.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        finite = [v for m in TIME_METRICS for v in sp[m] if _is_num(v) and v > 0]
        ax.set_yscale("log")  # ratios: 2x faster and 2x slower are the same distance from 1
        ax.set_ylim(min(finite + [1.0]) / 1.5, max(finite + [1.0]) * 1.5)
        ax.yaxis.set_major_locator(ticker.FixedLocator([0.1, 0.2, 0.25, 0.5, 1, 2, 4, 5, 10, 20, 50, 100]))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(xs)
        ticks = [f"{lab}\n({be})" for lab, be in zip(labels, sp.get("backends") or ["?"] * len(labels))]
        ax.set_xticklabels(ticks, rotation=20 if len(labels) > 3 else 0, ha="right" if len(labels) > 3 else "center",
                           fontsize=8)
        ax.set_ylabel("speed-up over the naive code (×)")
        naive = ", ".join(dict.fromkeys(sp["naive"]))
        ax.set_title(f"{op}: speed-up of vitattn (auto) over the naive code ({naive})\nper shape; above 1× vitattn is faster",
                     fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.25)
        files.append(_save(fig, plt, out_dir, f"{op}_speedup.png"))
    return files


def _save(fig, plt, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)
    return name


def remove_stale_plots(out_dir: str) -> List[str]:
    """Delete the report PNGs in out_dir (this naming, <benchmark>_<kind>.png, and the previous
    one), whichever benchmarks made them: a new report must not sit beside old plots."""
    pattern = re.compile(r"^\w+_(time|memory|speedup|fwd_bwd_ms|peak_mib)\.png$")
    gone = []
    if os.path.isdir(out_dir):
        for f in sorted(os.listdir(out_dir)):
            if pattern.match(f):
                os.remove(os.path.join(out_dir, f))
                gone.append(f)
    return gone


# ============================================================ markdown


class Footnotes:
    """Numbered footnotes, one per distinct text (GitHub's [^n] syntax)."""

    def __init__(self):
        self.texts: Dict[str, int] = {}

    def ref(self, text: str) -> str:
        n = self.texts.setdefault(text, len(self.texts) + 1)
        return f"[^{n}]"

    def definitions(self, since: int = 0) -> List[str]:
        return [f"[^{n}]: {t}" for t, n in self.texts.items() if n > since]


def _fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if x == 0:
            return "0"
        a = abs(x)
        return f"{x:.3g}" if a < 1 else (f"{x:.3f}" if a < 10 else (f"{x:.2f}" if a < 100 else f"{x:.1f}"))
    return str(x)


def _ratio(x: Optional[float]) -> str:
    return f"{x:.2f}×" if _is_num(x) else "—"


def _cell(r: Dict, m: str, notes: Footnotes) -> str:
    v = r.get(m)
    if _is_num(v):
        return _fmt(v)
    why = (r.get("unavailable") or {}).get(m)
    if why:
        return "n/a " + notes.ref(why)
    if r.get("failed") and m in MAIN_METRICS:
        return "failed " + notes.ref(f"{r['method']}: {r['failed']}")
    return _fmt(v)


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")
    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    return "\n".join(out)


def _range(stat: Dict) -> str:
    if not stat or not _is_num(stat.get("geomean")):
        return "—"
    if stat["n"] == 1 or f"{stat['min']:.2f}" == f"{stat['max']:.2f}":
        return _ratio(stat["geomean"])
    return f"{_ratio(stat['geomean'])} ({stat['min']:.2f}–{stat['max']:.2f})"


def _rows_table(rows: Sequence[Dict], notes: Footnotes) -> str:
    keys = shape_keys(rows)
    if "tokens" in keys and any(all(r.get(k) == r.get("tokens") for r in rows) for k in keys if k != "tokens"):
        keys.remove("tokens")  # it repeats N (or n) in every row
    constant = [k for k in keys if k not in _varying(rows, keys)]
    shown_shape = [k for k in keys if k not in constant]
    metrics = [m for m in MAIN_METRICS if any(m in r for r in rows)]
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in keys and k not in NOT_SHAPE
                               and k not in metrics and k != "tokens"))
    header = shown_shape + ["method", "backend"] + metrics + extra + ["note"]
    body = []
    for r in rows:
        note = str(r.get("note") or "")
        body.append([_fmt(r.get(k)) for k in shown_shape] + [r["method"], _fmt(r.get("backend"))]
                    + [_cell(r, m, notes) for m in metrics] + [_cell(r, k, notes) for k in extra] + [note])
    lead = ("same for every row: " + ", ".join(f"{k} {_fmt(rows[0].get(k))}" for k in constant) + "\n\n") if constant else ""
    return lead + _table(header, body)


def _comparison_table(comparisons: Sequence[Dict], notes: Footnotes) -> str:
    if not comparisons:
        return ""
    labels = shape_labels([c["shape"] for c in comparisons])
    header = ["shape", "auto ran", "fwd ms", "fwd+bwd ms", "peak MiB", "naive: fwd ms", "fwd+bwd ms", "peak MiB",
              "fwd × naive", "fwd+bwd × naive", "best peer fwd", "× peer", "best peer fwd+bwd", "× peer"]
    body = []
    for label, c in zip(labels, comparisons):
        a, n = c["auto"], c["naive"]
        ran = str(a.get("backend") or "not recorded")
        if c["stand_in"]:
            ran += " " + notes.ref("no vitattn:auto row in this benchmark: the first vitattn backend it lists "
                                   "(the order auto tries them) stands in")
        line = [label, ran, _cell(a, "fwd_ms", notes), _cell(a, "fwd_bwd_ms", notes), _cell(a, "peak_mib", notes)]
        line += ([_cell(n, "fwd_ms", notes), _cell(n, "fwd_bwd_ms", notes), _cell(n, "peak_mib", notes)] if n
                 else ["—", "—", "—"])
        line += [_ratio(c["vs_naive"]["fwd_ms"]), _ratio(c["vs_naive"]["fwd_bwd_ms"])]
        for m in TIME_METRICS:
            best = c["best_peer"][m]
            line += [f"{best['method']} {_fmt(best[m])} ms" if best else "—", _ratio(c["vs_peer"][m])]
        body.append(line)
    return _table(header, body)


def build_report(results: Dict[str, Dict], env: Dict[str, str], command: str, quick: bool,
                 total_s: Optional[float] = None) -> Dict[str, Any]:
    """Everything the report says, as data: normalised rows, comparisons, summary, plot data.
    ``results``: {benchmark: {"rows": [...], "error": str or None, "seconds": float}}."""
    device = env.get("device_type", "cpu")
    defaults = {"threads": int(env["cpu_threads"])} if device == "cpu" and "cpu_threads" in env else {}
    ops: Dict[str, Dict] = {}
    summary: List[Dict] = []
    other: List[Dict] = []
    for name, res in results.items():
        rows = [normalize_row(name, r, defaults) for r in res.get("rows") or []]
        comps = compare(rows) if any(m in r for r in rows for m in TIME_METRICS) else []
        summ = summarize(name, comps, device)
        summary += summ
        for col in dict.fromkeys(k for r in rows for k in r if k.endswith("_speedup")):
            vals = [r[col] for r in rows if r["role"] == "auto" and _is_num(r.get(col))]
            if vals:
                other.append({"op": name, "metric": col, "geomean": _geomean(vals), "min": min(vals),
                              "max": max(vals), "n": len(vals)})
        ops[name] = {"rows": rows, "error": res.get("error"), "traceback": res.get("traceback"),
                     "seconds": res.get("seconds"), "comparisons": comps, "summary": summ,
                     "plot_data": plot_data(rows, comps), "output": res.get("output", []),
                     "progress_items": res.get("progress_items")}
    return {"environment": env, "command": command, "quick": quick, "total_s": total_s, "summary": summary,
            "other_ratios": other, "ops": ops}


def _environment_line(env: Dict[str, str]) -> str:
    dev = env.get("device_type", "?")
    if dev == "cpu":
        where = f"CPU {env.get('cpu', env.get('device', ''))}" + (f", {env['cpu_isa']}" if env.get("cpu_isa") else "")
    else:
        where = f"GPU {env.get('device', '')}"
    return where


def render_markdown(report: Dict[str, Any], plots: Dict[str, List[str]]) -> str:
    env = report["environment"]
    notes = Footnotes()
    md = ["# vitattn benchmark report", ""]
    head = [f"`{report['command']}`", f"commit {env.get('commit', '?')}", _environment_line(env),
            f"torch {env.get('torch', '?')}"]
    if report.get("total_s") is not None:
        head.append(f"{report['total_s']:.0f} s of benchmarks")
    if report.get("wall_s") is not None:
        head.append(f"{report['wall_s']:.0f} s from the command's start (imports included) to its plots")
    md += [" · ".join(head), ""]
    if env.get("device_type") == "cpu":
        md += ["GPU kernels (Triton, CUDA) were **not exercised**: this run had no CUDA device. On a CPU the "
               "benchmarks time with the intra-op thread count in each row (timings on a shared CPU are noisy: "
               f"load average {env.get('load_avg', '?')} at the start"
               + (f", {env['load_avg_after']} at the end" if env.get("load_avg_after") else "") + ").", ""]
    md += ["## Summary", "",
           "Speed-up of vitattn's default backend (`backend=\"auto\"`; the *backend* column says what it ran) "
           "= the other code's median time / vitattn's: above 1× vitattn is faster. *Naive* is the dense "
           "PyTorch code a user would otherwise write; the *best peer* is, per shape, the fastest other "
           "implementation of the same math (SDPA with the mask, compiled FlexAttention, compiled reference, "
           "...). Geometric mean over the shapes, (min–max) when there are several.", ""]
    body = []
    for s in report["summary"]:
        be = s["backend"] + (" " + notes.ref("no vitattn:auto row in this benchmark: the first vitattn backend it "
                                             "lists (the order auto tries them) stands in") if s["stand_in"] else "")
        body.append([s["op"], be, s["device"], _fmt(s["threads"]), _fmt(s["dtype"]), str(s["shapes"]),
                     _range(s["vs_naive_fwd_ms"]), _range(s["vs_naive_fwd_bwd_ms"]),
                     _range(s["vs_peer_fwd_ms"]), _range(s["vs_peer_fwd_bwd_ms"])])
    for name, op in report["ops"].items():
        if op["error"] and not op["summary"]:
            body.append([name, "benchmark failed", env.get("device_type", ""), "", "", "0", "—", "—", "—", "—"])
    if body:
        md.append(_table(["op", "backend (auto)", "device", "threads", "dtype", "shapes", "forward × naive",
                          "fwd+bwd × naive", "forward × best peer", "fwd+bwd × best peer"], body))
    else:
        md.append("(no op benchmark with forward timings in this run)")
    if report.get("other_ratios"):
        md += ["", "Ratios the benchmarks report themselves (vitattn's default over the other rows of its shape):", ""]
        md.append(_table(["benchmark", "ratio", "geomean", "min–max", "rows"],
                         [[o["op"], o["metric"], _ratio(o["geomean"]), f"{o['min']:.2f}–{o['max']:.2f}", str(o["n"])]
                          for o in report["other_ratios"]]))
    md += [""] + notes.definitions()
    from .benchmarks.common import PEAK_MEMORY_METHOD  # noqa: E402 (light: no benchmark imported)

    md += ["", f"**Memory** (`peak_mib`): {PEAK_MEMORY_METHOD.get(env.get('device_type', 'cpu'), 'not measured on this device')} "
           "Measured on one forward+backward call (inputs and parameters allocated before it are not counted; "
           "the gradients it returns are).", ""]
    if any(plots.values()):
        md += ["Plots per op: time against problem size (log–log, one line per method, forward and "
               "forward+backward), peak memory against problem size, and vitattn's speed-up over the naive "
               "code per shape.", ""]
    else:
        md += ["No plots: matplotlib is not installed (`pip install matplotlib`, or `pip install -e .[bench]`).", ""]
    for name, op in report["ops"].items():
        first = len(notes.texts)
        md += [f"## {name}", ""]
        secs = f" ({op['seconds']:.0f} s)" if op.get("seconds") is not None else ""
        if op["error"]:
            md += [f"The benchmark failed{secs}: `{op['error']}`", ""]
        rows = op["rows"]
        if not rows:
            md += [f"No rows{secs}.", ""]
            continue
        roles: Dict[str, List[str]] = {}
        for r in rows:
            if r["method"] not in roles.setdefault(r["role"], []):
                roles[r["role"]].append(r["method"])
        desc = {"auto": "vitattn default", "backend": "vitattn backends", "naive": "naive code",
                "peer": "peers", "bound": "bound (computes less: no bias; shown, not a peer)"}
        md.append(f"{len(rows)} rows{secs}. " + "; ".join(f"{desc.get(k, k)}: {', '.join(v)}" for k, v in roles.items()) + ".")
        md.append("")
        if op["comparisons"]:
            md += ["Per shape: vitattn's default against the naive code and the best peer (speed-up = their time / "
                   "vitattn's).", "", _comparison_table(op["comparisons"], notes), ""]
        for p in plots.get(name, []):
            md += [f"![{p}]({p})", ""]
        md += ["All rows:", "", _rows_table(rows, notes), ""]
        defs = notes.definitions(first)
        if defs:
            md += defs + [""]
    md += ["## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()] + [""]
    return "\n".join(md)


def headline(report: Dict[str, Any]) -> str:
    parts = []
    for s in report["summary"]:
        a, b = s["vs_naive_fwd_ms"]["geomean"], s["vs_naive_fwd_bwd_ms"]["geomean"]
        same = [x for x in report["summary"] if x["op"] == s["op"]]
        tag = s["op"]
        if len({x["threads"] for x in same}) > 1:
            tag += f"@{s['threads']}t"
        if len({x["dtype"] for x in same}) > 1:
            tag += f"/{s['dtype']}"
        parts.append(f"{tag} {_ratio(a)}/{_ratio(b)}")
    failed = [n for n, op in report["ops"].items() if op["error"]]
    text = ("vitattn auto vs naive, fwd/fwd+bwd (geomean): " + ", ".join(parts)) if parts else "no op timings"
    if failed:
        text += f"; FAILED: {', '.join(failed)}"
    return text


def write_report(report: Dict[str, Any], out_dir: str, make_plots: bool = True,
                 clock: Optional[Callable[[], Optional[float]]] = None) -> Dict[str, Any]:
    """Write report.md, report.json and the PNGs (stale ones removed first); return the file names.
    ``clock()``, when given, is the command's wall time so far, stated once the plots exist."""
    os.makedirs(out_dir, exist_ok=True)
    remove_stale_plots(out_dir)
    plots: Dict[str, List[str]] = {}
    for name, op in report["ops"].items():
        plots[name] = render_plots(name, op["plot_data"], out_dir) if make_plots else []
    report["plots"] = plots
    if clock is not None:
        report["wall_s"] = clock()
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    md = render_markdown(report, plots)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    return {"md": os.path.join(out_dir, "report.md"), "json": os.path.join(out_dir, "report.json"), "plots": plots,
            "markdown": md}


# ============================================================ running, progress, output


class Progress:
    """A progress bar on its own stream (stderr). On a terminal it redraws one line; elsewhere
    (CI logs) it prints one line per finished benchmark. The bar advances per benchmark, weighted
    by the previous run's durations when known, and within one by its rows (the previous run's
    row count)."""

    def __init__(self, names: Sequence[str], stream, previous: Optional[Dict] = None, width: int = 28):
        self.names, self.stream, self.width = list(names), stream, width
        prev = (previous or {}).get("ops", {})
        secs = {n: prev[n].get("seconds") for n in names if _is_num((prev.get(n) or {}).get("seconds"))}
        mean = sum(secs.values()) / len(secs) if secs else 1.0
        self.weight = {n: max(0.5, secs.get(n, mean)) for n in names}
        # the previous run's progress events (or rows) per benchmark: how far one has got
        self.expect = {n: prev[n].get("progress_items") or len(prev[n].get("rows") or []) for n in names if n in prev}
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self.done: List[str] = []
        self.current: Optional[str] = None
        self.items = 0
        self.label = ""
        self._last = 0.0

    def fraction(self) -> float:
        total = sum(self.weight.values())
        f = sum(self.weight[n] for n in self.done)
        if self.current and self.expect.get(self.current):
            f += self.weight[self.current] * min(0.95, self.items / self.expect[self.current])
        return min(1.0, f / total) if total else 1.0

    def start(self, name: str) -> None:
        self.current, self.items, self.label = name, 0, ""
        self._draw(force=True)

    def item(self, label: str) -> None:
        self.items += 1
        self.label = " ".join(label.split())
        self._draw()

    def finish(self, name: str, rows: int, seconds: float, error: Optional[str]) -> None:
        self.done.append(name)
        self.current = None
        status = f"FAILED ({error[:80]})" if error else f"{rows} rows"
        if self.tty:
            self._draw(force=True, label=f"{name}: {status} in {seconds:.0f} s")
        else:
            self.stream.write(f"[{len(self.done)}/{len(self.names)}] {name}: {status} in {seconds:.1f} s "
                              f"(elapsed {time.perf_counter() - self.t0:.0f} s)\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._draw(force=True, label="done")
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False, label: Optional[str] = None) -> None:
        if not self.tty:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        f = self.fraction()
        fill = int(round(self.width * f))
        bar = "#" * fill + "-" * (self.width - fill)
        elapsed = now - self.t0
        step = f"{len(self.done) + (1 if self.current else 0)}/{len(self.names)}"
        text = label if label is not None else (f"{self.current}: {self.label}" if self.current else "")
        cols = 0
        try:
            cols = os.get_terminal_size(self.stream.fileno()).columns
        except Exception:
            pass
        cols = cols if cols >= 40 else 100  # a pseudo-terminal may report 0
        line = f"[{bar}] {f * 100:3.0f}% {int(elapsed) // 60}:{int(elapsed) % 60:02d} {step} {text}"
        self.stream.write("\r" + line[: max(20, cols - 1)].ljust(max(20, cols - 1)))
        self.stream.flush()


class _LineSink(io.TextIOBase):
    """sys.stdout / sys.stderr while benchmarks run: each line goes to the log, and (stdout only)
    to the progress bar as the current item."""

    def __init__(self, log: List[str], on_line: Optional[Callable[[str], None]], fd: int):
        self.log, self.on_line, self._fd, self._buf = log, on_line, fd, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._line(line)
        return len(s)

    def _line(self, line: str) -> None:
        line = line.rstrip("\r")
        if not line.strip():
            return
        from .benchmarks.common import is_profiler_noise

        if is_profiler_noise(line):
            return
        self.log.append(line)
        if self.on_line is not None:
            self.on_line(line)

    def flush(self) -> None:
        if self._buf:
            line, self._buf = self._buf, ""
            self._line(line)

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def captured_output(log: List[str], on_line: Callable[[str], None]):
    """While benchmarks run, nothing they (or native code: the profiler, compilers) print reaches
    the terminal: Python-level output goes to ``log`` through _LineSink, and file descriptors 1
    and 2 go to a temporary file whose non-noise lines are added to ``log`` at the end (the
    progress bar writes to a duplicate of the original stderr: see _console)."""
    sys.stdout.flush()
    sys.stderr.flush()
    native = tempfile.TemporaryFile()
    saved = [os.dup(1), os.dup(2)]
    old = sys.stdout, sys.stderr
    os.dup2(native.fileno(), 1)
    os.dup2(native.fileno(), 2)
    sys.stdout, sys.stderr = _LineSink(log, on_line, 1), _LineSink(log, None, 2)
    try:
        yield
    finally:
        for s in (sys.stdout, sys.stderr):
            s.flush()
        sys.stdout, sys.stderr = old
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        native.seek(0)
        from .benchmarks.common import is_profiler_noise

        for line in native.read().decode("utf-8", "replace").splitlines():
            if line.strip() and not is_profiler_noise(line):
                log.append(line)
        native.close()


@contextlib.contextmanager
def _console():
    """A stream to the original stderr that survives captured_output's redirection."""
    try:
        sys.stderr.flush()
        fd = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, io.UnsupportedOperation):  # not a file (e.g. a test's buffer)
        yield sys.stderr
        return
    stream = os.fdopen(fd, "w", buffering=1, encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                       errors="replace")
    try:
        yield stream
    finally:
        stream.flush()
        stream.close()


def _process_seconds() -> Optional[float]:
    """Seconds since this process started (imports included; Linux), else None."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _default_out_dir() -> str:
    from . import benchmarks

    here = os.path.dirname(os.path.abspath(benchmarks.__file__))
    # a source checkout (editable install): the committed results folder
    if os.path.exists(os.path.join(os.path.dirname(here), "setup.py")):
        return os.path.join(here, "results")
    return os.path.abspath("vitattn-bench-results")


def available_benchmarks() -> Tuple[List[str], List[str]]:
    """(what the main job runs, every benchmark --only accepts). The job runs BENCHMARKS and any
    other benchmarks/bench_<name>.py whose source sets ``MAIN_JOB = True`` (read, not imported);
    --only takes any of them."""
    from . import benchmarks

    here = os.path.dirname(os.path.abspath(benchmarks.__file__))
    found = sorted(f[len("bench_"):-3] for f in os.listdir(here) if re.fullmatch(r"bench_\w+\.py", f))
    opted = []
    for n in found:
        if n not in BENCHMARKS:
            try:
                with open(os.path.join(here, f"bench_{n}.py")) as f:
                    if re.search(r"^MAIN_JOB\s*=\s*True\b", f.read(), flags=re.M):
                        opted.append(n)
            except OSError:
                pass
    default = [n for n in BENCHMARKS if n in found] + opted
    return default, default + [n for n in found if n not in default]


def _previous(out_dir: str, quick: bool, device_type: str) -> Optional[Dict]:
    try:
        with open(os.path.join(out_dir, "report.json")) as f:
            prev = json.load(f)
        if prev.get("quick") == quick and prev.get("environment", {}).get("device_type") == device_type:
            return prev
    except Exception:
        pass
    return None


def run_benchmarks(modules: Dict[str, Any], quick: bool, device: torch.device, previous=None
                   ) -> Dict[str, Dict]:
    """Run each module's run(quick, device[, progress]) with its output captured and a progress
    bar on stderr; threads are reset to the job's setting after each."""
    with _console() as console:
        return _run_all(modules, quick, device, Progress(list(modules), console, previous))


def _run_all(modules: Dict[str, Any], quick: bool, device: torch.device, progress: "Progress") -> Dict[str, Dict]:
    threads = torch.get_num_threads()
    results: Dict[str, Dict] = {}
    for name, mod in modules.items():
        log: List[str] = []
        progress.start(name)
        t0 = time.perf_counter()
        error = tb = None
        rows: List[Dict] = []
        try:
            with captured_output(log, progress.item):  # imports too: their warnings are output as well
                run = mod.run
                kw = {"progress": progress.item} if "progress" in inspect.signature(run).parameters else {}
                rows = list(run(quick=quick, device=device, **kw) or [])
        except Exception as exc:  # one broken benchmark must not hide the others; it is reported
            error, tb = f"{type(exc).__name__}: {exc}".strip()[:500], traceback.format_exc()
        finally:
            torch.set_num_threads(threads)
        seconds = time.perf_counter() - t0
        results[name] = {"rows": rows, "error": error, "traceback": tb, "seconds": seconds, "output": log,
                         "progress_items": progress.items}
        progress.finish(name, len(rows), seconds, error)
    progress.close()
    return results


def main(argv: Optional[Sequence[str]] = None, modules: Optional[Dict[str, Any]] = None) -> int:
    """``modules`` ({name: module with run()}) replaces the benchmarks (tests)."""
    default, names_all = (list(modules), list(modules)) if modules is not None else available_benchmarks()
    ap = argparse.ArgumentParser(prog="python -m vitattn.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small shapes and few repeats (the README states how long it takes on a 2-core CPU)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--only", default=None, help=f"comma-separated benchmarks (default: {','.join(default)}; "
                    f"any of {','.join(names_all)})")
    ap.add_argument("--out-dir", default=None, help="where to write report.md/json and the plots")
    ap.add_argument("--no-plots", action="store_true", help="write no PNGs (and remove the stale ones)")
    args = ap.parse_args(argv)

    from .benchmarks.common import bench_device, environment

    names = args.only.split(",") if args.only else default
    unknown = [n for n in names if n not in names_all]
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {unknown}; expected names from {names_all}")
    # on a CPU the benchmarks time single-threaded unless a row says otherwise (common.bench_device)
    device = bench_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = args.out_dir or _default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    command = ("python -m vitattn.bench " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    t0 = time.perf_counter()
    env = environment(device)
    if modules is None:
        modules = {n: _Lazy(f"{__package__}.benchmarks.bench_{n}") for n in names}
    else:
        modules = {n: modules[n] for n in names}
    sys.stderr.write(f"vitattn benchmarks on {device.type} ({', '.join(names)}); report in {out_dir}\n")
    sys.stderr.flush()
    results = run_benchmarks(modules, args.quick, device, _previous(out_dir, args.quick, device.type))
    try:
        env["load_avg_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        pass
    report = build_report(results, env, command, args.quick, time.perf_counter() - t0)
    files = write_report(report, out_dir, make_plots=not args.no_plots, clock=_process_seconds)
    wall = _process_seconds()
    took = f"{wall:.0f} s" if wall is not None else f"{report['total_s']:.0f} s of benchmarks"
    extra = sum(len(r["output"]) for r in results.values())
    if extra:
        sys.stderr.write(f"({extra} lines of benchmark output kept in report.json, \"output\")\n")
    if not any(files["plots"].values()) and not args.no_plots:
        sys.stderr.write("no plots: matplotlib is not installed (pip install matplotlib)\n")
    sys.stdout.write(f"report: {files['md']} ({took}) -- {headline(report)}\n")
    sys.stdout.flush()
    return 1 if any(r["error"] for r in results.values()) else 0


class _Lazy:
    """A benchmark module imported when its run() is first asked for (inside the job's output
    capture, so that what its import prints is captured too)."""

    def __init__(self, module: str):
        self.module = module

    @property
    def run(self):
        return importlib.import_module(self.module).run


if __name__ == "__main__":
    sys.exit(main())
