"""Benchmark: vitattn's models against the official releases, on the same weights.

For each configuration (model, image size, batch) and each intra-op thread count, in one
process, with the calls of the implementations alternating (order shuffled every round:
common.time_rounds) and the median taken per implementation:

* ``fwd_ms``: inference, an eval-mode forward under ``torch.no_grad()``;
* ``fwd_bwd_ms``: one training step: forward, cross-entropy, backward, AdamW step;
* ``infer_peak_mib`` / ``train_peak_mib`` (``peak_mib`` = the training step's): peak memory
  allocated during one call (``common.peak_memory_mb``: on the CPU through the allocator's
  events, measured with one intra-op thread whatever the row's thread count);
* on the vitattn row, ``vs_official_infer_speedup`` / ``vs_official_train_speedup``
  (official time / vitattn time, the ratio of the medians), ``vs_official_infer_paired`` /
  ``vs_official_train_paired`` (the median over rounds of the same ratio within a round,
  common.paired_ratio: far less moved by a machine whose speed drifts between rounds) and,
  where the "torch" row runs, ``vs_torch_*`` like the first;
* ``logits_rel_diff`` on the other rows: max |their logits - vitattn's| / max |their logits|,
  eval mode, checked before anything is timed (the weights are the vitattn model's own
  initialisation with every parameter and BatchNorm statistic perturbed, so nothing is
  trivially zero); above LOGITS_RTOL the row's note says the logits disagree.

Implementations (rows; ``method`` / ``role`` as in common.ROW_KEYS):

* ``vitattn:auto`` (role auto): the vitattn model with ``attn_backend="auto"``; ``backend``
  records which backend each op's "auto" chose during the logit check (e.g. ``masa:cpu``);
* ``official`` (role naive: the code users run today): the official release's model class,
  the same state_dict loaded with ``strict=True``;
* ``vitattn:auto, F.linear`` (role backend), when the official code runs, on a CPU where the
  models' linear layers run on oneDNN (vitattn/nn/_linear.py, ``cpu_linear_choice()``): the same vitattn model with
  ``VITATTN_CPU_LINEAR=aten`` set around its calls, so its linear layers are F.linear as in the
  official code; its ``vs_official_*`` show what the attention ops alone gain, the gap to
  ``vitattn:auto`` what the GEMM library gains;
* ``vitattn:torch`` (role backend): the vitattn model with ``attn_backend="torch"``, timed when
  the official code is not available (then it is the baseline, and the note says so) or with
  ``--with-torch``.

Without the official code (a fresh clone) the ``official`` rows say why it is not available
and the vitattn model is compared with its own "torch" fallback. fp32 throughout; on the GPU
the same (no autocast), threads do not apply.

Configurations: full mode: rmt_t, rmt_s, sret_t and dynamixer_s at 224x224, batch 1 and 8,
and rmt_t at 512x512, batch 1 and 8; inference and training; 1 and 2 intra-op threads.
``--quick`` (what ``python -m vitattn.bench --quick`` runs): rmt_t at 224x224, batch 1,
inference only, one thread, 3 timed calls -- a few seconds.

Staging the official code (never commit it; it stays outside the repository)
----------------------------------------------------------------------------
One folder, given as ``--official-dir DIR`` or in the environment variable
``BENCH_OFFICIAL_DIR`` (the main job reads the variable), that makes these importable when put
first on ``sys.path``::

    DIR/official_rmt_cls.py   qhfan/RMT classfication_release/RMT.py (RMT_T3, RMT_S, RMT_M2, RMT_L6)
    DIR/official_sret.py      szq0214/SReT SReT.py (SReT_T, SReT_LT, SReT_S)
    DIR/models/               ziyuwwang/DynaMixer models/ as it is (it imports itself as
                              "models": models/configs/conf_dynamixer.py has dynamixer_s/m/l)

plus small hand-written stand-ins for what those files import, unless the real packages are
installed: ``timm/__init__.py``, ``timm/data.py`` (IMAGENET_DEFAULT_MEAN / _STD),
``timm/models/{__init__,registry,layers,vision_transformer}.py`` (``register_model`` returning
its argument; ``DropPath``, ``trunc_normal_``, ``lecun_normal_``, ``to_2tuple``; a
``VisionTransformer`` placeholder and ``_cfg(**kw)`` returning kw), ``einops.py``
(``einsum(*tensors, pattern)`` and ``rearrange`` for SReT's ``'b c h w -> b (h w) c'`` and its
inverse), ``fvcore/nn/__init__.py`` (``FlopCountAnalysis`` / ``flop_count_table`` placeholders).
For example::

    git clone https://github.com/qhfan/RMT && git clone https://github.com/szq0214/SReT \\
        && git clone https://github.com/ziyuwwang/DynaMixer
    mkdir -p ~/.cache/official/shim && cd ~/.cache/official/shim
    cp .../RMT/classfication_release/RMT.py official_rmt_cls.py
    cp .../SReT/SReT.py official_sret.py && cp -r .../DynaMixer/models models
    # ... write the stand-ins above ...
    export BENCH_OFFICIAL_DIR=~/.cache/official/shim

The modules imported from DIR are dropped from ``sys.modules`` (and DIR from ``sys.path``)
right after the constructors are taken, so the stand-ins never shadow a real timm later in
the process. The official SReT draws ``torch.randperm`` in every recursive pass, eval
included; for the logit check it is handed the permutations the vitattn model used, in
order (vitattn's eval permutations are fixed per layer); the timed calls run each model's
own behaviour.

    python benchmarks/bench_models.py --official-dir ~/.cache/official/shim      # full matrix
    python benchmarks/bench_models.py --quick                                     # main-job setting
    python benchmarks/bench_models.py --models rmt_t --res 512 --batches 8 --threads 1
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import statistics
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (bench_device, cli, environ, mark_unavailable, paired_ratio, peak_memory_mb,  # noqa: E402
                    time_rounds)

import vitattn  # noqa: E402
import vitattn.models as models  # noqa: E402
from vitattn.nn import cpu_linear_choice  # noqa: E402

OFFICIAL_DIR_ENV = "BENCH_OFFICIAL_DIR"
ATEN_LINEAR = "vitattn:auto, F.linear"  # vitattn:auto with VITATTN_CPU_LINEAR=aten
LOGITS_RTOL = 1e-4  # fp32, different summation orders: measured ~3e-7 where the code agrees

# (model, image size, batch)
FULL_CONFIGS: Tuple[Tuple[str, int, int], ...] = tuple(
    [(m, 224, b) for m in ("rmt_t", "rmt_s", "sret_t", "dynamixer_s") for b in (1, 8)]
    + [("rmt_t", 512, 1), ("rmt_t", 512, 8)])
QUICK_CONFIGS: Tuple[Tuple[str, int, int], ...] = (("rmt_t", 224, 1),)
FULL_THREADS = (1, 2)
# timed calls per implementation (after one warm-up call), and the wall time after which a
# measurement stops at MIN_REPEATS calls
REPEATS = {"quick": 3, "full": 5}
MIN_REPEATS = 3
MAX_SECONDS = 120.0

# issue 12's goals: vitattn inference over the official code, fp32, one thread
GOALS = {("rmt_t", 224, 8): 1.3, ("rmt_s", 224, 8): 1.3, ("sret_t", 224, 8): 1.3, ("dynamixer_s", 224, 8): 1.3,
         ("rmt_t", 512, None): 2.5}

# the markdown table (logits_rel_diff is listed below it, in scientific notation)
COLUMNS = ["shape", "threads", "method", "backend", "fwd_ms", "fwd_bwd_ms", "infer_peak_mib", "train_peak_mib",
           "vs_official_infer_speedup", "vs_official_infer_paired", "vs_official_train_speedup",
           "vs_official_train_paired", "vs_torch_infer_speedup", "vs_torch_train_speedup", "note"]


# ---------------------------------------------------------------- the official code

class OfficialSpec:
    """Where a model's official constructor lives in the staged folder and how to call it."""

    def __init__(self, module: str, fn: str, call: Callable[[Callable], torch.nn.Module],
                 only_res: Optional[int] = None, randperm: bool = False):
        self.module, self.fn, self.call = module, fn, call
        self.only_res = only_res  # the official model is built for this image size only
        self.randperm = randperm  # draws torch.randperm in forward (SReT)


_RMT = lambda fn: fn(None)  # noqa: E731  (the official RMT constructors take one unused `args`)
_PLAIN = lambda fn: fn()  # noqa: E731
OFFICIAL: Dict[str, OfficialSpec] = {
    "rmt_t": OfficialSpec("official_rmt_cls", "RMT_T3", _RMT),
    "rmt_s": OfficialSpec("official_rmt_cls", "RMT_S", _RMT),
    "rmt_b": OfficialSpec("official_rmt_cls", "RMT_M2", _RMT),
    "rmt_l": OfficialSpec("official_rmt_cls", "RMT_L6", _RMT),
    "sret_t": OfficialSpec("official_sret", "SReT_T", _PLAIN, only_res=224, randperm=True),
    "sret_lt": OfficialSpec("official_sret", "SReT_LT", _PLAIN, only_res=224, randperm=True),
    "sret_s": OfficialSpec("official_sret", "SReT_S", _PLAIN, only_res=224, randperm=True),
    "dynamixer_s": OfficialSpec("models.configs.conf_dynamixer", "dynamixer_s", _PLAIN, only_res=224),
    "dynamixer_m": OfficialSpec("models.configs.conf_dynamixer", "dynamixer_m", _PLAIN, only_res=224),
    "dynamixer_l": OfficialSpec("models.configs.conf_dynamixer", "dynamixer_l", _PLAIN, only_res=224),
}


def official_dir_from(option: Optional[str]) -> Tuple[Optional[str], str]:
    """(the staged folder or None, where it came from): the option, else the environment."""
    if option:
        return os.path.abspath(os.path.expanduser(option)), "--official-dir"
    env = os.environ.get(OFFICIAL_DIR_ENV, "").strip()
    if env:
        return os.path.abspath(os.path.expanduser(env)), OFFICIAL_DIR_ENV
    return None, ""


def _under(path: Optional[str], root: str) -> bool:
    return bool(path) and os.path.realpath(path).startswith(root + os.sep)


def import_staged(directory: str, module_names: Sequence[str]) -> Dict[str, Any]:
    """{name: the module, or the exception its import raised}, imported from ``directory``;
    afterwards ``directory`` leaves sys.path and every module loaded from it leaves
    sys.modules (the objects stay alive through the returned modules)."""
    root = os.path.realpath(directory)
    out: Dict[str, Any] = {}
    before = set(sys.modules)
    sys.path.insert(0, directory)
    importlib.invalidate_caches()
    try:
        for name in module_names:
            try:
                mod = importlib.import_module(name)
                if not _under(getattr(mod, "__file__", None), root):
                    raise ImportError(f"{name!r} resolves to {getattr(mod, '__file__', None)}, not into {directory}")
                out[name] = mod
            except Exception as exc:  # reported on the rows, not raised: the vitattn rows still run
                out[name] = exc
    finally:
        sys.path.remove(directory)
        for key in set(sys.modules) - before:
            mod = sys.modules[key]
            paths = [getattr(mod, "__file__", None)] + list(getattr(mod, "__path__", None) or [])
            if any(_under(p, root) for p in paths):
                del sys.modules[key]
    return out


def load_official(directory: Optional[str], names: Sequence[str], source: str = "") -> Dict[str, Any]:
    """{model name: (constructor module, spec), or the reason the official model is not available}."""
    out: Dict[str, Any] = {}
    if directory is None:
        why = (f"official code not staged (give --official-dir DIR or set {OFFICIAL_DIR_ENV}; "
               "benchmarks/bench_models.py's docstring says how to stage it)")
        return {n: why for n in names}
    if not os.path.isdir(directory):
        return {n: f"{directory} ({source}) is not a folder" for n in names}
    wanted = sorted({OFFICIAL[n].module for n in names if n in OFFICIAL})
    modules = import_staged(directory, wanted)
    for n in names:
        spec = OFFICIAL.get(n)
        if spec is None:
            out[n] = "no official release of this model"
            continue
        mod = modules[spec.module]
        if isinstance(mod, Exception):
            out[n] = f"cannot import {spec.module} from {directory}: {type(mod).__name__}: {mod}"
        elif not callable(getattr(mod, spec.fn, None)):
            out[n] = f"{spec.module} in {directory} has no {spec.fn}"
        else:
            out[n] = (mod, spec)
    return out


class _TorchWithPerms:
    """Stands for the ``torch`` module inside the official SReT during the logit check:
    ``randperm`` hands out the permutations vitattn used, in order; everything else is torch."""

    def __init__(self, perms: Sequence[torch.Tensor]):
        self.perms = list(perms)

    def randperm(self, n, *args, **kwargs):
        if not self.perms:
            raise RuntimeError("the official model drew more permutations than the vitattn model used")
        perm = self.perms.pop(0)
        if perm.numel() != n:
            raise RuntimeError(f"the official model drew a permutation of {n}, vitattn used one of {perm.numel()}")
        return perm.cpu()

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def _perms_used_by_vitattn():
    """The permutations vitattn's SReT passes to group_attention, in call order."""
    from vitattn.models import sret

    used: List[torch.Tensor] = []
    real = sret.group_attention

    def spy(*args, perm=None, **kwargs):
        if perm is not None:
            used.append(perm.detach().clone())
        return real(*args, perm=perm, **kwargs)

    sret.group_attention = spy
    try:
        yield used
    finally:
        sret.group_attention = real


@contextlib.contextmanager
def _official_randperm(module, perms: Sequence[torch.Tensor]):
    proxy = _TorchWithPerms(perms)
    real = module.torch
    module.torch = proxy
    try:
        yield proxy
    finally:
        module.torch = real


# ---------------------------------------------------------------- which backend "auto" ran

@contextlib.contextmanager
def record_backends():
    """{op: set of backends} that the ops' dispatchers chose inside the block."""
    seen: Dict[str, set] = {}
    patched = []
    for _, disp in vitattn._ops().values():
        if any(d is disp for d in patched):
            continue
        real = disp.choose

        def choose(requested, ctx, op=None, _real=real, _default=disp.op):
            name = _real(requested, ctx, op)
            seen.setdefault(op or _default, set()).add(name)
            return name

        disp.choose = choose  # instance attribute: deleting it restores the method
        patched.append(disp)
    try:
        yield seen
    finally:
        for disp in patched:
            del disp.choose


def backend_label(seen: Dict[str, set]) -> str:
    return ", ".join(f"{op}:{'/'.join(sorted(names))}" for op, names in sorted(seen.items())) or "no vitattn op ran"


# ---------------------------------------------------------------- models and their calls

def create_vitattn(name: str, res: int, attn_backend: str) -> torch.nn.Module:
    kwargs = {"attn_backend": attn_backend}
    if res != 224 and name.startswith(("sret", "dynamixer")):  # their token grid is fixed by img_size
        kwargs["img_size"] = res
    return models.create_model(name, **kwargs)


def perturbed_state(model: torch.nn.Module, seed: int = 0) -> Dict[str, torch.Tensor]:
    """The model's state_dict with every parameter and BatchNorm statistic perturbed (seeded):
    no zero biases or unit scales that could hide a mismatch. Other buffers (RMT's angles and
    decays) are left as they are."""
    g = torch.Generator().manual_seed(seed)
    params = {n for n, _ in model.named_parameters()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if not v.is_floating_point():
            continue
        if k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif k.endswith("running_mean"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
        elif k in params:
            v.add_(torch.randn(v.shape, generator=g) * (0.05 if v.dim() < 2 else 0.02))
    return state


class Runner:
    """One implementation: its model, optimizer and the shared batch."""

    def __init__(self, method: str, role: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                 backend: Optional[str] = None, env: Optional[Dict[str, str]] = None):
        self.method, self.role, self.backend = method, role, backend
        self.model = model.to(x.device)
        self.x, self.y = x, y
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5)
        self.params_m = sum(p.numel() for p in self.model.parameters()) / 1e6
        self.env = env or {}  # environment variables set around every call of this runner

    def infer(self) -> torch.Tensor:
        with torch.no_grad(), environ(self.env):
            return self.model(self.x)

    def train_step(self) -> None:
        with environ(self.env):
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()


def rel_diff(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- one configuration

def measure(name: str, res: int, batch: int, device: torch.device, threads: Sequence[Optional[int]],
            official: Any, training: bool, repeats: int, with_torch: bool,
            progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Rows of one (model, res, batch): per thread count, vitattn:auto, official (or why not)
    and vitattn:torch where it runs."""
    shape = f"{name} {res}x{res} b{batch}"
    torch.manual_seed(0)
    ours = create_vitattn(name, res, "auto")
    state = perturbed_state(ours)
    ours.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    y = torch.randint(0, 1000, (batch,), generator=g).to(device)
    runners = [Runner("vitattn:auto", "auto", ours, x, y)]

    official_why: Optional[str] = official if isinstance(official, str) else None
    official_mod, spec = (None, None) if official_why else official
    if spec is not None and spec.only_res is not None and res != spec.only_res:
        official_why = f"the official {spec.fn} is built for {spec.only_res}x{spec.only_res} only"
    if official_why is None:
        try:
            off_model = spec.call(getattr(official_mod, spec.fn))
            off_model.load_state_dict(state, strict=True)
            runners.append(Runner("official", "naive", off_model, x, y, backend=None))
        except Exception as exc:
            official_why = f"the official {spec.fn} did not build or load the weights: {type(exc).__name__}: {exc}"
    if official_why is None and device.type == "cpu" and cpu_linear_choice()[0] == "onednn":
        # the same model with its linear layers on F.linear: how much of the speed-up over the
        # official code is the GEMM library (vitattn/nn/_linear.py) and how much the attention ops
        aten_linear = create_vitattn(name, res, "auto")
        aten_linear.load_state_dict(state)
        runners.append(Runner(ATEN_LINEAR, "backend", aten_linear, x, y, env={"VITATTN_CPU_LINEAR": "aten"}))
    if official_why is not None or with_torch:
        torch_model = create_vitattn(name, res, "torch")
        torch_model.load_state_dict(state)
        runners.append(Runner("vitattn:torch", "backend", torch_model, x, y, backend="torch"))
    by = {r.method: r for r in runners}

    # logits before anything is timed (also each model's first, warm-up, call)
    for r in runners:
        r.model.eval()
    if progress:
        progress(f"{shape}: logits")
    perm_spy = _perms_used_by_vitattn() if name.startswith("sret") else contextlib.nullcontext()
    with record_backends() as seen, perm_spy as perms:
        logits = {"vitattn:auto": by["vitattn:auto"].infer()}
    by["vitattn:auto"].backend = backend_label(seen)
    notes: Dict[str, List[str]] = {r.method: [] for r in runners}
    diffs: Dict[str, float] = {}
    for r in runners[1:]:
        if r.method == "official" and spec.randperm:
            with _official_randperm(official_mod, perms or []) as proxy:
                logits[r.method] = r.infer()
            if proxy.perms:
                notes[r.method].append(f"the official model drew fewer permutations than vitattn used "
                                       f"({len(proxy.perms)} left)")
        else:
            logits[r.method] = r.infer()
        diffs[r.method] = rel_diff(logits["vitattn:auto"], logits[r.method])
        if not diffs[r.method] <= LOGITS_RTOL:
            notes[r.method].append(f"LOGITS DISAGREE with vitattn:auto (max rel diff {diffs[r.method]:.2e} "
                                   f"> {LOGITS_RTOL:g})")
    del logits

    baseline = "official" if "official" in by else "vitattn:torch"
    if baseline != "official":
        notes["vitattn:auto"].append("baseline: vitattn's own torch backend (official not available)")
    if not training:
        notes["vitattn:auto"].append("inference only")

    # time per thread count
    timed: Dict[Tuple[Optional[int], str], Dict[str, List[float]]] = {}  # ms of every round
    for t in threads:
        if t is not None:
            torch.set_num_threads(t)
        tag = f"{shape} {t}t" if t is not None else shape
        phases = [("infer", "fwd_ms")] + ([("train", "fwd_bwd_ms")] if training else [])
        for phase, _ in phases:
            for r in runners:
                r.model.train(phase == "train")
            fns = {r.method: (r.train_step if phase == "train" else r.infer) for r in runners}
            if progress:
                progress(f"{tag}: {phase}")
            if not (phase == "infer" and t == threads[0]):  # the logit check was the first inference call
                for fn in fns.values():  # one warm-up call each
                    fn()
            timed[(t, phase)] = time_rounds(fns, 0, repeats, device=device, max_time=MAX_SECONDS,
                                            min_repeats=MIN_REPEATS)[0]
            gc.collect()

    # peak memory: once per implementation (common.peak_memory_mb measures with one thread)
    peaks: Dict[Tuple[str, str], Optional[float]] = {}
    for phase in ["infer"] + (["train"] if training else []):
        if progress:
            progress(f"{shape}: {phase} memory")
        for r in runners:
            r.model.train(phase == "train")
            peaks[(r.method, phase)] = peak_memory_mb(r.train_step if phase == "train" else r.infer, device)
            gc.collect()
    for r in runners:
        r.opt.zero_grad(set_to_none=True)

    rows: List[Dict] = []
    for t in threads:
        group: List[Dict] = []
        for r in runners:
            row: Dict[str, Any] = dict(method=r.method, role=r.role, backend=r.backend, model=name, res=res,
                                       batch=batch, shape=shape, dtype="float32", params_m=r.params_m)
            if t is not None:
                row["threads"] = t
            row["fwd_ms"] = statistics.median(timed[(t, "infer")][r.method])
            row["infer_peak_mib"] = peaks[(r.method, "infer")]
            if training:
                row["fwd_bwd_ms"] = statistics.median(timed[(t, "train")][r.method])
                row["train_peak_mib"] = row["peak_mib"] = peaks[(r.method, "train")]
            if r.method in diffs:
                row["logits_rel_diff"] = diffs[r.method]
            row["note"] = "; ".join(notes[r.method])
            group.append(row)
        auto = group[0]
        aten_row = next((row for row in group if row["method"] == ATEN_LINEAR), None)
        official_row = next((row for row in group if row["method"] == "official"), None)
        if aten_row is not None and official_row is not None:
            aten_row["vs_official_infer_speedup"] = official_row["fwd_ms"] / aten_row["fwd_ms"]
            if training:
                aten_row["vs_official_train_speedup"] = official_row["fwd_bwd_ms"] / aten_row["fwd_bwd_ms"]
        for other, tag in (("official", "vs_official"), ("vitattn:torch", "vs_torch")):
            o = next((row for row in group if row["method"] == other), None)
            if o is None:
                continue
            auto[f"{tag}_infer_speedup"] = o["fwd_ms"] / auto["fwd_ms"]
            if training:
                auto[f"{tag}_train_speedup"] = o["fwd_bwd_ms"] / auto["fwd_bwd_ms"]
            if other == "official":  # the same comparison round by round (common.paired_ratio)
                for phase in ("infer",) + (("train",) if training else ()):
                    got = timed[(t, phase)]
                    auto[f"vs_official_{phase}_paired"] = paired_ratio(got["official"], got[auto["method"]])
        if official_why is not None:
            na = dict(method="official", role="naive", backend=None, model=name, res=res, batch=batch, shape=shape,
                      dtype="float32", note="")
            if t is not None:
                na["threads"] = t
            mark_unavailable(na, f"official: not available ({official_why})",
                             "fwd_ms", *(("fwd_bwd_ms", "peak_mib") if training else ()))
            group.insert(1, na)
        rows += group
    del runners, by
    gc.collect()
    return rows


# ---------------------------------------------------------------- the benchmark

def configs_for(quick: bool, models_: Optional[Sequence[str]] = None, res: Optional[Sequence[int]] = None,
                batches: Optional[Sequence[int]] = None) -> List[Tuple[str, int, int]]:
    """The configurations: the default matrix (quick or full), narrowed by the options.
    ``models_`` picks models (one outside the matrix gets 224x224); ``res`` sets the image
    sizes of every model picked (default: each model's sizes in the matrix); ``batches`` the
    batch sizes (default: the matrix's for that model and size)."""
    base = list(QUICK_CONFIGS if quick else FULL_CONFIGS)
    names = list(dict.fromkeys(models_ or [m for m, _, _ in base]))
    unknown = [n for n in names if n not in models.list_models()]
    if unknown:
        raise ValueError(f"bench_models: unknown model(s) {unknown}; expected names from {models.list_models()}")
    default_batches = list(dict.fromkeys(b for _, _, b in base))
    out: List[Tuple[str, int, int]] = []
    for n in names:
        sizes = list(res) if res else (list(dict.fromkeys(r for m, r, _ in base if m == n)) or [224])
        for r in sizes:
            bs = list(batches) if batches else (list(dict.fromkeys(b for m, rr, b in base if m == n and rr == r))
                                                or default_batches)
            out += [(n, r, b) for b in bs]
    return list(dict.fromkeys(out))


def run(quick: bool, device, models: Optional[Sequence[str]] = None, *, res: Optional[Sequence[int]] = None,
        batches: Optional[Sequence[int]] = None, threads: Optional[Sequence[int]] = None,
        official_dir: Optional[str] = None, training: Optional[bool] = None, repeats: Optional[int] = None,
        with_torch: bool = False, progress: Optional[Callable[[str], None]] = None) -> List[Dict]:
    """Rows (common.ROW_KEYS) of every configuration; see the module docstring.
    ``official_dir`` None: the environment variable BENCH_OFFICIAL_DIR, else no official code."""
    device = bench_device(device)  # one intra-op thread unless `threads` says otherwise
    configs = configs_for(quick, models, res, batches)
    if device.type == "cuda":
        thread_counts: List[Optional[int]] = [None]
    else:
        thread_counts = list(threads) if threads else ([1] if quick else list(FULL_THREADS))
    training = (not quick) if training is None else training
    repeats = repeats or REPEATS["quick" if quick else "full"]
    directory, source = official_dir_from(official_dir)
    official = load_official(directory, sorted({m for m, _, _ in configs}), source)
    initial_threads = torch.get_num_threads()
    rows: List[Dict] = []
    try:
        for name, r, b in configs:
            try:
                got = measure(name, r, b, device, thread_counts, official[name], training, repeats, with_torch,
                              progress)
            except Exception as exc:  # one broken configuration must not hide the others' numbers
                got = [dict(method="vitattn:auto", role="auto", model=name, res=r, batch=b,
                            shape=f"{name} {r}x{r} b{b}", dtype="float32",
                            note=f"failed: {type(exc).__name__}: {exc}"[:300])]
            for row in got:
                print(f"{row['shape']} {row.get('threads', '')}t {row['method']}: infer {_ms(row.get('fwd_ms'))}, "
                      f"train {_ms(row.get('fwd_bwd_ms'))}, peak {row.get('infer_peak_mib')} / "
                      f"{row.get('train_peak_mib')} MiB {row.get('note', '')}", flush=True)
            rows += got
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(initial_threads)
    return rows


def _ms(v) -> str:
    return f"{v:.1f} ms" if isinstance(v, float) else "-"


def goals_report(rows: List[Dict]) -> str:
    """Issue 12's model goals (inference, one thread, vitattn over the official code)."""
    out = []
    for r in rows:
        if r.get("role") != "auto" or r.get("threads", 1) != 1:
            continue
        want = GOALS.get((r["model"], r["res"], r["batch"]), GOALS.get((r["model"], r["res"], None)))
        if want is None:
            continue
        s = r.get("vs_official_infer_speedup")
        if s is None:
            out.append(f"- {r['shape']}: no official comparison (goal >= {want}x)")
        else:
            paired = r.get("vs_official_infer_paired")
            line = (f"- {r['shape']}: inference {s:.2f}x the official code"
                    + (f" (per-round ratios: median {paired:.2f}x)" if paired is not None else "")
                    + f" (goal >= {want}x): {'met' if s >= want else 'NOT met'}")
            alone = next((o.get("vs_official_infer_speedup") for o in rows if o.get("method") == ATEN_LINEAR
                          and o["shape"] == r["shape"] and o.get("threads") == r.get("threads")), None)
            if alone is not None:
                line += f"; with F.linear as the official code ({ATEN_LINEAR}): {alone:.2f}x"
            out.append(line)
    return "\n".join(out)


def _options(ap) -> None:
    ap.add_argument("--models", nargs="*", default=None, help="model names (default: the configurations above)")
    ap.add_argument("--res", nargs="*", type=int, default=None, help="image sizes")
    ap.add_argument("--batches", nargs="*", type=int, default=None, help="batch sizes")
    ap.add_argument("--threads", nargs="*", type=int, default=None, help="intra-op thread counts (CPU; default 1 2)")
    ap.add_argument("--official-dir", default=None,
                    help=f"staged official code (default: ${OFFICIAL_DIR_ENV}; see the docstring)")
    ap.add_argument("--inference-only", action="store_true", help="no training steps")
    ap.add_argument("--with-torch", action="store_true",
                    help="also time vitattn's torch backend beside the official code")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per implementation (after 1 warm-up)")


_RUN_CONDITIONS: Dict[str, Any] = {}


def _appendix(rows: List[Dict], device: torch.device) -> str:
    directory = _RUN_CONDITIONS.get("official_dir")
    lines = ["", "## Conditions", "",
             f"- official code: {directory} (from {_RUN_CONDITIONS.get('official_source')})" if directory
             else f"- official code: not staged (no --official-dir, no ${OFFICIAL_DIR_ENV}): the baseline is "
                  "vitattn's torch backend",
             "- fwd_ms: inference (eval, no_grad); fwd_bwd_ms: one training step (forward, cross-entropy, backward, "
             "AdamW step); medians of alternating calls in one process, fp32; *_paired: median over rounds of the "
             "official / vitattn ratio within each round",
             "- peak memory: common.peak_memory_mb (CPU: allocator events, one intra-op thread, for every row)",
             f"- logits_rel_diff: max |logits - vitattn:auto logits| / max |logits|, eval, perturbed weights "
             f"(tolerance {LOGITS_RTOL:g})"]
    missing: Dict[str, List[str]] = {}
    for r in rows:
        if r.get("method") == "official" and r.get("unavailable") and r.get("threads", 1) in (1, None):
            missing.setdefault(r["unavailable"]["fwd_ms"], []).append(r["shape"])
    lines += [f"- {why}: {', '.join(shapes)}" for why, shapes in missing.items()]
    agree = [f"- {r['shape']}: {r['method']} {r['logits_rel_diff']:.1e}" for r in rows
             if isinstance(r.get("logits_rel_diff"), float) and r.get("threads", 1) in (1, None)]
    if agree:
        lines += ["", "## Logit agreement with vitattn:auto (max relative difference)", ""] + agree
    goals = goals_report(rows)
    if goals:
        lines += ["", "## Goals (issue 12: inference, one thread)", "", goals]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    import json

    from common import RESULTS_DIR

    def run_kwargs(a):
        directory, source = official_dir_from(a.official_dir)
        _RUN_CONDITIONS.update(official_dir=directory, official_source=source, out_dir=a.out_dir)
        return dict(models=a.models, res=a.res, batches=a.batches, threads=a.threads, official_dir=directory,
                    training=False if a.inference_only else None, repeats=a.repeats, with_torch=a.with_torch)

    cli("bench_models", run, COLUMNS, __doc__, quick_help="rmt_t 224x224 batch 1, inference, one thread",
        options=_options, run_kwargs=run_kwargs, appendix=_appendix, argv=argv)
    # the JSON also says where the official code came from
    path = os.path.join(_RUN_CONDITIONS.get("out_dir") or RESULTS_DIR, "bench_models.json")
    with open(path) as f:
        data = json.load(f)
    data["official_dir"] = _RUN_CONDITIONS.get("official_dir")
    data["official_source"] = _RUN_CONDITIONS.get("official_source")
    data["logits_rtol"] = LOGITS_RTOL
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
