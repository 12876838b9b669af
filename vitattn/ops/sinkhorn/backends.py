"""The Sinkhorn / OT ops' backends (one dispatcher serves sinkhorn, ot_aggregate and
ot_attention): for each, the can-run check, the static rank and the implementation.

Every implementation provides the same fixed-count loop (zero potentials; row update then
column update, `iters` times) and its exact unrolled gradient:
  sk_fwd(S (Z, n, m), la (Z, n), lb (Z, m), eps, iters) -> (plan (Z, n, m), G (Z, iters, m))
  sk_bwd(dP, S, la, lb, G, eps) -> (dS, dla, dlb)
  ot_fwd(x, ref, v, filt, eps, iters, attention) -> (out, zeta, G)
  ot_bwd(dout, x, ref, v, filt, zeta, G, eps, attention) -> (dx, dref, dv)
la / lb are the log-marginals in the accumulation dtype (float32, float64 for float64
inputs), G the column potentials after every iteration (O(iters * m) saved per problem) and
zeta the aggregate T^T v that ot_attention reuses in its backward.

"auto" order (lower rank first): triton (CUDA), torch (anywhere), overridden per shape
class by measured.json (see vitattn/_dispatch.py).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

import torch

from ... import _dispatch as D
from ... import _triton
from ..._tiles import pow2
from . import torch_impl

NAMES = ("auto", "triton", "torch")

# The Triton kernels keep a row of the plan (all m columns) and the references on chip.
TRITON_MAX_M = 256
TRITON_MAX_FEATURE = 256


def shape_class(ctx: Dict[str, Any]) -> str:
    """The key of measured.json: the call kind and the n x m size band."""
    nm = ctx["n"] * ctx["m"]
    band = "nm<=4096" if nm <= 4096 else "nm<=65536" if nm <= 65536 else "nm>65536"
    return f"{ctx['kind']},{band}"


def _load(mod) -> SimpleNamespace:
    return SimpleNamespace(sk_fwd=mod.sinkhorn_fwd, sk_bwd=mod.sinkhorn_bwd, ot_fwd=mod.ot_fwd, ot_bwd=mod.ot_bwd)


def _tile_budget(device) -> int:
    """Largest padded m x max(d, dv) tile the kernels fit in this GPU's shared memory.

    Measured by compiling the backward kernel (the larger of the two) for sm_90 without a
    GPU: padded tiles of 64 x 64 need up to 161 KiB, 256 x 32 178 KiB, 128 x 64 184 KiB,
    64 x 128 208 KiB, 256 x 128 344 KiB (Hopper allows 227 KiB). The 4096 bound for
    163 KiB parts (A100) assumes sm_80 layouts close to sm_90's, and 2048 below that is a
    guess: neither was measured.
    """
    try:
        smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    except Exception:
        smem = 0
    if smem >= 227 * 1024:
        return 8192
    if smem >= 163 * 1024:
        return 4096
    return 2048


def _triton_limits(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    if ctx["m"] > TRITON_MAX_M:
        return f"up to {TRITON_MAX_M} references (columns) are supported, got m={ctx['m']}"
    if max(ctx["d"], ctx["dv"]) > TRITON_MAX_FEATURE:
        return f"feature dims up to {TRITON_MAX_FEATURE} are supported, got d={ctx['d']}, dv={ctx['dv']}"
    if ctx["device"].type == "cuda":
        width = max(pow2(ctx["d"]), pow2(ctx["dv"]))
        budget = _tile_budget(ctx["device"])
        if pow2(ctx["m"]) * width > budget:
            return (f"the references x features tile ({pow2(ctx['m'])} x {width}, padded to powers of 2) "
                    f"needs more shared memory than this GPU offers (at most {budget} elements here); "
                    "use fewer references or a smaller head dim")
    return None


BACKENDS = (
    D.Backend("triton", 20, D.all_of(D.triton_check, _triton_limits), lambda: _load(_triton.kernels("sinkhorn"))),
    D.Backend("torch", 100, D.any_device, lambda: _load(torch_impl)),
)

dispatcher = D.Dispatcher("sinkhorn", BACKENDS, NAMES, shape_class=shape_class,
                          measured_path=os.path.join(os.path.dirname(__file__), "measured.json"))
