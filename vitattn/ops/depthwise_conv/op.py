"""Depthwise 2-d convolution on channels-last (B, H, W, C) activations: the public function,
validation, and the ``vitattn::depthwise_conv2d_nhwc_fwd`` / ``_bwd`` custom ops that run the
chosen backend.

Why an op of its own: RMT (and many hybrid backbones) keep activations as (B, H, W, C) and run
their depthwise convolutions (positional encoding, LePE, the FFN's local mixing) through a
permuted view; on the CPU PyTorch's kernels for that layout were measured at a few GB/s at
stage-1 sizes, and their backward far slower (benchmarks/results/bench_depthwise_conv.md).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _validate as V
from ..._dtypes import autocast_inputs
from .._library import LIB, op_caller, register_autograd
from .._onnx import exporting as _onnx_exporting
from . import onnx_impl
from .backends import dispatcher

OP = "depthwise_conv2d_nhwc"

# ---------------------------------------------------------------- custom ops

LIB.define("depthwise_conv2d_nhwc_fwd(Tensor x, Tensor weight, Tensor? bias, int ph, int pw, str backend) -> Tensor")
LIB.define("depthwise_conv2d_nhwc_bwd(Tensor dy, Tensor x, Tensor weight, int ph, int pw, bool need_x, "
           "bool need_weight, bool need_bias, str backend) -> (Tensor, Tensor, Tensor)")


def _out_shape(x: Tensor, weight: Tensor, ph: int, pw: int):
    B, H, W, C = x.shape
    return (B, H + 2 * ph - weight.shape[2] + 1, W + 2 * pw - weight.shape[3] + 1, C)


def _empty(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def _conv_fwd(x, weight, bias, ph, pw, backend):
    if x.numel() == 0:  # an empty batch or channel set
        return x.new_zeros(_out_shape(x, weight, ph, pw))
    return dispatcher.impl(backend).fwd(x, weight, bias, ph, pw)


def _conv_bwd(dy, x, weight, ph, pw, need_x, need_weight, need_bias, backend):
    if x.numel() == 0:
        dx, dw, db = torch.zeros_like(x), torch.zeros_like(weight), weight.new_zeros((weight.shape[0],))
    else:
        dx, dw, db = dispatcher.impl(backend).bwd(dy, x, weight, ph, pw, need_x, need_weight, need_bias)
    # a gradient not asked for is an empty tensor (custom op outputs cannot be None)
    return (dx if need_x else _empty(x)), (dw if need_weight else _empty(x)), (db if need_bias else _empty(x))


LIB.impl("depthwise_conv2d_nhwc_fwd", _conv_fwd, "CompositeExplicitAutograd")
LIB.impl("depthwise_conv2d_nhwc_bwd", _conv_bwd, "CompositeExplicitAutograd")
depthwise_conv2d_nhwc_bwd_call = op_caller("depthwise_conv2d_nhwc_bwd", _conv_bwd)


@torch.library.register_fake("vitattn::depthwise_conv2d_nhwc_fwd", lib=LIB)
def _(x, weight, bias, ph, pw, backend):
    return x.new_empty(_out_shape(x, weight, ph, pw))


@torch.library.register_fake("vitattn::depthwise_conv2d_nhwc_bwd", lib=LIB)
def _(dy, x, weight, ph, pw, need_x, need_weight, need_bias, backend):
    return (x.new_empty(x.shape) if need_x else _empty(x), weight.new_empty(weight.shape) if need_weight else _empty(x),
            weight.new_empty((weight.shape[0],)) if need_bias else _empty(x))


def _setup_context(ctx, inputs, output):
    x, weight, bias, ph, pw, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.ph, ctx.pw, ctx.backend, ctx.has_bias = ph, pw, backend, bias is not None


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_x, need_weight, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], (
        ctx.has_bias and ctx.needs_input_grad[2])
    dx, dw, db = depthwise_conv2d_nhwc_bwd_call(dy, x, weight, ctx.ph, ctx.pw, need_x, need_weight, need_bias,
                                                ctx.backend)
    return (dx if need_x else None, dw if need_weight else None, db if need_bias else None, None, None, None)


depthwise_conv2d_nhwc_fwd_call = register_autograd("depthwise_conv2d_nhwc_fwd", _conv_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- validation and public op


def _padding(padding) -> Tuple[int, int]:
    if isinstance(padding, (tuple, list)):
        if len(padding) != 2:
            raise ValueError(f"{OP}: padding must be an int or a pair (ph, pw), got {padding!r}")
        ph, pw = padding
    else:
        ph = pw = padding
    return V.positive_int(OP, "padding", ph, minimum=0), V.positive_int(OP, "padding", pw, minimum=0)


def _validate(x, weight, bias, padding) -> Tuple[int, int]:
    V.tensor(OP, "x", x, 4)
    V.floating(OP, "x", x)
    V.tensor(OP, "weight", weight, 4)
    named = dict(weight=weight)
    if bias is not None:
        V.tensor(OP, "bias", bias, 1)
        named["bias"] = bias
    V.same_dtype(OP, "x", x, **named)
    V.same_device(OP, "x", x, **named)
    C = x.shape[3]
    if weight.shape[0] != C or weight.shape[1] != 1 or weight.shape[2] == 0 or weight.shape[3] == 0:
        raise ValueError(f"{OP}: weight must have shape (C, 1, kh, kw) with C={C} channels (the last dim of x, "
                         f"which is (B, H, W, C)), got {tuple(weight.shape)}")
    if bias is not None:
        V.shape_eq(OP, "bias", bias.shape, (C,), "one per channel")
    ph, pw = _padding(padding)
    Ho, Wo = _out_shape(x, weight, ph, pw)[1:3]
    if Ho <= 0 or Wo <= 0:
        raise ValueError(f"{OP}: x of size {x.shape[1]}x{x.shape[2]} with padding ({ph}, {pw}) is smaller than the "
                         f"{weight.shape[2]}x{weight.shape[3]} kernel: the output would be empty")
    return ph, pw


def _context(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> dict:
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return dict(device=x.device, dtype=x.dtype, C=x.shape[3], kh=weight.shape[2], kw=weight.shape[3],
                HW=x.shape[1] * x.shape[2], grad=grad)


def depthwise_conv2d_nhwc(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, padding=0, *,
                          backend: str = "auto") -> Tensor:
    """Depthwise 2-d convolution, stride 1, of channels-last activations.

    x: (B, H, W, C), any strides; weight: (C, 1, kh, kw) (an ``nn.Conv2d(C, C, k,
    groups=C)`` weight); bias: (C,) or None; padding: int or (ph, pw), zeros.
    Returns (B, H + 2 ph - kh + 1, W + 2 pw - kw + 1, C), contiguous, in x's dtype: the same
    as ``F.conv2d(x.permute(0, 3, 1, 2), weight, bias, 1, padding, 1, C).permute(0, 2, 3, 1)``.
    backend: "auto", "cpu" (float32/float64 CPU tensors) or "torch" (PyTorch's convolution).
    Under autocast the op runs in the autocast dtype.
    """
    x, weight, bias = autocast_inputs(x, weight, bias)
    ph, pw = _validate(x, weight, bias, padding)
    if _onnx_exporting():  # the ONNX exporter cannot lower the custom op: a standard Conv instead
        return onnx_impl.depthwise_conv2d_nhwc(x, weight, bias, ph, pw)
    name = dispatcher.choose(backend, _context(x, weight, bias), OP)
    return depthwise_conv2d_nhwc_fwd_call(x, weight, bias, ph, pw, name)


def explain(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, padding=0, *, backend: str = "auto"):
    """Which backends can run ``depthwise_conv2d_nhwc(x, weight, bias, padding)`` here, and why (not)."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    _validate(x, weight, bias, padding)
    return dispatcher.explain(_context(x, weight, bias), OP)
