"""Manhattan self-attention (RMT): the public function, its validation, and the
``vitattn::masa_fwd`` / ``vitattn::masa_bwd`` custom ops that run the chosen backend.

Life of a call: masa() casts for autocast, validates, turns gamma into log(gamma) per
head, asks the dispatcher (backends.py) for a backend name and calls
torch.ops.vitattn.masa_fwd, whose implementation runs that backend; the registered
autograd formula calls torch.ops.vitattn.masa_bwd with the saved tensors. In plain eager
mode masa_fwd_call / masa_bwd_call run the same implementations without the custom ops'
dispatcher layers (vitattn/ops/_library.py).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ... import _validate as V
from ..._dtypes import acc_dtype, autocast_inputs
from .._library import LIB, op_caller, register_autograd
from .._onnx import exporting as _onnx_exporting
from . import onnx_impl
from .backends import dispatcher

OP = "masa"

# ---------------------------------------------------------------- custom ops

LIB.define("masa_fwd(Tensor q, Tensor k, Tensor v, Tensor log_gamma, float scale, bool decomposed, str backend)"
           " -> (Tensor, Tensor, Tensor, Tensor)")
LIB.define("masa_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor log_gamma, Tensor out, Tensor v_mid, "
           "Tensor lse_w, Tensor lse_h, float scale, bool decomposed, str backend) -> (Tensor, Tensor, Tensor, Tensor)")


def _fwd_shapes(q: Tensor, v: Tensor, decomposed: bool):
    B, heads, H, W, _ = q.shape
    out = q.new_empty((B, heads, H, W, v.shape[-1]))
    lse = q.new_empty((B, heads, H, W), dtype=acc_dtype(q.dtype))
    none = lambda t: t.new_empty((0,))
    if not decomposed:
        return out, none(out), lse, none(lse)
    return out, q.new_empty(out.shape), lse, lse.new_empty(lse.shape)


def _masa_fwd(q, k, v, log_gamma, scale, decomposed, backend):
    if q.numel() == 0 or v.numel() == 0:  # an empty batch, grid or value width
        return tuple(t.zero_() for t in _fwd_shapes(q, v, decomposed))
    return tuple(dispatcher.impl(backend).fwd(q, k, v, log_gamma, scale, decomposed))


def _masa_bwd(dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h, scale, decomposed, backend):
    if q.numel() == 0 or v.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(log_gamma)
    dq, dk, dv, dlg = dispatcher.impl(backend).bwd(dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h,
                                                   scale, decomposed)
    return dq, dk, dv, dlg.to(log_gamma.dtype)


LIB.impl("masa_fwd", _masa_fwd, "CompositeExplicitAutograd")
LIB.impl("masa_bwd", _masa_bwd, "CompositeExplicitAutograd")
masa_bwd_call = op_caller("masa_bwd", _masa_bwd)


@torch.library.register_fake("vitattn::masa_fwd", lib=LIB)
def _(q, k, v, log_gamma, scale, decomposed, backend):
    return _fwd_shapes(q, v, decomposed)


@torch.library.register_fake("vitattn::masa_bwd", lib=LIB)
def _(dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h, scale, decomposed, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), log_gamma.new_empty(log_gamma.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, log_gamma, scale, decomposed, backend = inputs
    out, v_mid, lse_w, lse_h = output
    ctx.save_for_backward(q, k, v, log_gamma, out, v_mid, lse_w, lse_h)
    ctx.scale, ctx.decomposed, ctx.backend = scale, decomposed, backend
    # v_mid and the lse tensors never get a gradient: no zero-filled tensors for them
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dv_mid, _dlse_w, _dlse_h):
    if dout is None:  # only the internal outputs were used
        return None, None, None, None, None, None, None
    q, k, v, log_gamma, out, v_mid, lse_w, lse_h = ctx.saved_tensors
    dq, dk, dv, dlg = masa_bwd_call(
        dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h, ctx.scale, ctx.decomposed, ctx.backend)
    return dq, dk, dv, dlg, None, None, None


masa_fwd_call = register_autograd("masa_fwd", _masa_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- validation


def _bad_gamma(g: Tensor) -> Tensor:
    return ((g > 0) & (g <= 1)).logical_not()


def _log_gamma(gamma, heads: int, ref: Tensor) -> Tensor:
    """Validate gamma and return log(gamma) as a (heads,) tensor (differentiable if gamma is)."""
    acc = acc_dtype(ref.dtype)
    if isinstance(gamma, Tensor):
        if gamma.dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"{OP}: gamma must be a floating tensor, got {gamma.dtype}")
        if gamma.dim() > 1 or (gamma.dim() == 1 and gamma.shape[0] not in (1, heads)):
            raise ValueError(f"{OP}: gamma must be a float, a scalar tensor or a tensor of shape ({heads},) "
                             f"(one decay per head), got shape {tuple(gamma.shape)}")
        if gamma.device != ref.device:
            raise ValueError(f"{OP}: gamma is on {gamma.device} but q is on {ref.device}; they must match")
        V.check_values(OP, "gamma in (0, 1]", gamma, _bad_gamma,
                       lambda g: f"{OP}: gamma values must lie in (0, 1], got {g.detach().cpu().tolist()}")
        return torch.log(gamma.to(acc)).reshape(-1).expand(heads).contiguous()
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"{OP}: gamma must be a float or a tensor, got {type(gamma).__name__}")
    g = float(gamma)
    if not (0.0 < g <= 1.0):
        raise ValueError(f"{OP}: gamma must lie in (0, 1], got {g}")
    return torch.full((heads,), math.log(g), device=ref.device, dtype=acc)


def _validate(q, k, v, decomposed) -> None:
    V.attention_inputs(OP, q, k, v, "B, heads, H, W, d")
    if not isinstance(decomposed, bool):
        raise TypeError(f"{OP}: decomposed must be a bool, got {type(decomposed).__name__}")


def _context(q: Tensor, v: Tensor, decomposed: bool) -> dict:
    B, heads, H, W, d = q.shape
    return dict(device=q.device, dtype=q.dtype, d=d, dv=v.shape[-1], H=H, W=W, B=B, heads=heads,
                decomposed=decomposed)


# ---------------------------------------------------------------- public


def masa(q: Tensor, k: Tensor, v: Tensor, gamma, *, decomposed: bool = False,
         scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Manhattan self-attention (RMT) over an H x W token grid.

    q, k: (B, heads, H, W, d); v: (B, heads, H, W, dv); tokens in row-major order, any strides.
    gamma: float, scalar tensor or (heads,) tensor with values in (0, 1] (a tensor that
    requires grad gets a gradient). The logit between tokens i and j is
    ``scale * q_i . k_j + log(gamma_h) * (|r_i - r_j| + |c_i - c_j|)`` (full form), or, with
    ``decomposed=True``, attention along W inside each row and then along H inside each
    column with the 1-D decay (RMT's VisionRetentionChunk). scale defaults to d ** -0.5.
    An empty batch, grid or value width gives an empty result (and empty gradients).

    backend: "auto", "cuda", "triton", "cpu" or "torch" (vitattn.explain("masa", ...) says
    which can run and why). Under autocast the op runs in the autocast dtype (fp32
    accumulation inside). Returns (B, heads, H, W, dv) in q's dtype.
    """
    q, k, v = autocast_inputs(q, k, v)  # first: under autocast, mixed input dtypes are expected
    _validate(q, k, v, decomposed)
    scale = V.scale_arg(OP, scale, q.shape[-1])
    log_gamma = _log_gamma(gamma, q.shape[1], q)
    if _onnx_exporting():  # the ONNX exporter cannot lower the custom op: standard ops instead
        return onnx_impl.masa(q, k, v, log_gamma, scale, decomposed)
    name = dispatcher.choose(backend, _context(q, v, decomposed), OP)
    return masa_fwd_call(q, k, v, log_gamma, scale, decomposed, name)[0]


def explain(q: Tensor, k: Tensor, v: Tensor, gamma, *, decomposed: bool = False,
            scale: Optional[float] = None, backend: str = "auto"):
    """Which backends can run ``masa(q, k, v, gamma, ...)`` here, and why (not)."""
    q, k, v = autocast_inputs(q, k, v)
    _validate(q, k, v, decomposed)
    V.scale_arg(OP, scale, q.shape[-1])
    _log_gamma(gamma, q.shape[1], q)
    return dispatcher.explain(_context(q, v, decomposed), OP)
