"""Benchmark: onnxruntime (CPU) against vitattn's CPU inference, same model and weights.

For each model (default rmt_t, sret_t, dynamixer_s, setformer_mini and setformer_mini with the
"normalized" embedding, at 224x224), batch (1, 8) and intra-op thread count (1, 2):

* the model (eval, fp32, every parameter and BatchNorm statistic perturbed: bench_models'
  perturbed_state) is exported with the plain ``torch.onnx.export(model, (x,), dynamo=True)``
  at that batch (static shapes) and loaded in onnxruntime's CPUExecutionProvider;
* fwd_ms: median wall time of one forward, vitattn (eager, ``attn_backend="auto"``, under
  torch.no_grad(), torch.set_num_threads(t)) and onnxruntime (session with
  intra_op_num_threads=t, inter_op_num_threads=1, default graph optimisations, no thread
  spinning between calls) called in alternating rounds (order shuffled every round:
  common.time_alternating) in one process, so that load drifting on a shared machine hits
  both alike;
* vs_vitattn_speedup (onnxruntime rows): vitattn's median over onnxruntime's (> 1: onnxruntime
  faster); vs_onnxruntime_speedup (vitattn rows): the inverse;
* logits_rel_diff: max |onnxruntime - PyTorch| / max |PyTorch| on the benchmark input;
  export_s / onnx_mib: export time and file size (onnxruntime rows);
* backend (vitattn rows): the backend "auto" chose for every op.

Spinning is off because the two runtimes alternate on the same cores: an onnxruntime thread
spinning after its call would slow the next PyTorch call (``--ort-spinning`` turns it back on).
A model that does not export gets an onnxruntime row marked unavailable with the reason.

    python benchmarks/bench_onnx.py                    # the grid above (tens of minutes on 2 cores)
    python benchmarks/bench_onnx.py --quick            # rmt_t, batch 1, one thread
    python benchmarks/bench_onnx.py --models rmt_t sret_t --batches 8 --threads 1
    python benchmarks/bench_onnx.py --models "setformer_mini:embedding=normalized"   # name:key=value,...

Needs onnx, onnxscript and onnxruntime (``pip install vitattn[onnx]``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import MAX_SECONDS, MIN_REPEATS, backend_label, perturbed_state, record_backends  # noqa: E402
from common import cli, mark_unavailable, time_alternating  # noqa: E402

import vitattn.models as models  # noqa: E402

FULL_MODELS = ("rmt_t", "sret_t", "dynamixer_s", "setformer_mini", "setformer_mini:embedding=normalized")
QUICK_MODELS = ("rmt_t",)
FULL_BATCHES, QUICK_BATCHES = (1, 8), (1,)
FULL_THREADS, QUICK_THREADS = (1, 2), (1,)
REPEATS = {"quick": 5, "full": 10}  # alternating rounds (after 2 warm-up calls each)
RES = 224
LOGITS_RTOL = 1e-4
COLUMNS = ["shape", "threads", "method", "backend", "fwd_ms", "img_s", "vs_vitattn_speedup", "vs_onnxruntime_speedup",
           "logits_rel_diff", "export_s", "onnx_mib", "note"]


def parse_model(spec: str) -> Tuple[str, Dict]:
    """"name" or "name:key=value,key=value" (values as JSON where they parse, else strings)."""
    name, _, rest = spec.partition(":")
    kwargs: Dict = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"bench_onnx: {spec!r}: expected name:key=value,..., got {item!r}")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    if name not in models.list_models():
        raise ValueError(f"bench_onnx: unknown model {name!r}; one of {models.list_models()}")
    return name, kwargs


def ort_session(path: str, threads: int, spinning: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def measure(spec: str, batch: int, threads: Sequence[int], repeats: int, spinning: bool, workdir: str,
            progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Rows of one (model, batch): an onnxruntime and a vitattn row per thread count."""
    name, kwargs = parse_model(spec)
    shape = f"{spec} {RES}x{RES} b{batch}"
    base = dict(model=spec, res=RES, batch=batch, shape=shape, dtype="float32")
    torch.manual_seed(0)
    model = models.create_model(name, **kwargs)
    model.load_state_dict(perturbed_state(model))
    model.eval()
    x = torch.randn(batch, 3, RES, RES, generator=torch.Generator().manual_seed(1))

    def infer():
        with torch.no_grad():
            return model(x)

    torch.set_num_threads(threads[0])
    with record_backends() as seen:
        want = infer()
    label = backend_label(seen)

    ort_info: Dict = {}
    ort_why: Optional[str] = None
    path = os.path.join(workdir, f"{name}_b{batch}.onnx")
    if progress:
        progress(f"{shape}: export")
    try:
        t0 = time.perf_counter()
        torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(path)
        ort_info["export_s"] = time.perf_counter() - t0
        ort_info["onnx_mib"] = os.path.getsize(path) / 2 ** 20
    except Exception as exc:  # reported on the row: the vitattn timing still runs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        ort_why = f"export failed: {type(exc).__name__}: {first}"[:300]

    rows: List[Dict] = []
    for t in threads:
        torch.set_num_threads(t)
        tag = f"{shape} {t}t"
        ours = dict(base, method="vitattn:auto", role="auto", backend=label, threads=t)
        theirs = dict(base, method="onnxruntime", role="peer", backend="onnxruntime:cpu", threads=t, **ort_info)
        fns = {"vitattn:auto": infer}
        if ort_why is None:
            session = ort_session(path, t, spinning)
            feed = {session.get_inputs()[0].name: x.numpy()}
            fns["onnxruntime"] = lambda: session.run(None, feed)
            theirs["logits_rel_diff"] = rel_diff(torch.from_numpy(fns["onnxruntime"]()[0]), want)
            if not theirs["logits_rel_diff"] <= LOGITS_RTOL:
                theirs["note"] = f"OUTPUTS DISAGREE (max rel diff {theirs['logits_rel_diff']:.2e} > {LOGITS_RTOL:g})"
        if progress:
            progress(f"{tag}: timing")
        for fn in fns.values():  # warm-up: first-call allocations, ORT's memory planning
            fn()
            fn()
        ms = time_alternating(fns, 0, repeats, max_time=MAX_SECONDS, min_repeats=MIN_REPEATS)[0]
        ours["fwd_ms"] = ms["vitattn:auto"]
        ours["img_s"] = batch / ms["vitattn:auto"] * 1e3
        if ort_why is None:
            theirs["fwd_ms"] = ms["onnxruntime"]
            theirs["img_s"] = batch / ms["onnxruntime"] * 1e3
            theirs["vs_vitattn_speedup"] = ms["vitattn:auto"] / ms["onnxruntime"]
            ours["vs_onnxruntime_speedup"] = ms["onnxruntime"] / ms["vitattn:auto"]
            del session
        else:
            mark_unavailable(theirs, ort_why, "fwd_ms", "img_s", "vs_vitattn_speedup")
            theirs["note"] = ort_why
        rows += [theirs, ours]
        gc.collect()
    return rows


def run(quick: bool, device, models: Optional[Sequence[str]] = None, *, batches: Optional[Sequence[int]] = None,
        threads: Optional[Sequence[int]] = None, repeats: Optional[int] = None, ort_spinning: bool = False,
        progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Rows (common.ROW_KEYS) of every configuration; see the module docstring. CPU only."""
    device = torch.device(device)
    specs = list(models or (QUICK_MODELS if quick else FULL_MODELS))
    batches = list(batches or (QUICK_BATCHES if quick else FULL_BATCHES))
    threads = list(threads or (QUICK_THREADS if quick else FULL_THREADS))
    repeats = repeats or REPEATS["quick" if quick else "full"]
    for s in specs:
        parse_model(s)  # bad names fail before anything runs
    stub = lambda spec, b, why: mark_unavailable(  # noqa: E731
        dict(model=spec, res=RES, batch=b, shape=f"{spec} {RES}x{RES} b{b}", dtype="float32",
             method="onnxruntime", role="peer"), why, "fwd_ms")
    if device.type != "cpu":
        return [stub(s, b, f"a CPU comparison (onnxruntime's CPU provider against vitattn's CPU inference); "
                           f"run with --device cpu, not {device.type}") for s in specs for b in batches]
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        return [stub(s, b, f"{exc.name} is not installed (pip install vitattn[onnx])") for s in specs for b in batches]
    initial = torch.get_num_threads()
    rows: List[Dict] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_onnx_") as workdir:
            for spec in specs:
                for b in batches:
                    got = measure(spec, b, threads, repeats, ort_spinning, workdir, progress)
                    for r in got:
                        ms = f"{r['fwd_ms']:.1f} ms" if isinstance(r.get("fwd_ms"), float) else "n/a"
                        print(f"{r['shape']} {r['threads']}t {r['method']}: {ms} {r.get('note', '')}", flush=True)
                    rows += got
    finally:
        torch.set_num_threads(initial)
    return rows


def _options(ap) -> None:
    ap.add_argument("--models", nargs="*", default=None,
                    help="model names, or name:key=value,... for constructor arguments (default: " +
                         " ".join(FULL_MODELS) + ")")
    ap.add_argument("--batches", nargs="*", type=int, default=None, help="batch sizes (default 1 8)")
    ap.add_argument("--threads", nargs="*", type=int, default=None, help="intra-op thread counts (default 1 2)")
    ap.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 10; quick 5)")
    ap.add_argument("--ort-spinning", action="store_true", help="let onnxruntime's threads spin between calls")


def _versions() -> Dict[str, str]:
    out = {}
    for mod in ("onnxruntime", "onnx", "onnxscript"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "absent"
    return out


_CONDITIONS: Dict = {}


def _appendix(rows: List[Dict], device) -> str:
    v = _versions()
    spin = "on" if _CONDITIONS.get("ort_spinning") else "off"
    lines = ["", "## Conditions", "",
             f"- onnxruntime {v['onnxruntime']} (CPUExecutionProvider, default graph optimisations, "
             f"inter_op_num_threads=1, intra-op spinning {spin}); onnx {v['onnx']}, onnxscript {v['onnxscript']}",
             f"- export: torch.onnx.export(model, (x,), dynamo=True), static shapes, {RES}x{RES}, fp32, eval; "
             "weights: bench_models.perturbed_state",
             "- vitattn: eager, attn_backend='auto', torch.no_grad(); threads = torch.set_num_threads and "
             "ORT intra_op_num_threads",
             "- fwd_ms: median of alternating calls in one process (order shuffled every round), after 2 warm-up "
             "calls each",
             f"- logits_rel_diff: max |onnxruntime - PyTorch| / max |PyTorch| (tolerance {LOGITS_RTOL:g})"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    from common import RESULTS_DIR

    def run_kwargs(a):
        _CONDITIONS.update(out_dir=a.out_dir, ort_spinning=a.ort_spinning)
        return dict(models=a.models, batches=a.batches, threads=a.threads, repeats=a.repeats,
                    ort_spinning=a.ort_spinning)

    cli("bench_onnx", run, COLUMNS, __doc__, quick_help="rmt_t 224x224 batch 1, one thread",
        options=_options, run_kwargs=run_kwargs, appendix=_appendix, argv=argv)
    # the JSON also holds the onnxruntime settings and versions
    path = os.path.join(_CONDITIONS.get("out_dir") or RESULTS_DIR, "bench_onnx.json")
    with open(path) as f:
        data = json.load(f)
    data["onnx_versions"] = _versions()
    data["ort_session"] = dict(provider="CPUExecutionProvider", inter_op_num_threads=1,
                               intra_op_num_threads="= threads", allow_spinning=bool(_CONDITIONS.get("ort_spinning")),
                               graph_optimization_level="ORT_ENABLE_ALL (default)")
    data["logits_rtol"] = LOGITS_RTOL
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
