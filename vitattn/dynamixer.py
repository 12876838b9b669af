"""DynaMixer dynamic axial mixing: public op, validation, dispatch and the torch.library custom op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import _validate as V
from ._dispatch import Dispatcher, torch_reason, triton_reason
from .torch_backend import dynamixer as _tb

OP = "dynamixer"
BACKENDS = ("auto", "triton", "torch")
dispatcher = Dispatcher(OP, BACKENDS)


# ---------------------------------------------------------------- backend implementations
#
# A backend implements the mixing part on 5-D x (N0, N1, N2, L, C), any strides, given the
# compressed R (N0, N1, N2, L, S*d) (laid out by torch_backend.empty_tokenwise):
#   mix_fwd(x, r, wg, bg, S) -> (y like x, lse (N0, N1, N2, S, L) fp32/fp64)
#   mix_bwd(dy, x, r, wg, bg, lse, S) -> (dx_mix, dR, dW_g, db_g)
# The token-wise compress GEMMs around it are shared (torch_backend.compress_fwd/bwd).


@dataclass
class DynaMixerImpl:
    mix_fwd: Callable
    mix_bwd: Callable


# plugs a backend in: register_impl(name, impl, check, rank)
register_impl = dispatcher.register_impl


register_impl("torch", DynaMixerImpl(_tb.mix_fwd, _tb.mix_bwd), torch_reason, rank=100)

# limits of the Triton kernels: a program keeps a (rows, L, C/S) block of x and a
# (rows, L, 16) block of logits in registers, and a full generate row of length L*d
TRITON_MAX_L = 64
TRITON_MAX_LD = 512
TRITON_MAX_CS = 128


def _register_triton() -> None:
    from . import _triton

    if not _triton.available():
        return
    from .kernels import dynamixer as _tk

    def check(ctx, auto):
        why = triton_reason(ctx, auto)
        if why is None and ctx["L"] > TRITON_MAX_L:
            why = f"sequence lengths up to {TRITON_MAX_L} are supported, got L={ctx['L']}"
        if why is None and ctx["L"] * ctx["d"] > TRITON_MAX_LD:
            why = f"L*d up to {TRITON_MAX_LD} is supported, got L*d={ctx['L'] * ctx['d']}"
        if why is None and ctx["C"] // ctx["S"] > TRITON_MAX_CS:
            why = f"channels per segment up to {TRITON_MAX_CS} are supported, got C/S={ctx['C'] // ctx['S']}"
        return why

    register_impl("triton", DynaMixerImpl(_tk.mix_fwd, _tk.mix_bwd), check, rank=20)


_register_triton()


# ---------------------------------------------------------------- custom ops


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


@torch.library.custom_op("vitattn::dynamixer_fwd", mutates_args=())
def _dynamixer_fwd_op(
    x: Tensor, compress_weight: Tensor, compress_bias: Optional[Tensor], generate_weight: Tensor,
    generate_bias: Optional[Tensor], segments: int, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    r = _tb.compress_fwd(x, compress_weight, compress_bias)
    y, lse = dispatcher.impl(backend).mix_fwd(x, r, generate_weight, generate_bias, segments)
    return y, r, lse


@_dynamixer_fwd_op.register_fake
def _(x, compress_weight, compress_bias, generate_weight, generate_bias, segments, backend):
    *lead, L, C = x.shape
    y = _tb.empty_tokenwise(x, C, x.dtype)
    r = _tb.empty_tokenwise(x, compress_weight.shape[0], x.dtype)
    lse = x.new_empty((*lead, segments, L), dtype=_tb.acc_dtype(x.dtype))
    return y, r, lse


@torch.library.custom_op("vitattn::dynamixer_bwd", mutates_args=())
def _dynamixer_bwd_op(
    dy: Tensor, x: Tensor, compress_weight: Tensor, generate_weight: Tensor,
    generate_bias: Optional[Tensor], r: Tensor, lse: Tensor, segments: int, need_compress_bias: bool,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dxm, dr, dwg, dbg = dispatcher.impl(backend).mix_bwd(dy, x, r, generate_weight, generate_bias, lse, segments)
    dx, dwc, dbc = _tb.compress_bwd(x, dxm, dr, compress_weight, need_compress_bias)
    dbc = _empty(x) if dbc is None else dbc.to(compress_weight.dtype)
    dbg = _empty(x) if generate_bias is None else dbg.to(generate_bias.dtype)
    return dx, dwc.to(compress_weight.dtype), dbc, dwg.to(generate_weight.dtype), dbg


@_dynamixer_bwd_op.register_fake
def _(dy, x, compress_weight, generate_weight, generate_bias, r, lse, segments, need_compress_bias, backend):
    dx = _tb.empty_tokenwise(x, x.shape[-1], x.dtype)
    dbc = compress_weight.new_empty((compress_weight.shape[0],)) if need_compress_bias else _empty(x)
    dbg = _empty(x) if generate_bias is None else generate_bias.new_empty(generate_bias.shape)
    return dx, compress_weight.new_empty(compress_weight.shape), dbc, generate_weight.new_empty(generate_weight.shape), dbg


def _setup_context(ctx, inputs, output):
    x, wc, bc, wg, bg, segments, backend = inputs
    _, r, lse = output
    ctx.save_for_backward(x, wc, wg, bg, r, lse)
    ctx.segments, ctx.backend, ctx.has_bc = segments, backend, bc is not None


def _backward(ctx, dy, _dr, _dlse):
    x, wc, wg, bg, r, lse = ctx.saved_tensors
    dx, dwc, dbc, dwg, dbg = torch.ops.vitattn.dynamixer_bwd(
        dy, x, wc, wg, bg, r, lse, ctx.segments, ctx.has_bc, ctx.backend
    )
    return (dx, dwc, dbc if ctx.has_bc else None, dwg, dbg if bg is not None else None, None, None)


torch.library.register_autograd("vitattn::dynamixer_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public op


def _autocast(*tensors: Optional[Tensor]):
    """Under autocast, run in the autocast dtype (custom ops are not cast automatically)."""
    if not all(t is None or isinstance(t, Tensor) for t in tensors) or not isinstance(tensors[0], Tensor):
        return tensors  # validation reports the wrong type
    dev = tensors[0].device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        # only floating tensors: an integer x must still fail validation
        return tuple(t.to(low) if t is not None and t.is_floating_point() else t for t in tensors)
    return tensors


def _validate(x, compress_weight, compress_bias, generate_weight, generate_bias, segments) -> Tuple[int, int, int, int]:
    V.tensor(OP, "x", x, min_ndim=2)
    V.floating(OP, "x", x)
    S = V.positive_int(OP, "segments", segments)
    *lead, L, C = x.shape
    if x.numel() == 0:
        raise ValueError(f"{OP}: empty inputs are not supported, got x of shape {tuple(x.shape)}")
    if C % S != 0:
        raise ValueError(f"{OP}: the channel count C={C} (last dim of x) must be divisible by segments={S}")
    V.tensor(OP, "compress_weight", compress_weight, 2)
    V.tensor(OP, "generate_weight", generate_weight, 2)
    named = dict(compress_weight=compress_weight, generate_weight=generate_weight)
    for name, b in (("compress_bias", compress_bias), ("generate_bias", generate_bias)):
        if b is not None:
            V.tensor(OP, name, b, 1)
            named[name] = b
    V.same_dtype(OP, "x", x, **named)
    V.same_device(OP, "x", x, **named)
    sd, c_in = compress_weight.shape
    if c_in != C or sd == 0 or sd % S != 0:
        raise ValueError(
            f"{OP}: compress_weight must have shape (segments*d, C) = ({S}*d, {C}) for x with C={C} "
            f"and segments={S}, got {tuple(compress_weight.shape)}"
        )
    d = sd // S
    if compress_bias is not None:
        V.shape_eq(OP, "compress_bias", compress_bias.shape, (sd,), "one per compress output")
    V.shape_eq(OP, "generate_weight", generate_weight.shape, (L * L, L * d),
               f"(L*L, L*d) for L={L} tokens and d={d} from compress_weight")
    if generate_bias is not None:
        V.shape_eq(OP, "generate_bias", generate_bias.shape, (L * L,), f"(L*L,) for L={L}")
    return L, C, S, d


def _context(x: Tensor, L: int, C: int, S: int, d: int) -> dict:
    return dict(device=x.device, dtype=x.dtype, L=L, C=C, S=S, d=d)


def _to5d(x: Tensor) -> Tensor:
    if x.dim() < 5:
        return x.reshape((1,) * (5 - x.dim()) + tuple(x.shape))  # a view
    return x.flatten(0, x.dim() - 5) if x.dim() > 5 else x


def dynamixer(x: Tensor, compress_weight: Tensor, compress_bias: Optional[Tensor], generate_weight: Tensor,
              generate_bias: Optional[Tensor], segments: int, *, backend: str = "auto") -> Tensor:
    """DynaMixer's dynamic mixing along the token axis L (DynaMixerOp without its ``out`` projection).

    x: (..., L, C), any strides (``x.transpose(1, 2)`` of a (B, H, W, C) grid mixes along H
    without a copy). compress_weight (S*d, C), compress_bias (S*d,) or None, generate_weight
    (L*L, L*d), generate_bias (L*L,) or None, S = segments (C divisible by S).

    Per row: R = x W_c^T + b_c, reshaped to (S, L*d) with index i*d + k; Z = R W_g^T + b_g
    reshaped to (S, L, L) [i, j]; P = softmax over i; ``y[j, s*C/S + c] = sum_i x[i, s*C/S + c] * P[s, i, j]``.

    backend: "auto", "triton" or "torch". Under autocast the op runs in the autocast dtype.
    Returns (..., L, C) in x's dtype, laid out like x when x is a permuted dense tensor.
    """
    # autocast first: under autocast x (from an autocast linear) and the fp32 weights differ in dtype
    x_c, wc, bc, wg, bg = _autocast(x, compress_weight, compress_bias, generate_weight, generate_bias)
    L, C, S, d = _validate(x_c, wc, bc, wg, bg, segments)
    name = dispatcher.choose(backend, _context(x_c, L, C, S, d))
    y = torch.ops.vitattn.dynamixer_fwd(_to5d(x_c), wc, bc, wg, bg, S, name)[0]
    return y.reshape(x.shape)


def explain(x: Tensor, compress_weight: Tensor, compress_bias: Optional[Tensor], generate_weight: Tensor,
            generate_bias: Optional[Tensor], segments: int):
    """[(backend, None or the reason it cannot run)] in the order "auto" tries them."""
    L, C, S, d = _validate(x, compress_weight, compress_bias, generate_weight, generate_bias, segments)
    return dispatcher.explain(_context(x, L, C, S, d))
