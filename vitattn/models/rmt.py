"""RMT (Retentive Networks Meet Vision Transformers, Fan et al., CVPR 2024) on vitattn.masa.

Drop-in for the official release (qhfan/RMT, classfication_release/RMT.py, commit 32ea214):
the module tree, parameter and buffer names and shapes are those of ``VisRetNet``, so an
official state_dict loads with strict=True, and with the same weights the logits agree
with the official code (fp32, eval mode). ``rmt_t``/``rmt_s``/``rmt_b``/``rmt_l`` are the
official RMT_T3 / RMT_S / RMT_M2 / RMT_L6 configurations.

Semantics kept from the official code:

* q and k are rotated by the raster token index ``r * W + c`` (RoPE over interleaved
  channel pairs, frequencies ``10000 ** -linspace(0, 1, key_dim // 2)``, buffer ``angle``);
  k is scaled by ``key_dim ** -0.5`` *before* the rotation, so the op runs with scale=1.
* the per-head decay buffer ``decay = log(1 - 2 ** -(init + range * h / heads))``; the op
  takes gamma = exp(decay). Stages with ``chunkwise_recurrent`` use the decomposed form
  (attention along W inside each row, then along H inside each column), the others the
  full Manhattan-decay form; both are ``vitattn.masa``.
* LCE (5x5 depthwise conv on v, added to the attention output), CPE (3x3 depthwise conv
  residual before each block), the conv FFN, optional layer scale, and the head
  (Linear -> BatchNorm -> Swish -> average pool -> Linear).

Every block takes ``attn_backend`` ("auto", "cuda", "triton", "cpu" or "torch"), passed to
vitattn.masa, so the same weights run fused or on the PyTorch backend.

Detection and segmentation: :class:`RMT` is the official backbone (qhfan/RMT
``detect/mmdet/models/backbones/RMT.py``): the same arguments and state_dict
(``patch_embed``, ``layers``, ``extra_norms``), a list of NCHW maps per ``out_indices``,
``norm_eval``. ``rmt_t(features_only=True, out_indices=...)`` (also through timm) builds it
with RMT-T's configuration; :func:`rmt_backbone` ("t", "s", "b", "l") with the official
detection / segmentation configurations (:data:`BACKBONE_CFGS`). vitattn.masa needs memory
linear in the token count in both forms, so full (non-decomposed) MaSA runs at detection
resolution, where the official dense (heads, N, N) masks do not fit.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import depthwise_conv2d_nhwc, masa
from ..nn._linear import Linear, linear
from ..nn.mlp import gelu_fresh
from ..ops._library import plain_eager
from ._common import DropPath, build, channels_last_images, check_attn_backend, load_features_checkpoint
from ._features import FeatureInfo, IntermediatesMixin, take_indices
from ._registry import register_model

__all__ = ["VisRetNet", "RMT", "RetBlock", "VisionRetention", "rmt_t", "rmt_s", "rmt_b", "rmt_l", "rmt_backbone",
           "BACKBONE_CFGS", "load_backbone_checkpoint"]


class DWConv2d(nn.Module):
    """Depthwise conv on channels-last (B, H, W, C) activations. The weights are an
    nn.Conv2d's (the official checkpoints' ``conv.weight`` / ``conv.bias``); stride-1 layers
    (all of RMT's) run vitattn.depthwise_conv2d_nhwc on (B, H, W, C) directly."""

    def __init__(self, dim: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride, padding, groups=dim)

    def forward(self, x: Tensor, residual: bool = False) -> Tensor:
        """conv(x), or x + conv(x) with ``residual``."""
        conv = self.conv
        if conv.stride != (1, 1):
            y = conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            return x + y if residual else y
        w = conv.weight
        kh, kw = w.shape[2:]
        same_size = conv.padding == (kh // 2, kw // 2) and kh % 2 == 1 and kw % 2 == 1
        if residual and same_size and x.dtype in (torch.float32, torch.float64) and \
                not torch.is_autocast_enabled(x.device.type):
            # x + conv(x) is conv(x) with 1 added to the centre tap: one pass over the
            # activations instead of two (kept out of low precision, where w + 1 would round w)
            delta = w.new_zeros((1, 1, kh, kw))
            delta[:, :, kh // 2, kw // 2] = 1.0
            return depthwise_conv2d_nhwc(x, w + delta, conv.bias, conv.padding)
        y = depthwise_conv2d_nhwc(x, w, conv.bias, conv.padding)
        return x + y if residual else y


class RetNetRelPos2d(nn.Module):
    """Holds RMT's rotation frequencies (``angle``) and per-head log-decay (``decay``) buffers.

    forward(H, W) -> (sin, cos, gamma) for :func:`rotate_pairs`: cos of shape (H, W, 1, key_dim)
    holds each pair's cosine twice, sin of the same shape its sine with the even channel's sign
    flipped (-sin, +sin), both for the rotation by raster index; gamma = exp(decay), (heads,).
    """

    def __init__(self, embed_dim: int, num_heads: int, initial_value: float, heads_range: float):
        super().__init__()
        key_dim = embed_dim // num_heads
        if key_dim % 2:
            raise ValueError(f"RMT: the key dim per head must be even for the rotation, got {key_dim}")
        freq = 1.0 / (10000 ** torch.linspace(0, 1, key_dim // 2))
        # each frequency serves one interleaved (even, odd) channel pair: stored twice, as officially
        angle = freq.repeat_interleave(2)
        h = torch.arange(num_heads, dtype=torch.float)
        decay = torch.log(1 - 2 ** (-initial_value - heads_range * h / num_heads))
        self.initial_value = initial_value
        self.heads_range = heads_range
        self.num_heads = num_heads
        self.register_buffer("angle", angle)
        self.register_buffer("decay", decay)

    def forward(self, H: int, W: int) -> Tuple[Tensor, Tensor, Tensor]:
        index = torch.arange(H * W, device=self.decay.device).to(self.decay.dtype)
        phase = index[:, None] * self.angle[None, :]  # (H*W, key_dim): each pair's angle twice
        sign = torch.tensor([-1.0, 1.0], device=phase.device, dtype=phase.dtype).repeat(phase.shape[-1] // 2)
        sin = (torch.sin(phase) * sign).reshape(H, W, 1, -1)
        cos = torch.cos(phase).reshape(H, W, 1, -1)
        return sin, cos, self.decay.exp()


def rotate_pairs(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate each interleaved channel pair (x[2i], x[2i+1]) of x (..., d) by its angle.

    sin and cos come from :class:`RetNetRelPos2d` (per channel, sin signed -/+), so this is the
    official ``x * cos + rotate_every_two(x) * sin`` written as three element-wise passes:
    x * cos, the pairs swapped, and one multiply-add.
    """
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin)


class _RotateToHeads(torch.autograd.Function):
    """qk (B, H, W, 2, heads, d), its channel pairs rotated by rotor (H, W, 1, 1, d/2, complex),
    returned head-major: (2, B, heads, H, W, d), contiguous.

    One complex multiply per pair (the rotation's arithmetic) that writes straight into the
    layout the attention op reads fastest: each head's (H, W, d) slab contiguous instead of a
    token's heads interleaved (measured on the RMT-T stage-1 shapes: the rotation ~5x faster
    than the element-wise form, the op ~25% faster on the packed q and k)."""

    @staticmethod
    def forward(ctx, qk: Tensor, rotor: Tensor) -> Tensor:
        B, H, W, two, n, d = qk.shape
        out = torch.empty((two, B, n, H, W, d // 2), dtype=rotor.dtype, device=qk.device)
        torch.mul(torch.view_as_complex(qk.unflatten(-1, (-1, 2))), rotor, out=out.permute(1, 3, 4, 0, 2, 5))
        ctx.save_for_backward(rotor)
        return torch.view_as_real(out).flatten(-2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (rotor,) = ctx.saved_tensors
        two, B, n, H, W, d = grad.shape
        grad = grad.contiguous()
        out = torch.empty((B, H, W, two, n, d // 2), dtype=rotor.dtype, device=grad.device)
        # the inverse rotation: multiply by the conjugate rotor
        torch.mul(torch.view_as_complex(grad.unflatten(-1, (-1, 2))).permute(1, 3, 4, 0, 2, 5), rotor.conj(),
                  out=out)
        return torch.view_as_real(out).flatten(-2), None


def rotate_qk_to_heads(qk: Tensor, sin: Tensor, cos: Tensor) -> Tuple[Tensor, Tensor]:
    """q and k, each (B, heads, H, W, d), from qk (B, H, W, 2, heads, d) rotated by
    :class:`RetNetRelPos2d`'s sin and cos (H, W, 1, d).

    fp32 / fp64 in plain eager mode: :class:`_RotateToHeads` (contiguous head-major q and k);
    otherwise (low-precision autocast, torch.compile, torch.export, ONNX export) the same
    values from :func:`rotate_pairs`, as strided views.
    """
    if qk.dtype in (torch.float32, torch.float64) and plain_eager((qk, sin, cos)):
        rotor = torch.complex(cos[..., 0::2], sin[..., 1::2]).unsqueeze(-2)  # (H, W, 1, 1, d/2)
        out = _RotateToHeads.apply(qk, rotor.to(torch.complex64 if qk.dtype == torch.float32 else torch.complex128))
        return out[0], out[1]
    qk = rotate_pairs(qk, sin.unsqueeze(-2), cos.unsqueeze(-2))
    return qk[:, :, :, 0].permute(0, 3, 1, 2, 4), qk[:, :, :, 1].permute(0, 3, 1, 2, 4)


class VisionRetention(nn.Module):
    """RMT's Manhattan self-attention layer (official VisionRetentionChunk / VisionRetentionAll).

    decomposed=True is the chunk form (rows then columns), False the whole-grid form.
    """

    def __init__(self, embed_dim: int, num_heads: int, value_factor: int = 1, *, decomposed: bool = False,
                 attn_backend: str = "auto"):
        super().__init__()
        self.factor = value_factor
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim * value_factor // num_heads
        self.key_dim = embed_dim // num_heads
        self.scaling = self.key_dim ** -0.5
        self.decomposed = bool(decomposed)
        self.attn_backend = check_attn_backend("VisionRetention", attn_backend, "masa")
        self.q_proj = Linear(embed_dim, embed_dim, bias=True)
        self.k_proj = Linear(embed_dim, embed_dim, bias=True)
        self.v_proj = Linear(embed_dim, embed_dim * value_factor, bias=True)
        self.lepe = DWConv2d(embed_dim * value_factor, 5, 1, 2)
        self.out_proj = Linear(embed_dim * value_factor, embed_dim, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.q_proj.weight.is_meta:
            return  # layout only (torch.device("meta")): nothing to draw
        nn.init.xavier_normal_(self.q_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_normal_(self.k_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_normal_(self.v_proj.weight, gain=2 ** -2.5)
        nn.init.xavier_normal_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, x: Tensor, rel_pos: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """x: (B, H, W, C); rel_pos: (sin, cos, gamma) from RetNetRelPos2d."""
        B, H, W, _ = x.shape
        sin, cos, gamma = rel_pos
        n = self.num_heads
        v = self.v_proj(x)
        lepe = self.lepe(v)
        # q and k from one GEMM, the key scaling folded into k's weights: x is read once and
        # k is not rescaled in a separate pass (the same product up to rounding)
        qk_weight = torch.cat((self.q_proj.weight, self.k_proj.weight * self.scaling))
        qk_bias = torch.cat((self.q_proj.bias, self.k_proj.bias * self.scaling))
        qk = linear(x, qk_weight, qk_bias)
        # under autocast the projections are low precision while sin/cos stay fp32: rotate in the
        # projections' dtype so that q, k and v reach the op in one dtype
        sin, cos = sin.to(qk.dtype), cos.to(qk.dtype)
        # q and k rotated together, (B, heads, H, W, d) each; v as a strided view
        q, k = rotate_qk_to_heads(qk.view(B, H, W, 2, n, self.key_dim), sin, cos)
        out = masa(q, k, v.view(B, H, W, n, self.head_dim).permute(0, 3, 1, 2, 4),
                   gamma, decomposed=self.decomposed, scale=1.0, backend=self.attn_backend)
        # the residual add reads out (B, heads, H, W, dv) through its strides and writes lepe's
        # (B, H, W, C) layout: no separate copy of out to channels-last
        out = torch.add(lepe.reshape(B, H, W, n, self.head_dim), out.permute(0, 2, 3, 1, 4))
        return self.out_proj(out.reshape(B, H, W, n * self.head_dim))


class FeedForwardNetwork(nn.Module):
    """fc1 -> GELU -> (+ 3x3 depthwise conv residual) -> fc2, on (B, H, W, C)."""

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float = 0.0, activation_dropout: float = 0.0,
                 subconv: bool = True):
        super().__init__()
        self.embed_dim = embed_dim
        self.activation_dropout_module = nn.Dropout(activation_dropout)
        self.dropout_module = nn.Dropout(dropout)
        self.fc1 = Linear(embed_dim, ffn_dim)
        self.fc2 = Linear(ffn_dim, embed_dim)
        self.dwconv = DWConv2d(ffn_dim, 3, 1, 1) if subconv else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.activation_dropout_module(gelu_fresh(self.fc1(x)))
        if self.dwconv is not None:
            x = self.dwconv(x, residual=True)
        return self.dropout_module(self.fc2(x))


class RetBlock(nn.Module):
    """CPE residual, then pre-norm retention and FFN residuals (optionally layer-scaled)."""

    def __init__(self, retention: str, embed_dim: int, num_heads: int, ffn_dim: int, drop_path: float = 0.0,
                 layerscale: bool = False, layer_init_values: float = 1e-5, attn_backend: str = "auto"):
        super().__init__()
        if retention not in ("chunk", "whole"):
            raise ValueError(f"RetBlock: retention must be 'chunk' or 'whole', got {retention!r}")
        self.layerscale = layerscale
        self.embed_dim = embed_dim
        self.retention_layer_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.retention = VisionRetention(embed_dim, num_heads, decomposed=retention == "chunk",
                                         attn_backend=attn_backend)
        self.drop_path = DropPath(drop_path)
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ffn = FeedForwardNetwork(embed_dim, ffn_dim)
        self.pos = DWConv2d(embed_dim, 3, 1, 1)
        if layerscale:
            self.gamma_1 = nn.Parameter(layer_init_values * torch.ones(1, 1, 1, embed_dim))
            self.gamma_2 = nn.Parameter(layer_init_values * torch.ones(1, 1, 1, embed_dim))

    def forward(self, x: Tensor, rel_pos: Tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x = self.pos(x, residual=True)
        a = self.retention(self.retention_layer_norm(x), rel_pos)
        if self.layerscale:
            a = self.gamma_1 * a
        x = x + self.drop_path(a)
        f = self.ffn(self.final_layer_norm(x))
        if self.layerscale:
            f = self.gamma_2 * f
        return x + self.drop_path(f)


class PatchMerging(nn.Module):
    """3x3 stride-2 conv + BatchNorm between stages, (B, H, W, C) -> (B, H/2, W/2, C')."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Conv2d(dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.reduction(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)


class BasicLayer(nn.Module):
    """One stage: the relative-position buffers, ``depth`` RetBlocks and the optional downsampling."""

    def __init__(self, embed_dim: int, out_dim: Optional[int], depth: int, num_heads: int, init_value: float,
                 heads_range: float, ffn_dim: int, drop_path: Sequence[float], chunkwise_recurrent: bool,
                 downsample: bool, use_checkpoint: bool = False, layerscale: bool = False,
                 layer_init_values: float = 1e-5, attn_backend: str = "auto"):
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.chunkwise_recurrent = chunkwise_recurrent
        self.Relpos = RetNetRelPos2d(embed_dim, num_heads, init_value, heads_range)
        flag = "chunk" if chunkwise_recurrent else "whole"
        self.blocks = nn.ModuleList([
            RetBlock(flag, embed_dim, num_heads, ffn_dim, drop_path[i], layerscale, layer_init_values, attn_backend)
            for i in range(depth)
        ])
        self.downsample = PatchMerging(embed_dim, out_dim) if downsample else None

    def forward_blocks(self, x: Tensor) -> Tensor:
        """The stage's blocks alone: (B, H, W, C) -> (B, H, W, C), before the downsampling."""
        _, H, W, _ = x.shape
        rel_pos = self.Relpos(H, W)  # shared by the stage's blocks
        for blk in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch_checkpoint.checkpoint(blk, x, rel_pos, use_reentrant=False)
            else:
                x = blk(x, rel_pos)
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_blocks(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class PatchEmbed(nn.Module):
    """Convolutional stem: four 3x3 convs (two of stride 2) with BatchNorm and GELU -> (B, H/4, W/4, C)."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96):
        super().__init__()
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        half = embed_dim // 2
        self.proj = nn.Sequential(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, embed_dim, 3, 2, 1), nn.BatchNorm2d(embed_dim), nn.GELU(),
            nn.Conv2d(embed_dim, embed_dim, 3, 1, 1), nn.BatchNorm2d(embed_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(channels_last_images(x)).permute(0, 2, 3, 1)  # a view: (B, H, W, C) contiguous


def _per_stage(name: str, value, n: int) -> List:
    if isinstance(value, (bool, int, float)):
        raise TypeError(f"{name} must have one entry per stage ({n}), got the single value {value!r}")
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{name} must have one entry per stage ({n}), got {len(value)}")
    return value


def _build_trunk(model: nn.Module, owner: str, in_chans: int, embed_dims, depths, num_heads, init_values,
                 heads_ranges, mlp_ratios, drop_path_rate: float, use_checkpoints, chunkwise_recurrents,
                 layerscales, layer_init_values: float, attn_backend: str) -> List[int]:
    """Give ``model`` the stem and stages shared by the classifier and the backbone
    (``patch_embed``, ``layers``); returns the per-stage widths."""
    check_attn_backend(owner, attn_backend, "masa")
    depths = list(depths)
    n = len(depths)
    try:
        embed_dims = _per_stage("embed_dims", embed_dims, n)
        num_heads = _per_stage("num_heads", num_heads, n)
        init_values = _per_stage("init_values", init_values, n)
        heads_ranges = _per_stage("heads_ranges", heads_ranges, n)
        mlp_ratios = _per_stage("mlp_ratios", mlp_ratios, n)
        use_checkpoints = _per_stage("use_checkpoints", use_checkpoints, n)
        chunkwise_recurrents = _per_stage("chunkwise_recurrents", chunkwise_recurrents, n)
        layerscales = _per_stage("layerscales", layerscales, n)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{owner}: {exc}") from None
    for i, (c, h) in enumerate(zip(embed_dims, num_heads)):
        if c % h:
            raise ValueError(f"{owner}: embed_dims[{i}]={c} is not divisible by num_heads[{i}]={h}")
    model.patch_embed = PatchEmbed(in_chans, embed_dims[0])
    # stochastic depth decay rule (on the CPU, so that building under torch.device("meta") works)
    dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
    model.layers = nn.ModuleList()
    for i in range(n):
        start = sum(depths[:i])
        model.layers.append(BasicLayer(
            embed_dim=embed_dims[i],
            out_dim=embed_dims[i + 1] if i < n - 1 else None,
            depth=depths[i],
            num_heads=num_heads[i],
            init_value=init_values[i],
            heads_range=heads_ranges[i],
            ffn_dim=int(mlp_ratios[i] * embed_dims[i]),
            drop_path=dpr[start:start + depths[i]],
            chunkwise_recurrent=chunkwise_recurrents[i],
            downsample=i < n - 1,
            use_checkpoint=use_checkpoints[i],
            layerscale=layerscales[i],
            layer_init_values=layer_init_values,
            attn_backend=attn_backend,
        ))
    return embed_dims


def _init_weights(m: nn.Module) -> None:
    # as officially: applied after the layers' own init, so every Linear ends truncated-normal
    if getattr(getattr(m, "weight", None), "is_meta", False):
        return  # layout only (torch.device("meta")): nothing to draw, and meta in-place ops are slow
    if isinstance(m, nn.Linear):
        # officially trunc_normal_(std=.02) with the default absolute bounds (-2, 2): 100 sigma,
        # so the truncation never acts; normal_ draws the same distribution far faster on CPU
        with torch.no_grad():
            m.weight.normal_(0.0, 0.02).clamp_(-2.0, 2.0)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def _check_images(owner: str, x, in_chans: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{owner}: x must have shape (B, {in_chans}, H, W), got {tuple(x.shape)}")


def _levels(embed_dims: Sequence[int]) -> List[dict]:
    # stage i runs at stride 4 * 2**i (the stem halves twice, every PatchMerging once more)
    return [dict(num_chs=c, reduction=4 * 2 ** i, module=f"layers.{i}") for i, c in enumerate(embed_dims)]


class VisRetNet(IntermediatesMixin, nn.Module):
    """The RMT backbone and classifier (official class name and module tree).

    Input (B, in_chans, H, W) of any size (the stem and downsampling convs pad: every stride-2
    step gives ceil(size / 2), as in the official code). Returns (B, num_classes) logits.
    ``forward_intermediates`` gives the per-stage maps (before each downsampling).
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, embed_dims=(96, 192, 384, 768),
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), init_values=(1, 1, 1, 1),
                 heads_ranges=(3, 3, 3, 3), mlp_ratios=(3, 3, 3, 3), drop_path_rate: float = 0.1,
                 use_checkpoints=(False, False, False, False), chunkwise_recurrents=(True, True, False, False),
                 projection: int = 1024, layerscales=(False, False, False, False), layer_init_values: float = 1e-6,
                 attn_backend: str = "auto"):
        super().__init__()
        check_attn_backend("VisRetNet", attn_backend, "masa")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"VisRetNet: num_classes must be an int >= 0, got {num_classes!r}")
        embed_dims = _build_trunk(self, "VisRetNet", in_chans, embed_dims, depths, num_heads, init_values,
                                  heads_ranges, mlp_ratios, drop_path_rate, use_checkpoints, chunkwise_recurrents,
                                  layerscales, layer_init_values, attn_backend)
        self.num_classes = num_classes
        self.num_layers = len(embed_dims)
        self.embed_dim = embed_dims[0]
        self.embed_dims = embed_dims
        self.num_features = embed_dims[-1]
        self.projection = projection
        self.mlp_ratios = list(mlp_ratios)
        self.attn_backend = attn_backend
        self.proj = Linear(self.num_features, projection)
        self.norm = nn.BatchNorm2d(projection)
        self.head = Linear(projection, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    _init_weights = staticmethod(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "") -> None:
        """A fresh head for ``num_classes`` (0: none, forward returns the pooled features)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"VisRetNet: num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        device = self.proj.weight.device
        self.head = Linear(self.projection, num_classes, device=device) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def feature_levels(self) -> List[dict]:
        return _levels(self.embed_dims)

    def _forward_levels(self, x: Tensor, take: Sequence[int], last: int) -> Tuple[List[Tensor], Tensor]:
        _check_images("VisRetNet", x, self.patch_embed.in_chans)
        x = self.patch_embed(x)
        maps = []
        for i in range(last + 1):
            layer = self.layers[i]
            x = layer.forward_blocks(x)
            if i in take:
                maps.append(x.permute(0, 3, 1, 2).contiguous())
            if layer.downsample is not None:
                x = layer.downsample(x)
        return maps, x

    def _finish(self, x: Tensor) -> Tensor:
        x = self.norm(self.proj(x).permute(0, 3, 1, 2))  # (B, projection, h, w)
        return F.silu(x).mean(dim=(2, 3))  # Swish, then the average pool

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, projection) pooled features."""
        return self._finish(self._forward_levels(x, (), self.num_layers - 1)[1])

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class RMT(nn.Module):
    """The official detection / segmentation backbone (qhfan/RMT ``detect/mmdet/models/backbones/RMT.py``,
    identical under ``segmentation/mmseg``) on ``vitattn.masa``: the same constructor arguments,
    module tree and state_dict (``patch_embed``, ``layers``, ``extra_norms``), so the backbone
    weights of the official detection and segmentation checkpoints load with ``strict=True``.

    ``forward(x)`` returns a list with, for every level in ``out_indices``, the stage's output
    before its downsampling, through that level's LayerNorm (``extra_norms[i]``), as a
    contiguous (B, embed_dims[i], ceil(H / 2**(i+2)), ceil(W / 2**(i+2))) map. Any input size
    works (the strided convs pad). Stages after the last requested level are not run.

    ``norm_eval`` (default True, as officially): ``train()`` leaves every BatchNorm layer in
    eval mode, so the running statistics of the pretrained weights stay fixed under
    detection-size batches. (The official override tests ``isinstance(m, nn.BatchNorm2d)``,
    which its SyncBatchNorm layers are not; here every BatchNorm kind, SyncBatchNorm
    included, is kept in eval mode.) ``train()`` returns the module.

    ``norm_layer``, ``patch_norm`` and ``projection`` are accepted for the official signature
    and unused, as officially. ``use_checkpoint`` (one bool, or one per stage) runs each block
    under activation checkpointing. ``attn_backend`` is passed to vitattn.masa.
    """

    def __init__(self, in_chans: int = 3, out_indices=(0, 1, 2, 3), embed_dims=(96, 192, 384, 768),
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), init_values=(1, 1, 1, 1), heads_ranges=(3, 3, 3, 3),
                 mlp_ratios=(3, 3, 3, 3), drop_path_rate: float = 0.1, norm_layer=nn.LayerNorm, patch_norm: bool = True,
                 use_checkpoint=False, chunkwise_recurrents=(True, True, False, False), projection: int = 1024,
                 layerscales=(False, False, False, False), layer_init_values: float = 1e-6, norm_eval: bool = True,
                 attn_backend: str = "auto"):
        super().__init__()
        if norm_layer is not nn.LayerNorm:
            raise ValueError(f"RMT: norm_layer must be nn.LayerNorm (the official backbone ignores it), got {norm_layer!r}")
        if not isinstance(norm_eval, bool):
            raise TypeError(f"RMT: norm_eval must be a bool, got {type(norm_eval).__name__}")
        n = len(depths)
        use_checkpoints = [use_checkpoint] * n if isinstance(use_checkpoint, bool) else use_checkpoint
        embed_dims = _build_trunk(self, "RMT", in_chans, embed_dims, depths, num_heads, init_values, heads_ranges,
                                  mlp_ratios, drop_path_rate, use_checkpoints, chunkwise_recurrents, layerscales,
                                  layer_init_values, attn_backend)
        self.out_indices = tuple(take_indices(n, out_indices, "RMT: out_indices"))
        self.num_layers = n
        self.embed_dim = embed_dims[0]
        self.embed_dims = embed_dims
        self.num_features = embed_dims[-1]
        self.mlp_ratios = list(mlp_ratios)
        self.norm_eval = norm_eval
        self.attn_backend = attn_backend
        # one LayerNorm per level (default eps, as officially), whichever levels are returned
        self.extra_norms = nn.ModuleList([nn.LayerNorm(c) for c in embed_dims])
        self.apply(_init_weights)

    # a classification checkpoint: its head is dropped, extra_norms keep their init (load_features_checkpoint)
    checkpoint_skip = ("proj", "norm", "head")
    checkpoint_may_lack = ("extra_norms",)

    @property
    def feature_info(self) -> FeatureInfo:
        return FeatureInfo(_levels(self.embed_dims), self.out_indices)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"absolute_pos_embed"}

    @torch.jit.ignore
    def no_weight_decay_keywords(self):
        return {"relative_position_bias_table"}

    def forward(self, x: Tensor) -> List[Tensor]:
        _check_images("RMT", x, self.patch_embed.in_chans)
        x = self.patch_embed(x)
        outs = []
        for i in range(self.out_indices[-1] + 1):
            layer = self.layers[i]
            x = layer.forward_blocks(x)
            if i in self.out_indices:
                outs.append(self.extra_norms[i](x).permute(0, 3, 1, 2).contiguous())
            if layer.downsample is not None and i < self.out_indices[-1]:
                x = layer.downsample(x)
        return outs

    def train(self, mode: bool = True) -> "RMT":
        super().train(mode)
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def init_weights(self, pretrained=None) -> None:
        """The official hook (mmdet / mmseg 2.x call it): ``pretrained`` None re-initialises the
        weights; a path loads a classification checkpoint (head dropped, ``extra_norms`` kept
        at their init) or a backbone / detector / segmentor checkpoint (strictly)."""
        if pretrained is None:
            self.apply(_init_weights)
        elif isinstance(pretrained, (str, os.PathLike)):
            self.apply(_init_weights)
            load_backbone_checkpoint(self, pretrained)
        else:
            raise TypeError(f"RMT: pretrained must be a str or None, got {type(pretrained).__name__}")


def load_backbone_checkpoint(model: "RMT", path) -> "RMT":
    """Load into an :class:`RMT` backbone a local checkpoint holding either

    * its own state_dict (or an official detector / segmentor checkpoint, whose ``backbone.``
      keys are taken): every key must match (strict);
    * a classification (VisRetNet) state_dict: ``proj`` / ``norm`` / ``head`` are dropped and
      ``extra_norms`` keep their values, as the official configs' ``load_checkpoint(strict=False)``
      does; every other key must match.

    Returns the model. Raises RuntimeError naming the keys that do not fit.
    """
    return load_features_checkpoint(model, path)


# ---------------------------------------------------------------- official configurations

_CFGS = {
    "rmt_t": dict(  # RMT_T3
        embed_dims=[64, 128, 256, 512], depths=[2, 2, 8, 2], num_heads=[4, 4, 8, 16],
        init_values=[2, 2, 2, 2], heads_ranges=[4, 4, 6, 6], mlp_ratios=[3, 3, 3, 3], drop_path_rate=0.1,
        chunkwise_recurrents=[True, True, False, False], layerscales=[False, False, False, False],
    ),
    "rmt_s": dict(  # RMT_S
        embed_dims=[64, 128, 256, 512], depths=[3, 4, 18, 4], num_heads=[4, 4, 8, 16],
        init_values=[2, 2, 2, 2], heads_ranges=[4, 4, 6, 6], mlp_ratios=[4, 4, 3, 3], drop_path_rate=0.15,
        chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, False, False],
    ),
    "rmt_b": dict(  # RMT_M2
        embed_dims=[80, 160, 320, 512], depths=[4, 8, 25, 8], num_heads=[5, 5, 10, 16],
        init_values=[2, 2, 2, 2], heads_ranges=[5, 5, 6, 6], mlp_ratios=[4, 4, 3, 3], drop_path_rate=0.4,
        chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, True, True],
        layer_init_values=1e-6,
    ),
    "rmt_l": dict(  # RMT_L6
        embed_dims=[112, 224, 448, 640], depths=[4, 8, 25, 8], num_heads=[7, 7, 14, 20],
        init_values=[2, 2, 2, 2], heads_ranges=[6, 6, 6, 6], mlp_ratios=[4, 4, 3, 3], drop_path_rate=0.5,
        chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, True, True],
        layer_init_values=1e-6,
    ),
}

# The backbone arguments of the official detection and segmentation configs (qhfan/RMT
# detect/configs/RMT/{retinanet,maskrcnn,casrcnn}_{t,s,m,l}_*.py and segmentation/configs/RMT/
# RMT_{FPN,Uper}_{t,s,m,l}_*.py; "m" there is "b" here). Stage 3 of "t" is full MaSA.
BACKBONE_CFGS = {
    "t": dict(embed_dims=[64, 128, 256, 512], depths=[2, 2, 8, 2], num_heads=[4, 4, 8, 16], init_values=[2, 2, 2, 2],
              heads_ranges=[4, 4, 6, 6], mlp_ratios=[3, 3, 3, 3], drop_path_rate=0.1,
              chunkwise_recurrents=[True, True, False, False], layerscales=[False, False, False, False],
              out_indices=(0, 1, 2, 3)),
    "s": dict(embed_dims=[64, 128, 256, 512], depths=[3, 4, 18, 4], num_heads=[4, 4, 8, 16], init_values=[2, 2, 2, 2],
              heads_ranges=[4, 4, 6, 6], mlp_ratios=[4, 4, 3, 3], drop_path_rate=0.15,
              chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, False, False],
              out_indices=(0, 1, 2, 3)),
    "b": dict(embed_dims=[80, 160, 320, 512], depths=[4, 8, 25, 8], num_heads=[5, 5, 10, 16], init_values=[2, 2, 2, 2],
              heads_ranges=[5, 5, 6, 6], mlp_ratios=[4, 4, 3, 3], drop_path_rate=0.4,
              chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, True, True],
              layer_init_values=1e-6, out_indices=(0, 1, 2, 3)),
    "l": dict(embed_dims=[112, 224, 448, 640], depths=[4, 8, 25, 8], num_heads=[7, 7, 14, 20],
              init_values=[2, 2, 2, 2], heads_ranges=[6, 6, 6, 6], mlp_ratios=[4, 4, 3, 3], drop_path_rate=0.5,
              chunkwise_recurrents=[True, True, True, False], layerscales=[False, False, True, True],
              layer_init_values=1e-6, out_indices=(0, 1, 2, 3)),
}


def rmt_backbone(size: str = "t", pretrained=None, **kwargs) -> RMT:
    """The official detection / segmentation backbone ``size`` ("t", "s", "b" or "l"; the
    official "m" is accepted for "b"), keyword arguments overriding the config (e.g.
    ``chunkwise_recurrents``, ``out_indices``, ``norm_eval``, ``attn_backend``).
    ``pretrained``: a local classification, backbone, detector or segmentor checkpoint."""
    key = {"m": "b"}.get(size, size)
    if key not in BACKBONE_CFGS:
        raise ValueError(f"rmt_backbone: size must be one of {sorted(BACKBONE_CFGS) + ['m']}, got {size!r}")
    model = RMT(**{**BACKBONE_CFGS[key], **kwargs})
    if pretrained not in (None, False):
        load_backbone_checkpoint(model, pretrained)
    return model


def _make(name: str, pretrained, kwargs):
    return build(name, VisRetNet, pretrained, _CFGS[name], kwargs, features_cls=RMT)


@register_model
def rmt_t(pretrained=False, **kwargs) -> VisRetNet:
    """RMT-T (official RMT_T3, 14.3M parameters). ``pretrained``: local checkpoint path.
    ``features_only=True`` (with ``out_indices``) builds the official detection backbone :class:`RMT`."""
    return _make("rmt_t", pretrained, kwargs)


@register_model
def rmt_s(pretrained=False, **kwargs) -> VisRetNet:
    """RMT-S (official RMT_S, 27.0M parameters). ``pretrained``: local checkpoint path.
    ``features_only=True`` (with ``out_indices``) builds the official detection backbone :class:`RMT`."""
    return _make("rmt_s", pretrained, kwargs)


@register_model
def rmt_b(pretrained=False, **kwargs) -> VisRetNet:
    """RMT-B (official RMT_M2, 54.2M parameters). ``pretrained``: local checkpoint path.
    ``features_only=True`` (with ``out_indices``) builds the official detection backbone :class:`RMT`."""
    return _make("rmt_b", pretrained, kwargs)


@register_model
def rmt_l(pretrained=False, **kwargs) -> VisRetNet:
    """RMT-L (official RMT_L6, 95.5M parameters). ``pretrained``: local checkpoint path.
    ``features_only=True`` (with ``out_indices``) builds the official detection backbone :class:`RMT`."""
    return _make("rmt_l", pretrained, kwargs)
