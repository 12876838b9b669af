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

"auto" order (lower rank first): triton (CUDA), cpu (CPU, C++ kernels), torch (anywhere),
overridden per device type and shape class by measured.json (written by
`python benchmarks/bench_sinkhorn.py --update-ranking`; see vitattn/_dispatch.py).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

from ... import _dispatch as D
from ... import _extension, _triton
from . import torch_impl

NAMES = ("auto", "triton", "cpu", "torch")

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


def _triton_limits(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    if ctx["m"] > TRITON_MAX_M:
        return f"up to {TRITON_MAX_M} references (columns) are supported, got m={ctx['m']}"
    if max(ctx["d"], ctx["dv"]) > TRITON_MAX_FEATURE:
        return f"feature dims up to {TRITON_MAX_FEATURE} are supported, got d={ctx['d']}, dv={ctx['dv']}"
    if ctx["device"].type == "cuda":
        # the kernels' shared memory against this GPU's limit and their register budget
        tk, common = _triton.kernels("sinkhorn"), _triton.kernels("_common")
        return tk.can_run(ctx["n"], ctx["m"], ctx["d"], ctx["dv"], ctx["dtype"], ctx["kind"] != "sinkhorn",
                          common.smem_limit(ctx["device"]))
    return None


# ---------------------------------------------------------------- cpu (vitattn._C, csrc/cpu/sinkhorn*)


class _Cpu:
    """The C++ kernels (torch.ops.vitattn_C.sinkhorn_{,ot_}cpu_{fwd,bwd}): the contract above,
    fp16/bf16 inputs computed in fp32, strided inputs read in place."""

    def __init__(self):
        self.ops = _extension.ops()

    def sk_fwd(self, S, la, lb, eps, iters):
        return self.ops.sinkhorn_cpu_fwd(S, la, lb, float(eps), int(iters))

    def sk_bwd(self, dP, S, la, lb, G, eps):
        return self.ops.sinkhorn_cpu_bwd(dP, S, la, lb, G, float(eps))

    def ot_fwd(self, x, ref, v, filt, eps, iters, attention):
        return self.ops.sinkhorn_ot_cpu_fwd(x, ref, v, filt, float(eps), int(iters), bool(attention))

    def ot_bwd(self, dout, x, ref, v, filt, zeta, G, eps, attention):
        return self.ops.sinkhorn_ot_cpu_bwd(dout, x, ref, v, filt, zeta, G, float(eps), bool(attention))


BACKENDS = (
    D.Backend("triton", 20, D.all_of(D.triton_check, _triton_limits), lambda: _load(_triton.kernels("sinkhorn"))),
    D.Backend("cpu", 50, D.all_of(D.cpu_extension_check,
                                  D.compiled_kernels_check("Sinkhorn CPU kernels", ("sinkhorn_cpu_fwd",))), _Cpu),
    D.Backend("torch", 100, D.any_device, lambda: _load(torch_impl)),
)

dispatcher = D.Dispatcher("sinkhorn", BACKENDS, NAMES, shape_class=shape_class,
                          measured_path=os.path.join(os.path.dirname(__file__), "measured.json"))
