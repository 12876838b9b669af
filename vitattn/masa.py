"""Manhattan Self-Attention (RMT): public op, validation, dispatch and the torch.library custom op."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import _validate as V
from ._dispatch import Dispatcher, torch_reason, triton_head_dims_reason
from .torch_backend import masa as _tb

OP = "masa"
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
dispatcher = Dispatcher(OP, BACKENDS)


# ---------------------------------------------------------------- backend implementations
#
# A backend provides one grid-attention pass over 5-D (B, heads, H, W, .) tensors:
#   fwd(q, k, v, log_gamma, scale, axis) -> (out contiguous, lse (B, heads, H, W))
#   bwd(dout, q, k, v, out, lse, log_gamma, scale, axis) -> (dq, dk, dv, dlog_gamma (heads,))
# with axis None (full form), "w" (attend along W in each row) or "h" (along H in each
# column). The decomposed form is the "w" pass followed by the "h" pass.


@dataclass
class MasaImpl:
    fwd: Callable
    bwd: Callable


# plugs a backend in: register_impl(name, impl, check, rank) (also used by vitattn._extension)
register_impl = dispatcher.register_impl


def _torch_fwd(q, k, v, log_gamma, scale, axis):
    B, heads, H, W, d = q.shape
    if axis is None:
        Z, N, Y, X = B * heads, H * W, H, W
        lg = log_gamma.repeat(B)
        flat = lambda t: t.reshape(Z, N, t.shape[-1])
        out, lse = _tb.grid_attention_fwd(flat(q), flat(k), flat(v), lg, Y, X, scale)
        return out.reshape(B, heads, H, W, -1), lse.reshape(B, heads, H, W)
    if axis == "w":
        flat = lambda t: t.reshape(B * heads * H, W, t.shape[-1])
        lg = log_gamma.repeat_interleave(H).repeat(B)
        out, lse = _tb.grid_attention_fwd(flat(q), flat(k), flat(v), lg, 1, W, scale)
        return out.reshape(B, heads, H, W, -1), lse.reshape(B, heads, H, W)
    flat = lambda t: t.transpose(2, 3).reshape(B * heads * W, H, t.shape[-1])
    lg = log_gamma.repeat_interleave(W).repeat(B)
    out, lse = _tb.grid_attention_fwd(flat(q), flat(k), flat(v), lg, 1, H, scale)
    return (out.reshape(B, heads, W, H, -1).transpose(2, 3).contiguous(),
            lse.reshape(B, heads, W, H).transpose(2, 3).contiguous())


def _torch_bwd(dout, q, k, v, out, lse, log_gamma, scale, axis):
    B, heads, H, W, d = q.shape
    if axis is None:
        R, Y, X = 1, H, W
        flat = lambda t: t.reshape(B * heads, H * W, t.shape[-1])
        unflat = lambda t: t.reshape(B, heads, H, W, -1)
        lse_f = lse.reshape(B * heads, H * W)
    elif axis == "w":
        R, Y, X = H, 1, W
        flat = lambda t: t.reshape(B * heads * H, W, t.shape[-1])
        unflat = lambda t: t.reshape(B, heads, H, W, -1)
        lse_f = lse.reshape(B * heads * H, W)
    else:
        R, Y, X = W, 1, H
        flat = lambda t: t.transpose(2, 3).reshape(B * heads * W, H, t.shape[-1])
        unflat = lambda t: t.reshape(B, heads, W, H, -1).transpose(2, 3).contiguous()
        lse_f = lse.transpose(2, 3).reshape(B * heads * W, H)
    lg = log_gamma.repeat_interleave(R).repeat(B)
    dq, dk, dv, dlg = _tb.grid_attention_bwd(
        flat(dout), flat(q), flat(k), flat(v), flat(out), lse_f, lg, Y, X, scale
    )
    return unflat(dq), unflat(dk), unflat(dv), dlg.reshape(B, heads, R).sum(dim=(0, 2))


register_impl("torch", MasaImpl(_torch_fwd, _torch_bwd), torch_reason, rank=100)


def _register_triton() -> None:
    from . import _triton

    if not _triton.available():
        return
    from .kernels import masa as _tk

    register_impl("triton", MasaImpl(_tk.masa_fwd, _tk.masa_bwd), triton_head_dims_reason, rank=20)


_register_triton()


# ---------------------------------------------------------------- custom ops


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("vitattn::masa_fwd", mutates_args=())
def _masa_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, scale: float, decomposed: bool, backend: str
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = dispatcher.impl(backend)
    if not decomposed:
        out, lse = impl.fwd(q, k, v, log_gamma, scale, None)
        return out, _empty(out), lse, _empty(lse)
    v_mid, lse_w = impl.fwd(q, k, v, log_gamma, scale, "w")
    out, lse_h = impl.fwd(q, k, v_mid, log_gamma, scale, "h")
    return out, v_mid, lse_w, lse_h


@_masa_fwd_op.register_fake
def _(q, k, v, log_gamma, scale, decomposed, backend):
    B, heads, H, W, _ = q.shape
    out = q.new_empty((B, heads, H, W, v.shape[-1]))
    lse = q.new_empty((B, heads, H, W), dtype=_acc_dtype(q.dtype))
    if not decomposed:
        return out, _empty(out), lse, _empty(lse)
    return out, q.new_empty(out.shape), lse, q.new_empty(lse.shape, dtype=lse.dtype)


@torch.library.custom_op("vitattn::masa_bwd", mutates_args=())
def _masa_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, log_gamma: Tensor, out: Tensor, v_mid: Tensor,
    lse_w: Tensor, lse_h: Tensor, scale: float, decomposed: bool, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = dispatcher.impl(backend)
    if not decomposed:
        dq, dk, dv, dlg = impl.bwd(dout, q, k, v, out, lse_w, log_gamma, scale, None)
        return dq, dk, dv, dlg.to(log_gamma.dtype)
    dq_h, dk_h, dv_mid, dlg_h = impl.bwd(dout, q, k, v_mid, out, lse_h, log_gamma, scale, "h")
    dq_w, dk_w, dv, dlg_w = impl.bwd(dv_mid, q, k, v, v_mid, lse_w, log_gamma, scale, "w")
    acc = _acc_dtype(q.dtype)
    dq = (dq_h.to(acc) + dq_w.to(acc)).to(q.dtype)
    dk = (dk_h.to(acc) + dk_w.to(acc)).to(k.dtype)
    return dq, dk, dv, (dlg_h + dlg_w).to(log_gamma.dtype)


@_masa_bwd_op.register_fake
def _(dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h, scale, decomposed, backend):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            log_gamma.new_empty(log_gamma.shape))


def _setup_context(ctx, inputs, output):
    q, k, v, log_gamma, scale, decomposed, backend = inputs
    out, v_mid, lse_w, lse_h = output
    ctx.save_for_backward(q, k, v, log_gamma, out, v_mid, lse_w, lse_h)
    ctx.scale, ctx.decomposed, ctx.backend = scale, decomposed, backend


def _backward(ctx, dout, _dv_mid, _dlse_w, _dlse_h):
    q, k, v, log_gamma, out, v_mid, lse_w, lse_h = ctx.saved_tensors
    dq, dk, dv, dlg = torch.ops.vitattn.masa_bwd(
        dout, q, k, v, log_gamma, out, v_mid, lse_w, lse_h, ctx.scale, ctx.decomposed, ctx.backend
    )
    return dq, dk, dv, dlg, None, None, None


torch.library.register_autograd("vitattn::masa_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public op


def _autocast(*tensors: Tensor):
    """Under autocast, run in the autocast dtype (custom ops are not cast automatically)."""
    dev = tensors[0].device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        # only floating tensors: an integer input must still be rejected by validation
        return tuple(t.to(low) if t.is_floating_point() else t for t in tensors)
    return tensors


def _gamma_to_log(gamma, heads: int, ref: Tensor) -> Tensor:
    """Validate gamma and return log(gamma) as a (heads,) tensor (differentiable if gamma is)."""
    if isinstance(gamma, torch.Tensor):
        if gamma.dtype not in V.FLOAT_DTYPES:
            raise TypeError(f"{OP}: gamma must be a floating tensor, got {gamma.dtype}")
        if gamma.dim() > 1 or (gamma.dim() == 1 and gamma.shape[0] not in (1, heads)):
            raise ValueError(
                f"{OP}: gamma must be a float, a scalar tensor or a tensor of shape ({heads},) "
                f"(one decay per head), got shape {tuple(gamma.shape)}"
            )
        if gamma.device != ref.device:
            raise ValueError(f"{OP}: gamma is on {gamma.device} but q is on {ref.device}; they must match")
        if V.value_checks_enabled():
            with torch.no_grad():
                bad = ~((gamma > 0) & (gamma <= 1))
                if bool(bad.any()):
                    raise ValueError(f"{OP}: gamma values must lie in (0, 1], got {gamma.detach().cpu().tolist()}")
        acc = _acc_dtype(ref.dtype)
        return torch.log(gamma.to(acc)).reshape(-1).expand(heads).contiguous()
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise TypeError(f"{OP}: gamma must be a float or a tensor, got {type(gamma).__name__}")
    g = float(gamma)
    if not (0.0 < g <= 1.0):
        raise ValueError(f"{OP}: gamma must lie in (0, 1], got {g}")
    return torch.full((heads,), math.log(g), device=ref.device, dtype=_acc_dtype(ref.dtype))


def _context(q: Tensor, k: Tensor, v: Tensor, decomposed: bool) -> dict:
    B, heads, H, W, d = q.shape
    return dict(device=q.device, dtype=q.dtype, d=d, dv=v.shape[-1], H=H, W=W, B=B, heads=heads,
                decomposed=decomposed)


def _validate(q, k, v) -> None:
    V.tensor(OP, "q", q, 5)
    V.tensor(OP, "k", k, 5)
    V.tensor(OP, "v", v, 5)
    V.floating(OP, "q", q)
    V.same_dtype(OP, "q", q, k=k, v=v)
    V.same_device(OP, "q", q, k=k, v=v)
    V.shape_eq(OP, "k", k.shape, q.shape, "it must match q's (B, heads, H, W, d)")
    if tuple(v.shape[:4]) != tuple(q.shape[:4]):
        raise ValueError(f"{OP}: v must have shape {tuple(q.shape[:4]) + ('dv',)} to match q, got {tuple(v.shape)}")
    if min(q.shape) == 0 or v.shape[-1] == 0:
        raise ValueError(f"{OP}: empty inputs are not supported, got q {tuple(q.shape)} and v {tuple(v.shape)}")


def masa(q: Tensor, k: Tensor, v: Tensor, gamma, *, decomposed: bool = False,
         scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Manhattan self-attention (RMT) over an H x W token grid.

    q, k: (B, heads, H, W, d); v: (B, heads, H, W, dv); tokens in row-major order, any strides.
    gamma: float, scalar tensor or (heads,) tensor with values in (0, 1] (a tensor that
    requires grad gets a gradient). The logit between tokens i and j is
    ``scale * q_i . k_j + log(gamma_h) * (|r_i - r_j| + |c_i - c_j|)`` (full form), or, with
    ``decomposed=True``, attention along W inside each row and then along H inside each
    column with the 1-D decay (RMT's VisionRetentionChunk). scale defaults to d ** -0.5.

    backend: "auto", "cuda", "triton", "cpu" or "torch". Under autocast the op runs in
    the autocast dtype (fp32 accumulation inside). Returns (B, heads, H, W, dv) in q's dtype.
    """
    if all(isinstance(t, Tensor) for t in (q, k, v)):
        q, k, v = _autocast(q, k, v)  # first: under autocast, mixed input dtypes are expected
    _validate(q, k, v)
    if not isinstance(decomposed, bool):
        raise TypeError(f"{OP}: decomposed must be a bool, got {type(decomposed).__name__}")
    scale = V.scale_arg(OP, scale, q.shape[-1])
    log_gamma = _gamma_to_log(gamma, q.shape[1], q)
    name = dispatcher.choose(backend, _context(q, k, v, decomposed))
    out = torch.ops.vitattn.masa_fwd(q, k, v, log_gamma, scale, decomposed, name)[0]
    return out


def explain(q: Tensor, k: Tensor, v: Tensor, *, decomposed: bool = False):
    """[(backend, None or the reason it cannot run)] in the order "auto" tries them."""
    _validate(q, k, v)
    return dispatcher.explain(_context(q, k, v, decomposed))
