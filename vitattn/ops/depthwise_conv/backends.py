"""Channels-last depthwise convolution's backends: for each, the can-run check, the static
rank and the implementation.

Every implementation provides, on x (B, H, W, C) and dy (B, Ho, Wo, C) of any strides,
weight (C, 1, kh, kw), bias (C,) or None, stride 1 and zero padding (ph, pw):
  fwd(x, weight, bias, ph, pw) -> y (B, Ho, Wo, C) contiguous
  bwd(dy, x, weight, ph, pw, need_x, need_weight, need_bias) -> (dx or None, dweight or None, dbias or None)
in x's dtype.

"auto" order (lower rank first): cpu (CPU, float32/float64), torch (anywhere: oneDNN on CPU,
cuDNN on CUDA), overridden per device type and shape class by measured.json, written from a
benchmark run by `python benchmarks/bench_depthwise_conv.py --update-ranking`.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any, Dict, Optional

from ... import _dispatch as D
from ... import _extension
from . import torch_impl

NAMES = ("auto", "cpu", "torch")


def shape_class(ctx: Dict[str, Any]) -> str:
    """The key of measured.json: kernel taps band, image size band (pixels per image: the
    small maps of late stages fit in cache), channel band and whether the call records a
    backward (the backends' forward and backward speeds rank differently)."""
    taps = "taps<=9" if ctx["kh"] * ctx["kw"] <= 9 else "taps>9"
    pixels = "HW>=784" if ctx["HW"] >= 784 else "HW<784"
    channels = "C<=128" if ctx["C"] <= 128 else "C>128"
    return f"{taps},{pixels},{channels},{'train' if ctx['grad'] else 'infer'}"


# ---------------------------------------------------------------- cpu (vitattn._C, csrc/cpu/depthwise_conv*)

CPU_DTYPES = ("torch.float32", "torch.float64")


def _cpu_dtype_check(ctx: Dict[str, Any], auto: bool) -> Optional[str]:
    if str(ctx["dtype"]) not in CPU_DTYPES:
        return f"the C++ CPU kernels support float32 and float64, got {ctx['dtype']}"
    return None


def _load_cpu():
    ops = _extension.ops()
    fwd, bwd = ops.depthwise_conv_cpu_fwd, ops.depthwise_conv_cpu_bwd

    def backward(dy, x, weight, ph, pw, need_x, need_weight, need_bias):
        dx, dw, db = bwd(dy, x, weight, ph, pw, need_x, need_weight, need_bias)
        return (dx if need_x else None), (dw if need_weight else None), (db if need_bias else None)

    return SimpleNamespace(fwd=fwd, bwd=backward)


def _load_torch():
    return SimpleNamespace(fwd=torch_impl.depthwise_conv_fwd, bwd=torch_impl.depthwise_conv_bwd)


BACKENDS = (
    D.Backend("cpu", 50, D.all_of(D.cpu_extension_check, _cpu_dtype_check, D.compiled_kernels_check(
        "depthwise convolution CPU kernels", ("depthwise_conv_cpu_fwd", "depthwise_conv_cpu_bwd"))), _load_cpu),
    D.Backend("torch", 100, D.any_device, _load_torch),
)

dispatcher = D.Dispatcher("depthwise_conv2d_nhwc", BACKENDS, NAMES, shape_class=shape_class,
                          measured_path=os.path.join(os.path.dirname(__file__), "measured.json"))
