"""Offline GPU compile harness for the Triton kernels (no GPU needed).

Why: the interpreter (TRITON_INTERPRET=1) runs the kernels' Python on CPU tensors and never
runs Triton's compiler, so shared-memory overflow, too many threads or register spills only
show on the first GPU run. This harness

1. **captures** real launcher calls: inside :func:`capture`, every Triton launch
   (``kernel[grid](...)``) made under the interpreter is recorded -- the exact positional
   arguments, constexprs and launch options the launcher passed -- and skipped (the outputs
   stay uninitialised; only the calls matter). The calls come from the public ops and the
   models at their real shapes and layouts (:func:`model_case`, :func:`call_case`);
2. **replays** each call in a process without TRITON_INTERPRET (``python _compile_harness.py
   compile``) through the runtime's own binder (``create_function_from_signature`` with the
   CUDA backend of the target, then ``JITFunction._pack_args``): the same specialisation of
   strides (== 1, divisible by 16), scalars, pointer alignment and constexprs that
   ``JITFunction.run`` computes on a GPU. Tensors are replayed as CPU tensors of the recorded
   dtype and pointer alignment; integers and floats by value;
3. **compiles** every distinct specialisation for sm_80 and sm_90a with ``triton.compile``
   and reads the resources: dynamic shared memory (metadata), registers and spill bytes
   (the ptxas log of that very compilation), threads per block; :func:`violations` lists
   what would fail (shared memory above the arch's opt-in limit, more than 1024 threads,
   registers x threads above the 64K register file, grid dims above CUDA's limits) or crawl
   (spill stores + loads above a budget).

Used by tests/test_gpu_compile.py; ``python tests/_compile_harness.py report`` prints the
full table (see --help).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# max dynamic shared memory per block (opt-in), bytes: A100 163 KB, H100/H200 227 KB
SMEM_LIMIT = {80: 166912, 90: 232448}
REGISTER_FILE = 65536
MAX_THREADS = 1024
# spill stores + loads (bytes, static counts from ptxas) a kernel may have at most: a few
# scalars around a loop are harmless, tiles spilled to local memory are not
SPILL_BUDGET = 256
ARCHS = (80, 90)

# ---------------------------------------------------------------- capture (interpreter side)


def _encode(v: Any) -> Dict[str, Any]:
    import torch
    import triton.language as tl

    if isinstance(v, torch.Tensor):
        return {"t": str(v.dtype).replace("torch.", ""), "a": int(v.data_ptr() % 128)}
    if isinstance(v, bool):
        return {"b": v}
    if isinstance(v, int):
        return {"i": v}
    if isinstance(v, float):
        return {"f": v}
    if v is None:
        return {"n": None}
    if isinstance(v, str):
        return {"s": v}
    if isinstance(v, tl.dtype):
        return {"tl": v.name}
    if isinstance(v, tl.constexpr):
        return _encode(v.value)
    raise TypeError(f"cannot record a launch argument of type {type(v).__name__}: {v!r}")


class Recorder:
    """The launches seen inside :func:`capture`, one dict each (JSON-serialisable)."""

    def __init__(self):
        self.calls: List[Dict[str, Any]] = []
        self.case = ""

    def add(self, fn, args, kwargs, grid):
        if callable(grid):
            raise TypeError(f"{fn.__name__}: callable grids are not recorded")
        self.calls.append(dict(
            case=self.case, module=fn.__module__, kernel=fn.__name__,
            args=[_encode(a) for a in args], kwargs={k: _encode(v) for k, v in kwargs.items()},
            grid=[int(g) for g in grid],
        ))


@contextlib.contextmanager
def capture(execute: bool = False):
    """Record every interpreted Triton launch in the block (and skip it unless ``execute``)."""
    from triton.runtime.interpreter import InterpretedFunction

    rec = Recorder()
    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        rec.add(self.fn, args, kwargs, grid)
        if execute:
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield rec
    finally:
        InterpretedFunction.run = orig


def _torch_dtype(name: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


# Tensor arguments of the vitattn custom ops that stay in the accumulation dtype whatever the
# inputs' dtype (statistics, decay, marginals, filters, permutations); every other floating
# tensor argument is data and takes the replayed dtype. An argument name that is in neither
# list fails the replay (so a renamed argument cannot be silently mis-typed).
STAT_ARGS = {"log_gamma", "lse", "lse_w", "lse_h", "la", "lb", "G", "zeta", "pos_filter", "filt", "perm"}
DATA_ARGS = {"q", "k", "v", "x", "ref", "out", "dout", "v_mid", "S", "dP", "dy", "r", "scores",
             "compress_weight", "compress_bias", "generate_weight", "generate_bias", "wg", "bg", "wc", "bc"}


class OpCalls:
    """Every vitattn custom-op call (forward and backward) seen inside :func:`record_ops`:
    the op's name and its arguments, tensors as (shape, strides, storage offset, dtype)."""

    def __init__(self):
        self.calls: List[Dict[str, Any]] = []
        self.case = ""


@contextlib.contextmanager
def record_ops():
    """Record the vitattn custom ops called in the block (they still run)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    rec = OpCalls()

    def enc(a):
        if isinstance(a, torch.Tensor):
            return {"shape": list(a.shape), "stride": list(a.stride()), "offset": int(a.storage_offset()),
                    "dtype": str(a.dtype).replace("torch.", "")}
        if isinstance(a, (list, tuple)):
            return {"list": [enc(x) for x in a]}
        if a is None or isinstance(a, (bool, int, float, str)):
            return {"value": a}
        raise TypeError(f"cannot record an op argument of type {type(a).__name__}")

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "vitattn":
                names = [a.name for a in func._schema.arguments]
                rec.calls.append(dict(case=rec.case, op=func._schema.name.split("::")[1],
                                      args={n: enc(a) for n, a in zip(names, args)},
                                      kwargs={k: enc(v) for k, v in kwargs.items()}))
            return func(*args, **kwargs)

    with Mode():
        yield rec


def replay_ops(calls: List[Dict[str, Any]], dtype: str, rec: Optional[Recorder] = None) -> None:
    """Call every recorded op again with tensors of the recorded layouts, data in dtype (inside
    :func:`capture`, whose recorder ``rec`` then labels the launches with the op call's case)."""
    import torch

    target = _torch_dtype(dtype)

    def dec(name, d):
        if "list" in d:
            return [dec(name, x) for x in d["list"]]
        if "value" in d:
            return d["value"]
        dt = getattr(torch, d["dtype"])
        if dt.is_floating_point:
            if name in DATA_ARGS:
                dt = target
            elif name not in STAT_ARGS:
                raise KeyError(f"op argument {name!r} is neither data nor a statistic: classify it in "
                               "tests/_compile_harness.py (DATA_ARGS / STAT_ARGS)")
        span = 1 + sum((n - 1) * s for n, s in zip(d["shape"], d["stride"]) if n > 0)
        base = torch.empty(d["offset"] + span, dtype=dt)
        return base.as_strided(d["shape"], d["stride"], d["offset"])

    for c in calls:
        if rec is not None:
            rec.case = f"{c['case']}/{dtype}"
        op = getattr(torch.ops.vitattn, c["op"])
        op(*[dec(n, a) for n, a in c["args"].items()], **{k: dec(k, v) for k, v in c["kwargs"].items()})


def model_case(rec: OpCalls, name: str, batch: int = 1, img: int = 224) -> None:
    """fp32 forward and backward of a whole model with every op on the "triton" backend (the op
    calls are recorded by :func:`record_ops`; run it inside :func:`capture` to skip the kernels)."""
    import torch
    import vitattn.models as M

    rec.case = f"{name}/B{batch}"
    torch.manual_seed(0)
    model = M.create_model(name, attn_backend="triton").train()
    x = torch.randn(batch, 3, img, img, requires_grad=True)
    model(x).sum().backward()


def call_case(rec: Recorder, label: str, fn, *args, **kwargs) -> None:
    """fn(*args, **kwargs) (a public op on the "triton" backend) forward and, if possible, backward."""
    rec.case = label
    out = fn(*args, **kwargs)
    if out.requires_grad:
        out.float().sum().backward()


def save(calls: List[Dict[str, Any]], path: str) -> None:
    with open(path, "w") as f:
        json.dump(calls, f)


# ---------------------------------------------------------------- replay + compile (compiler side)

_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _decode(d: Dict[str, Any]):
    import torch
    import triton.language as tl

    (kind, v), = d.items()
    if kind == "i":
        return int(v)
    if kind == "f":
        return float(v)
    if kind == "b":
        return bool(v)
    if kind == "n":
        return None
    if kind == "s":
        return v
    if kind == "tl":
        return getattr(tl, {"fp32": "float32", "fp64": "float64", "fp16": "float16", "bf16": "bfloat16"}.get(v, v))
    raise ValueError(f"unknown recorded argument {d}")


_KEEP = []  # backing storage of the replayed tensors (their pointers must stay valid)


def _decode_arg(d: Dict[str, Any]):
    import torch

    if "t" not in d:
        return _decode(d)
    dt = getattr(torch, d["t"])
    size = torch.empty((), dtype=dt).element_size()
    base = torch.empty(1024, dtype=torch.uint8)
    _KEEP.append(base)
    # offset so that data_ptr % 128 equals the recorded residue (residues are multiples of
    # the element size: tensors are element-aligned)
    off = (d["a"] - base.data_ptr()) % 128
    return base[off:off + 8 * size].view(dt)


def _ptxas_resources(log: str) -> Dict[str, int]:
    regs = _PTXAS_REGS.findall(log)
    spill = _PTXAS_SPILL.findall(log)
    if not regs or not spill:
        raise RuntimeError(f"no ptxas resource report in the compile log:\n{log[-2000:]}")
    stack, st, ld = (int(x) for x in spill[-1])
    return dict(regs=int(regs[-1]), stack=stack, spill_st=st, spill_ld=ld)


def _target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def specialise(call: Dict[str, Any], arch: int):
    """(jit function, signature, constexprs, attrs, options, cache key) as JITFunction.run builds them."""
    import importlib

    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    jit = getattr(importlib.import_module(call["module"]), call["kernel"])
    if not hasattr(jit, "_pack_args"):
        raise RuntimeError(f"{call['kernel']} is not a JITFunction here: is TRITON_INTERPRET set?")
    backend = make_backend(_target(arch))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    args = [_decode_arg(a) for a in call["args"]]
    kwargs = {k: _decode_arg(v) for k, v in call["kwargs"].items()}
    # as JITFunction.run does before binding
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key({}, specialization, options)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return jit, signature, constexprs, attrs, options, key


def compile_call(call: Dict[str, Any], arch: int) -> Dict[str, Any]:
    """Compile one recorded call for sm_<arch>; its resources (or the compile error)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    kw = {k: next(iter(v.values())) for k, v in call["kwargs"].items()}
    # the op's dtype: its lowest-precision floating tensor (statistics and scratch are fp32)
    floats = [a["t"] for a in call["args"] if "t" in a and a["t"] in ("float16", "bfloat16", "float32", "float64")]
    first = next((t for t in ("float16", "bfloat16", "float32", "float64") if t in floats), "")
    out = dict(case=call["case"], module=call["module"], kernel=call["kernel"], arch=arch, grid=call["grid"],
               dtype=first, meta={k: v for k, v in kw.items() if k not in _OPTIONS},
               opts={k: v for k, v in kw.items() if k in _OPTIONS})
    t0 = time.time()
    try:
        jit, signature, constexprs, attrs, options, _ = specialise(call, arch)
        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=_target(arch),
                                      options=options.__dict__)
        out.update(_ptxas_resources(buf.getvalue()))
        md = compiled.metadata
        out.update(shared=int(md.shared), num_warps=int(md.num_warps), num_stages=int(md.num_stages),
                   num_ctas=int(getattr(md, "num_ctas", 1)))
    except Exception as exc:  # reported as a violation, not raised: one bad kernel must not hide the rest
        out["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
    out["seconds"] = round(time.time() - t0, 2)
    return out


def _distinct(calls: List[Dict[str, Any]], arch: int):
    """The calls with distinct specialisations (what the runtime would compile), with every case seen."""
    seen: Dict[Any, Dict[str, Any]] = {}
    for c in calls:
        key = (c["module"], c["kernel"], specialise(c, arch)[-1])
        if key in seen:
            cases = seen[key].setdefault("also", [])
            if c["case"] != seen[key]["case"] and c["case"] not in cases:
                cases.append(c["case"])
            g = seen[key]["grid"]
            seen[key]["grid"] = [max(a, b) for a, b in zip(g, c["grid"])]
        else:
            seen[key] = dict(c)
    return list(seen.values())


def _work(item):
    call, arch = item
    os.environ.pop("TRITON_INTERPRET", None)
    res = compile_call(call, arch)
    if call.get("also"):
        res["also"] = call["also"]
    return res


def compile_all(calls: List[Dict[str, Any]], archs: Iterable[int] = ARCHS, jobs: int = 2,
                progress: Optional[str] = None) -> List[Dict[str, Any]]:
    """Compile the distinct specialisations of calls for every arch, jobs processes in parallel
    (each result also appended, as one JSON line, to the file progress if given)."""
    items = [(c, arch) for arch in archs for c in _distinct(calls, arch)]
    # the largest tiles first: the slowest compilations do not end up last in one worker
    items.sort(key=lambda it: -sum(v.get("i", 0) for k, v in it[0]["kwargs"].items() if k.startswith("BLOCK")))
    results = []

    def keep(r):
        results.append(r)
        if progress:
            with open(progress, "a") as f:
                f.write(json.dumps(r) + "\n")

    if jobs <= 1 or len(items) <= 1:
        for it in items:
            keep(_work(it))
        return results
    import multiprocessing as mp

    with mp.get_context("fork").Pool(jobs) as pool:
        for r in pool.imap_unordered(_work, items, chunksize=1):
            keep(r)
    return results


def violations(results: List[Dict[str, Any]], spill_budget: int = SPILL_BUDGET) -> List[str]:
    """Sentences naming every result that would fail to launch or spill above the budget."""
    bad = []
    for r in results:
        where = f"{r['kernel']} sm_{r['arch']} [{r['case']}] {r['dtype']} {r['meta']} {r['opts']}"
        if "error" in r:
            bad.append(f"{where}: does not compile: {r['error']}")
            continue
        threads = 32 * r["num_warps"] * r["num_ctas"]
        if r["shared"] > SMEM_LIMIT[r["arch"]]:
            bad.append(f"{where}: {r['shared']} B of shared memory > {SMEM_LIMIT[r['arch']]} B")
        if threads > MAX_THREADS:
            bad.append(f"{where}: {threads} threads per block > {MAX_THREADS}")
        if r["regs"] * threads > REGISTER_FILE:
            bad.append(f"{where}: {r['regs']} registers x {threads} threads > {REGISTER_FILE}")
        if r["spill_st"] + r["spill_ld"] > spill_budget:
            bad.append(f"{where}: spills {r['spill_st']} B stores + {r['spill_ld']} B loads > {spill_budget} B")
        g = r["grid"] + [1] * (3 - len(r["grid"]))
        if g[0] >= 2**31 or g[1] > 65535 or g[2] > 65535:
            bad.append(f"{where}: grid {tuple(g)} exceeds CUDA's limits")
    return bad


def table(results: List[Dict[str, Any]]) -> str:
    """A markdown table, one line per compiled specialisation."""
    lines = ["| kernel | arch | case | dtype | config | warps | smem B | regs | spill st/ld B | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["kernel"], r["case"], r["arch"])):
        cfg = ",".join(f"{k.replace('BLOCK_', '')}={v}" for k, v in r["meta"].items()
                       if k.startswith("BLOCK") or k in ("PACK", "MODE"))
        prec = r["meta"].get("PREC", "")
        if "error" in r:
            lines.append(f"| {r['kernel']} | {r['arch']} | {r['case']} | {r['dtype']} | {cfg} {prec} | | ERROR | | | "
                         f"{r['seconds']} |")
            continue
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['case']} | {r['dtype']} | {cfg} {prec} | {r['num_warps']} | "
                     f"{r['shared']} | {r['regs']} | {r['spill_st']}/{r['spill_ld']} | {r['seconds']} |")
    return "\n".join(lines)


def run_compile(calls: List[Dict[str, Any]], archs=ARCHS, jobs: int = 2, timeout: float = 3600) -> List[Dict[str, Any]]:
    """compile_all in a fresh process without TRITON_INTERPRET (and an empty Triton cache, so that
    every compilation runs ptxas and reports its registers and spills)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "calls.json"), os.path.join(tmp, "results.json")
        save(calls, src)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = os.path.join(tmp, "cache")
        cmd = [sys.executable, os.path.abspath(__file__), "compile", src, dst, "--jobs", str(jobs),
               "--arch", ",".join(str(a) for a in archs)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"compile step failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
        with open(dst) as f:
            return json.load(f)


# ---------------------------------------------------------------- command line


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="compile recorded calls (JSON) without TRITON_INTERPRET")
    c.add_argument("calls")
    c.add_argument("results")
    c.add_argument("--jobs", type=int, default=2)
    c.add_argument("--arch", default="80,90")
    c.add_argument("--progress", default=None, help="append each result as a JSON line to this file")
    a = p.parse_args(argv)
    if a.cmd == "compile":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            raise SystemExit("compile: unset TRITON_INTERPRET (the kernels must be JIT functions)")
        with open(a.calls) as f:
            calls = json.load(f)
        results = compile_all(calls, [int(x) for x in a.arch.split(",")], a.jobs, a.progress)
        with open(a.results, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
