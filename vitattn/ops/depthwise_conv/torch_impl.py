"""The "torch" backend: PyTorch's own convolution (oneDNN on CPU, cuDNN on CUDA) on the
channels-last view of x, which is exactly what RMT's official DWConv2d runs."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def depthwise_conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], ph: int, pw: int) -> Tensor:
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, 1, (ph, pw), 1, x.shape[-1])
    return y.permute(0, 2, 3, 1).contiguous()  # a view already when x's channels are contiguous


def depthwise_conv_bwd(dy: Tensor, x: Tensor, weight: Tensor, ph: int, pw: int, need_x: bool, need_weight: bool,
                       need_bias: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    C = x.shape[-1]
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight, [C] if need_bias else None, [1, 1], [ph, pw],
        [1, 1], False, [0, 0], C, [need_x, need_weight, need_bias])
    return (dx.permute(0, 2, 3, 1).contiguous() if need_x else None), dw, db
