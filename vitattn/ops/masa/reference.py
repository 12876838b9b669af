"""Dense PyTorch reference for Manhattan Self-Attention (RMT).

Readable ground truth: it materialises the (heads, N, N) decay mask and the
logits exactly as the official RMT code does. Never use it for large grids.
"""

from __future__ import annotations

import torch

from ..._dtypes import acc_dtype


def gamma_per_head(gamma, heads: int, device, dtype) -> torch.Tensor:
    """gamma as a float, scalar tensor or (heads,) tensor -> (heads,) tensor (differentiable)."""
    if isinstance(gamma, torch.Tensor):
        return gamma.to(device=device, dtype=dtype).reshape(-1).expand(heads)
    return torch.full((heads,), float(gamma), device=device, dtype=dtype)


def manhattan_distance(H: int, W: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(N, N) matrix of |r_i - r_j| + |c_i - c_j| over an H x W grid in row-major order."""
    r = torch.arange(H, device=device).repeat_interleave(W)
    c = torch.arange(W, device=device).repeat(H)
    return ((r[:, None] - r[None, :]).abs() + (c[:, None] - c[None, :]).abs()).to(dtype)


def axis_distance(L: int, device=None, dtype=torch.float32) -> torch.Tensor:
    i = torch.arange(L, device=device)
    return (i[:, None] - i[None, :]).abs().to(dtype)


def masa(q, k, v, gamma, *, decomposed: bool = False, scale=None) -> torch.Tensor:
    """Manhattan self-attention on (B, heads, H, W, d) tensors; see vitattn.masa for the math."""
    B, heads, H, W, d = q.shape
    acc = acc_dtype(q.dtype)
    scale = d ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    log_g = torch.log(gamma_per_head(gamma, heads, q.device, acc))[None, :, None, None]

    if not decomposed:
        N = H * W
        logits = scale * qf.reshape(B, heads, N, d) @ kf.reshape(B, heads, N, d).transpose(-1, -2)
        logits = logits + log_g * manhattan_distance(H, W, q.device, acc)
        out = torch.softmax(logits, dim=-1) @ vf.reshape(B, heads, N, -1)
        return out.reshape(B, heads, H, W, -1).to(q.dtype)

    # along W inside every row: (B, heads, H, W, W)
    logits_w = scale * qf @ kf.transpose(-1, -2) + log_g[..., None] * axis_distance(W, q.device, acc)
    v_mid = torch.softmax(logits_w, dim=-1) @ vf
    # along H inside every column, same q and k: (B, heads, W, H, H)
    qh, kh, vh = qf.transpose(2, 3), kf.transpose(2, 3), v_mid.transpose(2, 3)
    logits_h = scale * qh @ kh.transpose(-1, -2) + log_g[..., None] * axis_distance(H, q.device, acc)
    out = torch.softmax(logits_h, dim=-1) @ vh
    return out.transpose(2, 3).to(q.dtype)
