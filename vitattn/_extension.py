"""The compiled extension vitattn._C (csrc/) and its MaSA backends "cpu" and "cuda".

Importing this module loads vitattn._C when it was built and registers its kernels into
vitattn.masa's dispatch. Without the extension nothing is registered; dispatch, explain()
and ``python -m vitattn.info`` then give the reason, and ``C`` is a stub whose use raises
ImportError with it. The torch and Triton backends never depend on this module.
"""

from __future__ import annotations

import importlib
from typing import Optional

from . import _dispatch

# the module, not the function: vitattn/__init__.py binds the name vitattn.masa to the op
_masa = importlib.import_module(__name__.rpartition(".")[0] + ".masa")

_BUILD_HINT = ("build it with `pip install --no-build-isolation -e .` from the repository "
               "(a C++ compiler and ninja are needed; VITATTN_NO_EXT=1 skips it)")

try:
    from . import _C as _compiled
    _ERR: Optional[str] = None
except ImportError as exc:  # not built, or built against another torch
    _compiled = None
    _ERR = f"the compiled extension vitattn._C cannot be imported ({exc}); {_BUILD_HINT}"


class _MissingExtension:
    """Stands in for vitattn._C when it is absent: any use raises ImportError with the reason."""

    def __init__(self, why: str):
        self._why = why

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"vitattn._C.{name} is unavailable: {self._why}")

    def __repr__(self) -> str:
        return f"<vitattn._C missing: {self._why}>"


C = _compiled if _compiled is not None else _MissingExtension(_ERR)


def available() -> bool:
    return _compiled is not None


def why_unavailable() -> str:
    return _ERR or ""


def has_cuda() -> bool:
    return _compiled is not None and bool(getattr(_compiled, "with_cuda", False))


def status() -> str:
    """One line for `python -m vitattn.info`: what was built, or why nothing was."""
    if _compiled is None:
        return f"absent: {_ERR}"
    cuda = "built" if has_cuda() else "not built (torch without CUDA or no nvcc at build time)"
    return f"loaded (CPU kernels: {_compiled.masa_cpu_isa()} build; CUDA kernels: {cuda})"


# ---------------------------------------------------------------- MaSA backends

_AXIS = {None: 0, "w": 1, "h": 2}


def _cpu_fwd(q, k, v, log_gamma, scale, axis):
    return C.masa_cpu_fwd(q, k, v, log_gamma, float(scale), _AXIS[axis])


def _cpu_bwd(dout, q, k, v, out, lse, log_gamma, scale, axis):
    return C.masa_cpu_bwd(dout, q, k, v, out, lse, log_gamma, float(scale), _AXIS[axis])


def _cpu_auto_reason(ctx) -> Optional[str]:
    """Why "auto" should not pick "cpu" for this call although it could run it, or None.

    From benchmarks/results/masa_cpu_vs_torch.md (both backends timed alternately in the
    same run, at 2 threads and at 1 thread): "cpu" is faster, forward and forward+backward
    in both runs, for the full form from 14x14 tokens up (3x to 7x at 28x28 and 56x56) and
    for the decomposed form at 56x56. It is slower for the full form on a 7x7 grid (the
    fixed cost of packing the inputs dominates) and not consistently faster for the
    decomposed form below 56x56 (its backward lost at 14x14 and 28x28), so "auto" keeps
    "torch" there.
    """
    tokens = ctx["H"] * ctx["W"]
    if ctx["decomposed"]:
        if tokens < CPU_MIN_TOKENS_DECOMPOSED:
            return (f"measured not faster than \"torch\" for the decomposed form under {CPU_MIN_TOKENS_DECOMPOSED} "
                    f"tokens (see benchmarks/results/masa_cpu_vs_torch.md)")
    elif tokens < CPU_MIN_TOKENS_FULL:
        return (f"measured slower than \"torch\" for the full form under {CPU_MIN_TOKENS_FULL} tokens "
                f"(see benchmarks/results/masa_cpu_vs_torch.md)")
    return None


CPU_MIN_TOKENS_FULL = 14 * 14
CPU_MIN_TOKENS_DECOMPOSED = 56 * 56


def _cpu_check(ctx, auto: bool) -> Optional[str]:
    dev = ctx["device"]
    if dev.type != "cpu":
        return f"the C++ CPU kernels need CPU tensors, got device type {dev.type!r}"
    if auto:
        return _cpu_auto_reason(ctx)
    return None


def _cuda_fwd(q, k, v, log_gamma, scale, axis):
    return C.masa_cuda_fwd(q, k, v, log_gamma, float(scale), _AXIS[axis])


def _cuda_bwd(dout, q, k, v, out, lse, log_gamma, scale, axis):
    return C.masa_cuda_bwd(dout, q, k, v, out, lse, log_gamma, float(scale), _AXIS[axis])


CUDA_MAX_HEAD_DIM = 256


def _cuda_check(ctx, auto: bool) -> Optional[str]:
    import torch

    dev = ctx["device"]
    if dev.type != "cuda":
        return f"the CUDA kernels need CUDA tensors, got device type {dev.type!r}"
    if ctx["dtype"] not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the CUDA kernels support float16, bfloat16 and float32, got {ctx['dtype']}"
    if max(ctx["d"], ctx["dv"]) > CUDA_MAX_HEAD_DIM:
        return (f"the CUDA kernels support head dims up to {CUDA_MAX_HEAD_DIM}, "
                f"got d={ctx['d']}, dv={ctx['dv']}")
    return None


# "cpu" ranks after the Triton interpreter's slot and before "torch" (100): on CPU
# tensors "auto" takes it wherever _cpu_auto_reason lets it (measured faster).
CPU_RANK = 50
# "cuda" ranks after "triton" (20): until a GPU measurement shows it faster (see the
# results file), "auto" keeps the Triton kernels and uses "cuda" when Triton is absent.
CUDA_RANK = 30


def _register() -> None:
    if _compiled is None:
        _dispatch.set_missing_reason("cpu", _ERR)
        _dispatch.set_missing_reason("cuda", _ERR)
        return
    _masa.register_impl("cpu", _masa.MasaImpl(_cpu_fwd, _cpu_bwd), _cpu_check, rank=CPU_RANK)
    if has_cuda():
        _masa.register_impl("cuda", _masa.MasaImpl(_cuda_fwd, _cuda_bwd), _cuda_check, rank=CUDA_RANK)
    else:
        _dispatch.set_missing_reason(
            "cuda", "vitattn._C was built without its CUDA kernels (at build time torch had no "
                    "CUDA or nvcc was not found)")


_register()
