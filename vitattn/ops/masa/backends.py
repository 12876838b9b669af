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
overridden per device type and shape class by measured.json, written from a benchmark run by
`python benchmarks/bench_masa.py --update-ranking` (see vitattn/_dispatch.py).
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


def _triton_resources(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    """The head dims, then on a GPU the kernels' shared memory against this GPU's limit and their
    register budget (kernels/masa.py can_run; "auto" moves on, an explicit "triton" raises)."""
    why = D.head_dims_check(MAX_HEAD_DIM)(ctx, auto)
    if why is not None or ctx["device"].type != "cuda":
        return why
    tk, common = _triton.kernels("masa"), _triton.kernels("_common")
    passes = (ctx["W"], ctx["H"]) if ctx["decomposed"] else (ctx["H"] * ctx["W"],)
    return tk.can_run(passes, ctx["d"], ctx["dv"], ctx["dtype"], common.smem_limit(ctx["device"]))


def _load_triton():
    # the whole op in the kernels: the decomposed backward's W pass adds into the H pass's dq /
    # dk inside the kernels, and delta is formed there (kernels/masa.py)
    tk = _triton.kernels("masa")
    return SimpleNamespace(fwd=tk.forward, bwd=tk.backward)


# ---------------------------------------------------------------- cpu and cuda (vitattn._C)
#
# The compiled kernels provide the whole op (csrc/cpu/masa.cpp, csrc/cuda/masa_torch.cpp):
# torch.ops.vitattn_C.masa_<device>_fwd / _bwd take exactly the contract's arguments. The CPU
# kernels fuse the decomposed form's two passes per (batch, head); the CUDA side runs them
# one after the other.

def _compiled_kernels_check(device: str) -> D.Check:
    return D.compiled_kernels_check(f"MaSA whole-op {device} kernels", (f"masa_{device}_fwd", f"masa_{device}_bwd"))


def _load_compiled(device: str):
    ops = _extension.ops()
    return SimpleNamespace(fwd=getattr(ops, f"masa_{device}_fwd").default,
                           bwd=getattr(ops, f"masa_{device}_bwd").default)


def _cuda_dtype_check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    if str(ctx["dtype"]) not in ("torch.float16", "torch.bfloat16", "torch.float32"):
        return f"the CUDA kernels support float16, bfloat16 and float32, got {ctx['dtype']}"
    return None


# "cuda" ranks after "triton" until a GPU measurement shows it faster (it has never run).
BACKENDS = (
    D.Backend("triton", 20, D.all_of(D.triton_check, _triton_resources), _load_triton),
    D.Backend("cuda", 30, D.all_of(D.cuda_extension_check, _compiled_kernels_check("cuda"), _cuda_dtype_check,
                                   D.head_dims_check(MAX_HEAD_DIM)), lambda: _load_compiled("cuda")),
    D.Backend("cpu", 50, D.all_of(D.cpu_extension_check, _compiled_kernels_check("cpu")),
              lambda: _load_compiled("cpu")),
    D.Backend("torch", 100, D.any_device, _load_torch),
)

dispatcher = D.Dispatcher("masa", BACKENDS, NAMES, shape_class=shape_class,
                          measured_path=os.path.join(os.path.dirname(__file__), "measured.json"))
