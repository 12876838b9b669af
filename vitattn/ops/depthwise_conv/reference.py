"""Dense PyTorch reference for the channels-last depthwise convolution: the sum over the
kernel's taps of shifted, zero-padded copies of x, written out tap by tap (independent of
F.conv2d, which the "torch" backend uses). Computes in fp32 (fp64 for fp64 inputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._dtypes import acc_dtype


def depthwise_conv2d_nhwc(x, weight, bias=None, padding=0) -> torch.Tensor:
    """x (B, H, W, C), weight (C, 1, kh, kw), bias (C,) or None -> (B, Ho, Wo, C) with
    y[b, oh, ow, c] = bias[c] + sum_{i, j} xpad[b, oh + i, ow + j, c] * weight[c, 0, i, j]."""
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    acc = acc_dtype(x.dtype)
    _, _, kh, kw = weight.shape
    xp = F.pad(x.to(acc), (0, 0, pw, pw, ph, ph))  # (B, H + 2 ph, W + 2 pw, C)
    Ho, Wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    w = weight.to(acc)[:, 0]  # (C, kh, kw)
    y = torch.zeros(x.shape[0], Ho, Wo, x.shape[3], dtype=acc, device=x.device)
    for i in range(kh):
        for j in range(kw):
            y = y + xp[:, i:i + Ho, j:j + Wo, :] * w[:, i, j]
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)
