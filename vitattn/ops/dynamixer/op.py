"""DynaMixer dynamic axial mixing: the public function, validation, and the
``vitattn::dynamixer_fwd`` / ``_bwd`` custom ops that run the chosen backend."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _validate as V
from ..._dtypes import acc_dtype, autocast_inputs
from .._library import LIB, op_caller, register_autograd
from .._onnx import exporting as _onnx_exporting
from . import onnx_impl
from . import torch_impl as _tb
from .backends import dispatcher

OP = "dynamixer"

# ---------------------------------------------------------------- custom ops

LIB.define("dynamixer_fwd(Tensor x, Tensor compress_weight, Tensor? compress_bias, Tensor generate_weight, "
           "Tensor? generate_bias, int segments, str backend) -> (Tensor, Tensor, Tensor)")
LIB.define("dynamixer_bwd(Tensor dy, Tensor x, Tensor compress_weight, Tensor generate_weight, "
           "Tensor? generate_bias, Tensor r, Tensor lse, int segments, bool need_compress_bias, str backend)"
           " -> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _fwd_shapes(x, compress_weight, segments):
    *lead, L, C = x.shape
    y = _tb.empty_tokenwise(x, C, x.dtype)
    r = _tb.empty_tokenwise(x, compress_weight.shape[0], x.dtype)
    lse = x.new_empty((*lead, segments, L), dtype=acc_dtype(x.dtype))
    return y, r, lse


def _dynamixer_fwd(x, compress_weight, compress_bias, generate_weight, generate_bias, segments, backend):
    if x.numel() == 0:  # an empty batch of rows
        return tuple(t.zero_() for t in _fwd_shapes(x, compress_weight, segments))
    impl = dispatcher.impl(backend)
    if hasattr(impl, "fwd"):  # the whole op in the backend, compress included (backends.py)
        return impl.fwd(x, compress_weight, compress_bias, generate_weight, generate_bias, segments)
    r = _tb.compress_fwd(x, compress_weight, compress_bias)
    y, lse = impl.mix_fwd(x, r, generate_weight, generate_bias, segments)
    return y, r, lse


def _dynamixer_bwd(dy, x, compress_weight, generate_weight, generate_bias, r, lse, segments,
                   need_compress_bias, backend):
    if x.numel() == 0:
        dbc = compress_weight.new_zeros((compress_weight.shape[0],)) if need_compress_bias else _empty(x)
        dbg = _empty(x) if generate_bias is None else torch.zeros_like(generate_bias)
        return (torch.zeros_like(x), torch.zeros_like(compress_weight), dbc, torch.zeros_like(generate_weight), dbg)
    impl = dispatcher.impl(backend)
    if hasattr(impl, "bwd"):
        dx, dwc, dbc, dwg, dbg = impl.bwd(dy, x, r, compress_weight, generate_weight, generate_bias, lse, segments,
                                          need_compress_bias)
    else:
        dxm, dr, dwg, dbg = impl.mix_bwd(dy, x, r, generate_weight, generate_bias, lse, segments)
        dx, dwc, dbc = _tb.compress_bwd(x, dxm, dr, compress_weight, need_compress_bias)
    dbc = _empty(x) if dbc is None else dbc.to(compress_weight.dtype)
    dbg = _empty(x) if generate_bias is None else dbg.to(generate_bias.dtype)
    return dx, dwc.to(compress_weight.dtype), dbc, dwg.to(generate_weight.dtype), dbg


LIB.impl("dynamixer_fwd", _dynamixer_fwd, "CompositeExplicitAutograd")
LIB.impl("dynamixer_bwd", _dynamixer_bwd, "CompositeExplicitAutograd")
dynamixer_bwd_call = op_caller("dynamixer_bwd", _dynamixer_bwd)


@torch.library.register_fake("vitattn::dynamixer_fwd", lib=LIB)
def _(x, compress_weight, compress_bias, generate_weight, generate_bias, segments, backend):
    return _fwd_shapes(x, compress_weight, segments)


@torch.library.register_fake("vitattn::dynamixer_bwd", lib=LIB)
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
    dx, dwc, dbc, dwg, dbg = dynamixer_bwd_call(
        dy, x, wc, wg, bg, r, lse, ctx.segments, ctx.has_bc, ctx.backend
    )
    return (dx, dwc, dbc if ctx.has_bc else None, dwg, dbg if bg is not None else None, None, None)


dynamixer_fwd_call = register_autograd("dynamixer_fwd", _dynamixer_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- validation and public op


def _validate(x, compress_weight, compress_bias, generate_weight, generate_bias, segments) -> Tuple[int, int, int, int]:
    V.tensor(OP, "x", x, min_ndim=2)
    V.floating(OP, "x", x)
    S = V.positive_int(OP, "segments", segments)
    *lead, L, C = x.shape
    if L == 0 or C == 0:
        raise ValueError(f"{OP}: x must have at least one token and one channel (L, C >= 1 in its last two "
                         f"dims), got shape {tuple(x.shape)}")
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

    backend: "auto", "triton", "cpu" or "torch". Under autocast the op runs in the autocast dtype.
    Returns (..., L, C) in x's dtype, laid out like x when x is a permuted dense tensor.
    """
    # autocast first: under autocast x (from an autocast linear) and the fp32 weights differ in dtype
    x_c, wc, bc, wg, bg = autocast_inputs(x, compress_weight, compress_bias, generate_weight, generate_bias)
    L, C, S, d = _validate(x_c, wc, bc, wg, bg, segments)
    if _onnx_exporting():  # the ONNX exporter cannot lower the custom op: standard ops instead
        return onnx_impl.dynamixer(x_c, wc, bc, wg, bg, S)
    name = dispatcher.choose(backend, _context(x_c, L, C, S, d), OP)
    y = dynamixer_fwd_call(_to5d(x_c), wc, bc, wg, bg, S, name)[0]
    return y.reshape(x.shape)


def explain(x: Tensor, compress_weight: Tensor, compress_bias: Optional[Tensor], generate_weight: Tensor,
            generate_bias: Optional[Tensor], segments: int, *, backend: str = "auto"):
    """Which backends can run ``dynamixer(x, ...)`` here, and why (not)."""
    x, wc, bc, wg, bg = autocast_inputs(x, compress_weight, compress_bias, generate_weight, generate_bias)
    L, C, S, d = _validate(x, wc, bc, wg, bg, segments)
    return dispatcher.explain(_context(x, L, C, S, d), OP)
