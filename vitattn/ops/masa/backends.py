"""MaSA's backends: for each, the can-run check, the static rank and the implementation.

Every implementation provides the whole op (op.py calls it inside the custom op):
  fwd(q, k, v, log_gamma, scale, decomposed) -> (out, v_mid, lse_w, lse_h)
  bwd(dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h, scale, decomposed)
      -> (dq, dk, dv, dlog_gamma (heads,) in the accumulation dtype)
q, k (B, heads, H, W, d) and v (B, heads, H, W, dv) come with any strides; log_gamma is
(heads,) in the accumulation dtype (float32, float64 for float64 inputs); out is
(B, heads, H, W, dv) in q's dtype and the lse tensors hold one log-sum-exp per query row in
the accumulation dtype. Full form: lse_w is the grid's lse, v_mid and lse_h are empty (0,).
Decomposed: the pass along W inside every row gives v_mid and lse_w, the pass along H inside
every column over v_mid gives out and lse_h; a backend may fuse the passes.

"auto" order (lower rank first): triton (CUDA), cuda (CUDA), cpu (CPU), torch (anywhere),
overridden per shape class by measured.json (see vitattn/_dispatch.py).
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

from ... import _dispatch as D
from ... import _extension, _triton
from . import torch_impl

NAMES = ("auto", "cuda", "triton", "cpu", "torch")
MAX_HEAD_DIM = 256  # Triton and CUDA kernels keep a query tile's features on chip


def shape_class(ctx: Dict[str, Any]) -> str:
    """The key of measured.json: form and token count band (the tile shapes' regimes)."""
    n = ctx["H"] * ctx["W"]
    band = "n<=64" if n <= 64 else "n<=256" if n <= 256 else "n<=1024" if n <= 1024 else "n>1024"
    return f"{'decomposed' if ctx['decomposed'] else 'full'},{band}"


# ---------------------------------------------------------------- torch


def _load_torch():
    return torch_impl.TORCH


# ---------------------------------------------------------------- triton


def _load_triton():
    # the whole op in the kernels: the decomposed backward's W pass adds into the H pass's dq /
    # dk inside the kernels, and delta is formed there (kernels/masa.py)
    tk = _triton.kernels("masa")
    return SimpleNamespace(fwd=tk.forward, bwd=tk.backward)


# ---------------------------------------------------------------- cpu (vitattn._C, csrc/cpu/masa*)


class _CppPasses:
    """The compiled kernels' per-pass entry points (axis 0 full, 1 along W, 2 along H)."""

    _AXIS = {None: 0, "w": 1, "h": 2}

    def __init__(self, device: str):
        self.device = device

    def pass_fwd(self, q, k, v, log_gamma, scale, axis):
        fn = getattr(_extension.C, f"masa_{self.device}_fwd")
        return fn(q, k, v, log_gamma, float(scale), self._AXIS[axis])

    def pass_bwd(self, dout, q, k, v, out, lse, log_gamma, scale, axis):
        fn = getattr(_extension.C, f"masa_{self.device}_bwd")
        return fn(dout, q, k, v, out, lse, log_gamma, float(scale), self._AXIS[axis])


def _load_cpu():
    p = _CppPasses("cpu")
    return torch_impl.TwoPass(p.pass_fwd, p.pass_bwd)


def _load_cuda():
    p = _CppPasses("cuda")
    return torch_impl.TwoPass(p.pass_fwd, p.pass_bwd)


# From benchmarks/results/masa_cpu_vs_torch.md (both backends timed alternately in one run):
# "cpu" is faster than "torch" for the full form from 14x14 tokens up and for the decomposed
# form at 56x56; below that "auto" keeps "torch".
CPU_MIN_TOKENS_FULL = 14 * 14
CPU_MIN_TOKENS_DECOMPOSED = 56 * 56


def _cpu_check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    why = D.cpu_extension_check(ctx, auto)
    if why is not None or not auto:
        return why
    tokens = ctx["H"] * ctx["W"]
    least = CPU_MIN_TOKENS_DECOMPOSED if ctx["decomposed"] else CPU_MIN_TOKENS_FULL
    if tokens < least:
        form = "decomposed" if ctx["decomposed"] else "full"
        return (f"measured not faster than \"torch\" for the {form} form under {least} tokens "
                "(benchmarks/results/masa_cpu_vs_torch.md)")
    return None


def _cuda_dtype_check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    if str(ctx["dtype"]) not in ("torch.float16", "torch.bfloat16", "torch.float32"):
        return f"the CUDA kernels support float16, bfloat16 and float32, got {ctx['dtype']}"
    return None


# "cuda" ranks after "triton" until a GPU measurement shows it faster (it has never run).
BACKENDS = (
    D.Backend("triton", 20, D.all_of(D.triton_check, D.head_dims_check(MAX_HEAD_DIM)), _load_triton),
    D.Backend("cuda", 30, D.all_of(D.cuda_extension_check, _cuda_dtype_check, D.head_dims_check(MAX_HEAD_DIM)),
              _load_cuda),
    D.Backend("cpu", 50, _cpu_check, _load_cpu),
    D.Backend("torch", 100, D.any_device, _load_torch),
)

dispatcher = D.Dispatcher("masa", BACKENDS, NAMES, shape_class=shape_class,
                          measured_path=os.path.join(os.path.dirname(__file__), "measured.json"))
