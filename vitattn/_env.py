"""Every environment variable vitattn reads, parsed in one place.

This module imports nothing but the standard library: setup.py loads it by path (before
vitattn or torch may be importable), and the tests read it too.

=========================  =======  =========================================================
variable                   default  meaning
=========================  =======  =========================================================
VITATTN_BACKEND            (unset)  override of ``backend="auto"``: one backend name for every
                                    op that has it (the other ops stay on "auto", with one
                                    warning), or comma-separated ``op:backend`` pairs, e.g.
                                    ``masa:cpu,sinkhorn:torch``
VITATTN_CHECK_VALUES       1        run the argument checks that read tensor values (gamma in
                                    (0, 1], permutations, marginals); each distinct tensor is
                                    checked once and remembered, so steady-state calls never
                                    synchronise with the GPU
VITATTN_DENSE_BUDGET_MB    64       the "torch" backends use dense math while the call's
                                    N x N (n x m, L x L per row) intermediates fit this many
                                    MiB, and block the computation above it
VITATTN_CPU_LINEAR         auto     the GEMM behind the models' linear layers on CPU, fp32:
                                    ``onednn`` (oneDNN's matmul), ``aten`` (F.linear: MKL's
                                    sgemm) or ``auto`` (oneDNN where it was measured faster:
                                    vitattn/nn/_linear.py)
VITATTN_NO_EXT             0        build time: do not build the compiled extension vitattn._C
VITATTN_CUDA_ARCHS         sm_80;sm_90  build time: CUDA architectures of vitattn._C
VITATTN_COMPILE_CHECK      0        tests: also compile the Triton kernels offline for
                                    sm_80/sm_90a (minutes)
VITATTN_COMPILE_MODELS     (all)    tests: with VITATTN_COMPILE_CHECK, the comma-separated
                                    models whose kernel shapes are compiled
VITATTN_COMPILE_REPORT     (unset)  tests: with VITATTN_COMPILE_CHECK, a file that receives the
                                    compile report (a table)
VITATTN_SLOW_TESTS         0        tests: run the long-running tests too
VITATTN_TEST_REQUIRE_TIMM  0        tests: a missing or broken timm fails the timm tests
                                    instead of skipping them (CI's timm environment)
=========================  =======  =========================================================

``TRITON_INTERPRET`` (Triton's own) is read here too: set to 1 before vitattn is imported,
the Triton kernels run on CPU tensors through Triton's interpreter (tests only).
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

_FALSE = ("", "0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")

# name -> (default, one-line meaning); `python -m vitattn.info` prints this table
VARIABLES: Dict[str, Tuple[str, str]] = {
    "VITATTN_BACKEND": ("", "backend override: a name for every op that has it, or op:backend pairs"),
    "VITATTN_CHECK_VALUES": ("1", "argument checks that read tensor values (each tensor checked once)"),
    "VITATTN_DENSE_BUDGET_MB": ("64", "MiB of N x N intermediates under which the torch backends go dense"),
    "VITATTN_CPU_LINEAR": ("auto", "the models' fp32 CPU linear layers: auto, onednn or aten (F.linear)"),
    "VITATTN_NO_EXT": ("0", "build time: skip the compiled extension vitattn._C"),
    "VITATTN_CUDA_ARCHS": ("sm_80;sm_90", "build time: CUDA architectures of vitattn._C"),
    "VITATTN_COMPILE_CHECK": ("0", "tests: compile the Triton kernels offline for sm_80/sm_90a"),
    "VITATTN_COMPILE_MODELS": ("", "tests: the models the full compile check covers (default: all)"),
    "VITATTN_COMPILE_REPORT": ("", "tests: file for the full compile check's report table"),
    "VITATTN_SLOW_TESTS": ("0", "tests: run the long-running tests"),
    "VITATTN_TEST_REQUIRE_TIMM": ("0", "tests: a missing timm fails the timm tests instead of skipping"),
    "TRITON_INTERPRET": ("0", "Triton's: run the Triton kernels on CPU tensors (set before import)"),
}


def _raw(name: str) -> str:
    if name not in VARIABLES:
        raise KeyError(f"vitattn reads no environment variable {name!r}; add it to vitattn/_env.py")
    return os.environ.get(name, VARIABLES[name][0]).strip()


def flag(name: str) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off/empty (any case)."""
    raw = _raw(name)
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r}: expected 1/true/yes/on or 0/false/no/off")


def positive_number(name: str) -> float:
    raw = _raw(name)
    try:
        val = float(raw)
    except ValueError:
        val = float("nan")
    if not val > 0 or val == float("inf"):
        raise ValueError(f"environment variable {name}={raw!r}: expected a positive number")
    return val


def text(name: str) -> str:
    return _raw(name)


def check_values() -> bool:
    return flag("VITATTN_CHECK_VALUES")


def dense_budget_bytes() -> int:
    return int(positive_number("VITATTN_DENSE_BUDGET_MB") * 2 ** 20)


def cpu_linear() -> str:
    raw = _raw("VITATTN_CPU_LINEAR").lower() or "auto"
    if raw not in ("auto", "onednn", "aten"):
        raise ValueError(f"environment variable VITATTN_CPU_LINEAR={raw!r}: expected auto, onednn or aten")
    return raw


def triton_interpret() -> bool:
    # Triton itself treats any non-empty value other than 0 as on
    return _raw("TRITON_INTERPRET") not in ("", "0")


def backend_override(op: str, known: Tuple[str, ...], ops: Tuple[str, ...]) -> Tuple[Optional[str], Optional[str]]:
    """VITATTN_BACKEND's choice for ``op``: (backend or None, warning or None).

    ``known`` are the backend names ``op`` accepts, ``ops`` every op name (to validate pairs).
    A single name that ``op`` does not have leaves ``op`` on "auto" with a warning; a
    malformed value, an unknown op or a backend the named op does not have raises
    ValueError naming the variable.
    """
    raw = _raw("VITATTN_BACKEND")
    if not raw:
        return None, None
    if ":" not in raw:
        if "," in raw:
            raise ValueError(f"environment variable VITATTN_BACKEND={raw!r}: expected one backend name or "
                             "comma-separated op:backend pairs such as 'masa:cpu,sinkhorn:torch'")
        if raw in known:
            return raw, None
        return None, (f"VITATTN_BACKEND={raw!r} names no backend of {op} (it has {', '.join(known)}); "
                      f"{op} stays on 'auto'")
    chosen = None
    for item in raw.split(","):
        name, sep, backend = (s.strip() for s in item.partition(":"))
        if not sep or not name or not backend:
            raise ValueError(f"environment variable VITATTN_BACKEND={raw!r}: {item.strip()!r} is not an "
                             "op:backend pair (mixing a plain name with pairs is not allowed)")
        if name not in ops:
            raise ValueError(f"environment variable VITATTN_BACKEND={raw!r}: unknown op {name!r}; "
                             f"ops are {', '.join(ops)}")
        if name == op:
            if backend not in known:
                raise ValueError(f"environment variable VITATTN_BACKEND={raw!r}: {op} has no backend "
                                 f"{backend!r}; expected one of {', '.join(known)}")
            chosen = backend
    return chosen, None
