"""DynaMixer's backends: for each, the can-run check, the static rank and the implementation.

Every implementation provides the mixing part on 5-D x (N0, N1, N2, L, C) of any strides,
given the compressed R (N0, N1, N2, L, S*d) (laid out by torch_impl.empty_tokenwise):
  mix_fwd(x, r, wg, bg, S) -> (y like x, lse (N0, N1, N2, S, L) in the accumulation dtype)
  mix_bwd(dy, x, r, wg, bg, lse, S) -> (dx_mix, dR, dW_g, db_g)
The token-wise compress GEMMs around it are shared (torch_impl.compress_fwd / compress_bwd,
called by op.py).

"auto" order (lower rank first): triton (CUDA), torch (anywhere), overridden per shape
class by measured.json (see vitattn/_dispatch.py).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

from ... import _dispatch as D
from ... import _triton
from . import torch_impl

NAMES = ("auto", "triton", "torch")

# limits of the Triton kernels: a program keeps a (rows, L, C/S) block of x and a
# (rows, L, 16) block of logits in registers, and a full generate row of length L*d
TRITON_MAX_L = 64
TRITON_MAX_LD = 512
TRITON_MAX_CS = 128


def shape_class(ctx: Dict[str, Any]) -> str:
    """The key of measured.json: the mixing length band."""
    L = ctx["L"]
    return "L<=16" if L <= 16 else "L<=32" if L <= 32 else "L<=64" if L <= 64 else "L>64"


def _triton_limits(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    if ctx["L"] > TRITON_MAX_L:
        return f"sequence lengths up to {TRITON_MAX_L} are supported, got L={ctx['L']}"
    if ctx["L"] * ctx["d"] > TRITON_MAX_LD:
        return f"L*d up to {TRITON_MAX_LD} is supported, got L*d={ctx['L'] * ctx['d']}"
    if ctx["C"] // ctx["S"] > TRITON_MAX_CS:
        return f"channels per segment up to {TRITON_MAX_CS} are supported, got C/S={ctx['C'] // ctx['S']}"
    return None


def _load_triton():
    tk = _triton.kernels("dynamixer")

    # the kernels write into buffers laid out like x (they import nothing from vitattn)
    def mix_fwd(x, r, wg, bg, S):
        return tk.mix_fwd(x, r, wg, bg, S, torch_impl.empty_tokenwise(x, x.shape[-1], x.dtype))

    def mix_bwd(dy, x, r, wg, bg, lse, S):
        return tk.mix_bwd(dy, x, r, wg, bg, lse, S, torch_impl.empty_tokenwise(x, x.shape[-1], x.dtype))

    return SimpleNamespace(mix_fwd=mix_fwd, mix_bwd=mix_bwd)


BACKENDS = (
    D.Backend("triton", 20, D.all_of(D.triton_check, _triton_limits), _load_triton),
    D.Backend("torch", 100, D.any_device,
              lambda: SimpleNamespace(mix_fwd=torch_impl.mix_fwd, mix_bwd=torch_impl.mix_bwd)),
)

dispatcher = D.Dispatcher("dynamixer", BACKENDS, NAMES, shape_class=shape_class,
                          measured_path=os.path.join(os.path.dirname(__file__), "measured.json"))
