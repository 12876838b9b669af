"""Group attention's backends: for each, the can-run check, the static rank and the
implementation.

Every implementation provides, on (B, heads, N, .) tensors of any strides and perm (N,)
int64 or None:
  fwd(q, k, v, perm, groups, scale) -> (out contiguous (B, heads, N, dv), lse (B, heads, N))
  bwd(dout, q, k, v, out, lse, perm, groups, scale) -> (dq, dk, dv)
out, lse and the gradients are in the original token order; lse is in the accumulation
dtype (float32, float64 for float64 inputs).

"auto" order (lower rank first): triton (CUDA), cpu (CPU), torch (anywhere), overridden
per device type and shape class by measured.json, written from a benchmark run by
`python benchmarks/bench_group_attention.py --update-ranking` (see vitattn/_dispatch.py).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

from ... import _dispatch as D
from ... import _extension, _triton
from . import torch_impl

NAMES = ("auto", "triton", "cpu", "torch")
MAX_HEAD_DIM = 256


def shape_class(ctx: Dict[str, Any]) -> str:
    """The key of measured.json: tokens per group band and whether tokens are permuted."""
    n = ctx["group_size"]
    band = "n<=16" if n <= 16 else "n<=64" if n <= 64 else "n<=256" if n <= 256 else "n>256"
    return f"{band},{'perm' if ctx['permuted'] else 'no-perm'}"


def _load_torch():
    return SimpleNamespace(fwd=torch_impl.group_attention_fwd, bwd=torch_impl.group_attention_bwd)


def _triton_resources(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    """The head dims, then on a GPU the kernels' shared memory against this GPU's limit and their
    register budget (kernels/group_attention.py can_run; "auto" moves on, "triton" raises)."""
    why = D.head_dims_check(MAX_HEAD_DIM)(ctx, auto)
    if why is not None or ctx["device"].type != "cuda":
        return why
    tk, common = _triton.kernels("group_attention"), _triton.kernels("_common")
    return tk.can_run(ctx["group_size"], ctx["d"], ctx["dv"], ctx["dtype"], common.smem_limit(ctx["device"]))


def _load_triton():
    tk = _triton.kernels("group_attention")
    return SimpleNamespace(fwd=tk.group_attention_fwd, bwd=tk.group_attention_bwd)


# ---------------------------------------------------------------- cpu (vitattn._C, csrc/cpu/group_attention*)

def _load_cpu():
    ops = _extension.ops()
    fwd, bwd = ops.group_attention_cpu_fwd, ops.group_attention_cpu_bwd
    return SimpleNamespace(
        fwd=lambda q, k, v, perm, groups, scale: fwd(q, k, v, perm, groups, float(scale)),
        bwd=lambda dout, q, k, v, out, lse, perm, groups, scale: bwd(dout, q, k, v, out, lse, perm, groups,
                                                                     float(scale)),
    )


BACKENDS = (
    D.Backend("triton", 20, D.all_of(D.triton_check, _triton_resources), _load_triton),
    D.Backend("cpu", 50, D.all_of(D.cpu_extension_check, D.compiled_kernels_check(
        "group attention CPU kernels", ("group_attention_cpu_fwd", "group_attention_cpu_bwd"))), _load_cpu),
    D.Backend("torch", 100, D.any_device, _load_torch),
)

dispatcher = D.Dispatcher("group_attention", BACKENDS, NAMES, shape_class=shape_class,
                          measured_path=os.path.join(os.path.dirname(__file__), "measured.json"))
