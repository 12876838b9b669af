"""DynaMixer's backends: for each, the can-run check, the static rank and the implementation.

An implementation provides either the mixing part or the whole op, on 5-D x (N0, N1, N2, L, C)
of any strides with R (N0, N1, N2, L, S*d) the compressed x (laid out by
torch_impl.empty_tokenwise, as y and dx are):
  mixing part (triton, torch; op.py runs the token-wise compress GEMMs around it,
  torch_impl.compress_fwd / compress_bwd):
    mix_fwd(x, r, wg, bg, S) -> (y like x, lse (N0, N1, N2, S, L) in the accumulation dtype)
    mix_bwd(dy, x, r, wg, bg, lse, S) -> (dx_mix, dR, dW_g, db_g)
  whole op (cpu: compress fused with the mixing, x read once per pass):
    fwd(x, wc, bc, wg, bg, S) -> (y, r, lse)
    bwd(dy, x, r, wc, wg, bg, lse, S, need_compress_bias) -> (dx, dW_c, db_c or None, dW_g, db_g or None)
  weight gradients in the accumulation dtype (float32, float64 for float64 inputs).

"auto" order (lower rank first): triton (CUDA), cpu (CPU), torch (anywhere), overridden per
shape class by measured.json (see vitattn/_dispatch.py).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

from ... import _dispatch as D
from ... import _extension, _triton
from . import torch_impl

NAMES = ("auto", "triton", "cpu", "torch")

# limits of the Triton kernels on any device (kernels/dynamixer.py can_run adds, on a GPU, the
# register and shared-memory limits of the dtype and this GPU)
TRITON_MAX_L = 64
TRITON_MAX_LD = 512


def shape_class(ctx: Dict[str, Any]) -> str:
    """The key of measured.json: the mixing length band."""
    L = ctx["L"]
    return "L<=16" if L <= 16 else "L<=32" if L <= 32 else "L<=64" if L <= 64 else "L>64"


def _triton_limits(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    if ctx["L"] > TRITON_MAX_L:
        return f"sequence lengths up to {TRITON_MAX_L} are supported, got L={ctx['L']}"
    if ctx["L"] * ctx["d"] > TRITON_MAX_LD:
        return f"L*d up to {TRITON_MAX_LD} is supported, got L*d={ctx['L'] * ctx['d']}"
    if ctx["device"].type == "cuda":
        tk, common = _triton.kernels("dynamixer"), _triton.kernels("_common")
        return tk.can_run(ctx["L"], ctx["C"] // ctx["S"], ctx["L"] * ctx["d"], ctx["dtype"],
                          common.smem_limit(ctx["device"]))
    return None


def _load_triton():
    tk = _triton.kernels("dynamixer")

    # the kernels write into buffers laid out like x (they import nothing from vitattn)
    def mix_fwd(x, r, wg, bg, S):
        return tk.mix_fwd(x, r, wg, bg, S, torch_impl.empty_tokenwise(x, x.shape[-1], x.dtype))

    def mix_bwd(dy, x, r, wg, bg, lse, S):
        return tk.mix_bwd(dy, x, r, wg, bg, lse, S, torch_impl.empty_tokenwise(x, x.shape[-1], x.dtype))

    return SimpleNamespace(mix_fwd=mix_fwd, mix_bwd=mix_bwd)


# ---------------------------------------------------------------- cpu (vitattn._C, csrc/cpu/dynamixer*)

CPU_DTYPES = ("torch.float32", "torch.float64", "torch.float16", "torch.bfloat16")


def _cpu_dtype_check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    if str(ctx["dtype"]) not in CPU_DTYPES:
        return f"the C++ CPU kernels support float32, float64, float16 and bfloat16, got {ctx['dtype']}"
    return None


def _load_cpu():
    ops = _extension.ops()

    # the kernels write y, r and dx into buffers laid out like x (the fake functions' layout)
    def fwd(x, wc, bc, wg, bg, S):
        y = torch_impl.empty_tokenwise(x, x.shape[-1], x.dtype)
        r = torch_impl.empty_tokenwise(x, wc.shape[0], x.dtype)
        lse = ops.dynamixer_cpu_fwd(x, wc, bc, wg, bg, S, y, r)
        return y, r, lse

    # the kernels recompute the softmax from r (bitwise the forward's); lse is not needed
    def bwd(dy, x, r, wc, wg, bg, lse, S, need_compress_bias):
        dx = torch_impl.empty_tokenwise(x, x.shape[-1], x.dtype)
        dwc, dbc, dwg, dbg = ops.dynamixer_cpu_bwd(dy, x, r, wc, wg, bg, S, need_compress_bias, dx)
        return dx, dwc, dbc if need_compress_bias else None, dwg, dbg if bg is not None else None

    return SimpleNamespace(fwd=fwd, bwd=bwd)


BACKENDS = (
    D.Backend("triton", 20, D.all_of(D.triton_check, _triton_limits), _load_triton),
    D.Backend("cpu", 50, D.all_of(D.cpu_extension_check, _cpu_dtype_check, D.compiled_kernels_check(
        "DynaMixer CPU kernels", ("dynamixer_cpu_fwd", "dynamixer_cpu_bwd"))), _load_cpu),
    D.Backend("torch", 100, D.any_device,
              lambda: SimpleNamespace(mix_fwd=torch_impl.mix_fwd, mix_bwd=torch_impl.mix_bwd)),
)

dispatcher = D.Dispatcher("dynamixer", BACKENDS, NAMES, shape_class=shape_class,
                          measured_path=os.path.join(os.path.dirname(__file__), "measured.json"))
