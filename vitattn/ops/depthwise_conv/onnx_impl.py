"""ONNX export (see vitattn/ops/_onnx.py): a standard grouped Conv on the channels-last view."""

from __future__ import annotations

import torch.nn.functional as F


def depthwise_conv2d_nhwc(x, weight, bias, ph: int, pw: int):
    return F.conv2d(x.permute(0, 3, 1, 2), weight, bias, 1, (ph, pw), 1, x.shape[-1]).permute(0, 2, 3, 1)
