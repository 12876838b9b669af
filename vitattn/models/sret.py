"""SReT (Sliced Recursive Transformer, Shen et al., ECCV 2022) on vitattn's group attention.

``sret_t``, ``sret_lt`` and ``sret_s`` are the official ``SReT_T``, ``SReT_LT`` and
``SReT_S`` (szq0214/SReT, SReT.py): the same parameter and buffer names and shapes, so the
official checkpoints load with ``strict=True``, and the same computation:

* a convolutional stem (three stride-2 3x3 conv + BN + ReLU) and a learned 2-D position
  embedding, three stages separated by depthwise stride-2 convolutions, global average
  pooling, LayerNorm and a linear head;
* in every stage each *shared* transformer block is applied twice ("recursion"); every
  application is followed by its own non-linear projection layer (NLL: LayerNorm + MLP
  with learnable residual coefficients). The first application attends within
  ``groups1`` contiguous token groups, the recursive one within ``groups2`` groups of a
  random token permutation (sliced group self-attention, groups [8, 4, 1] / [2, 1, 1]);
* every residual branch is scaled by a learnable coefficient.

Attention runs through :func:`vitattn.group_attention` with the model's
``attn_backend`` ("auto" picks the fused kernel where one can run, "torch" the PyTorch path).

Permutation of the recursive pass (only where ``groups2 > 1``)
---------------------------------------------------------------
* training mode: a fresh permutation per call, drawn on the input's device with
  :func:`vitattn.random_permutation` (the official behaviour). It uses the
  device's default generator (seed it with ``torch.manual_seed``), or a private one after
  ``model.seed_permutations(seed)``.
* eval mode, set by ``eval_permutation`` (constructor argument, or
  ``model.set_eval_permutation(mode, seed)``):

  - ``"fixed"`` (default): one permutation per layer, drawn once from ``permutation_seed``
    on the CPU (so it is the same on every device) and kept as a non-persistent buffer:
    eval is deterministic and the state_dict stays the official one;
  - ``"random"``: a fresh permutation per call, as the official code does in eval;
  - ``"off"``: no permutation (groups are contiguous token ranges).

  The fixed permutations are not in the state_dict (which stays the official one). A model
  materialised with ``to_empty`` after meta-device construction must redraw them with
  ``model.set_eval_permutation("fixed")``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import group_attention, random_permutation
from ..nn._linear import Linear
from ..nn.mlp import Mlp
from ._common import DropPath, build, channels_last_images, check_attn_backend
from ._features import FeatureInfo, IntermediatesMixin, take_indices
from ._registry import register_model

EVAL_PERMUTATIONS = ("fixed", "random", "off")

__all__ = ["SReT", "SReTFeatures", "sret_t", "sret_lt", "sret_s", "EVAL_PERMUTATIONS"]


# ---------------------------------------------------------------- layers


class LearnableCoefficient(nn.Module):
    """A learned scalar multiplying a residual branch (parameter named ``bias`` as in SReT)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.bias


def _weighted_sum(x: Tensor, cx: LearnableCoefficient, y: Tensor, cy: LearnableCoefficient) -> Tensor:
    """cx(x) + cy(y) in two element-wise passes (y * cy, then x * cx added in place) and one
    allocation, instead of three of each (autograd saves the product's inputs, not its result)."""
    return torch.mul(y, cy.bias).addcmul_(x, cx.bias)


class NonLinearProjection(nn.Module):
    """SReT's NLL layer (official ``Non_proj``): x * c1 + c2 * MLP(LN(x)), no attention."""

    def __init__(self, dim: int, mlp_ratio: float, drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.coefficient1 = LearnableCoefficient()
        self.coefficient2 = LearnableCoefficient()

    def forward(self, x: Tensor, recursive: bool = False) -> Tensor:
        return _weighted_sum(x, self.coefficient1, self.mlp(self.norm1(x)), self.coefficient2)


class GroupAttention(nn.Module):
    """Multi-head self-attention inside token groups, through the vitattn group_attention op.

    The first application (``recursive=False``) uses ``groups1`` contiguous groups; the
    recursive one uses ``groups2`` groups of a token permutation when ``groups2 > 1`` (see
    the module docstring for how that permutation is chosen). ``num_tokens``, when known,
    lets the fixed eval permutation be built at construction (needed under torch.compile).
    """

    def __init__(self, dim: int, num_heads: int, groups1: int, groups2: int, *, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, proj_drop: float = 0.0, attn_backend: str = "auto",
                 num_tokens: Optional[int] = None, eval_permutation: str = "fixed",
                 permutation_seed: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"GroupAttention: dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.groups1 = groups1
        self.groups2 = groups2
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.attn_backend = check_attn_backend("GroupAttention", attn_backend, "group_attention")
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # training permutations: None = the device's default generator
        self.generator: Optional[torch.Generator] = None
        self.register_buffer("eval_perm", None, persistent=False)
        self.set_eval_permutation(eval_permutation, permutation_seed, num_tokens)

    def set_eval_permutation(self, mode: str, seed: int = 0, num_tokens: Optional[int] = None) -> None:
        if mode not in EVAL_PERMUTATIONS:
            raise ValueError(f"GroupAttention: eval_permutation must be one of {EVAL_PERMUTATIONS}, got {mode!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"GroupAttention: permutation_seed must be an int, got {type(seed).__name__}")
        self.eval_permutation = mode
        self.permutation_seed = seed
        if num_tokens is None and self.eval_perm is not None:
            num_tokens = self.eval_perm.numel()
        if num_tokens is None:
            num_tokens = getattr(self, "num_tokens", None)
        self.num_tokens = num_tokens  # remembered so that "off" -> "fixed" redraws eagerly
        self.eval_perm = None
        if mode == "fixed" and num_tokens is not None and self.groups2 > 1:
            self.eval_perm = self._draw_fixed(num_tokens)

    def _draw_fixed(self, n: int) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(self.permutation_seed)
        perm = random_permutation(n, device=torch.device("cpu"), generator=gen)
        device = self.qkv.weight.device
        return perm.to(device) if device.type != "meta" else perm

    def _permutation(self, n: int, device: torch.device) -> Optional[Tensor]:
        if self.training:
            return random_permutation(n, device=device, generator=self.generator)
        if self.eval_permutation == "off":
            return None
        if self.eval_permutation == "random":
            return random_permutation(n, device=device, generator=self.generator)
        if self.eval_perm is None or self.eval_perm.numel() != n:
            # built lazily in eager mode when the token count was not known at construction
            self.eval_perm = self._draw_fixed(n)
        return self.eval_perm.to(device)

    def forward(self, x: Tensor, recursive: bool = False) -> Tensor:
        B, N, C = x.shape
        groups = self.groups2 if recursive else self.groups1
        perm = self._permutation(N, x.device) if (recursive and groups > 1) else None
        # (B, N, 3 * C) -> three (B, heads, N, head_dim) views; channels are head-major
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = group_attention(q, k, v, groups, perm=perm, scale=self.scale,
                                                 backend=self.attn_backend)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class SReTBlock(nn.Module):
    """Shared transformer block (official ``Transformer_Block``) with learnable residual coefficients."""

    def __init__(self, dim: int, num_heads: int, groups1: int, groups2: int, mlp_ratio: float, *,
                 drop: float = 0.0, drop_path: float = 0.0, attn_backend: str = "auto",
                 num_tokens: Optional[int] = None, eval_permutation: str = "fixed", permutation_seed: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GroupAttention(dim, num_heads, groups1, groups2, qkv_bias=True, proj_drop=drop,
                                   attn_backend=attn_backend, num_tokens=num_tokens,
                                   eval_permutation=eval_permutation, permutation_seed=permutation_seed)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.coefficient1 = LearnableCoefficient()
        self.coefficient2 = LearnableCoefficient()
        self.coefficient3 = LearnableCoefficient()
        self.coefficient4 = LearnableCoefficient()

    def forward(self, x: Tensor, recursive: bool = False) -> Tensor:
        x = _weighted_sum(x, self.coefficient1, self.drop_path(self.attn(self.norm1(x), recursive)), self.coefficient2)
        return _weighted_sum(x, self.coefficient3, self.drop_path(self.mlp(self.norm2(x))), self.coefficient4)


class SReTStage(nn.Module):
    """One stage (official ``Transformer``): each shared block applied ``depth // recursive_num``
    times, every application followed by its own NLL layer.

    ``blocks`` lists the applications in order, so a shared block appears under several
    indices (as in the official state_dict); the applications after the first of a block are
    the recursive ones.
    """

    def __init__(self, base_dim: int, depth: int, recursive_num: int, groups1: int, groups2: int, heads: int,
                 mlp_ratio: float, np_mlp_ratio: float, *, drop_rate: float = 0.0,
                 drop_path: Optional[Sequence[float]] = None, attn_backend: str = "auto",
                 num_tokens: Optional[int] = None, eval_permutation: str = "fixed", permutation_seed: int = 0):
        super().__init__()
        if depth % recursive_num:
            raise ValueError(f"SReT: depth ({depth}) must be a multiple of recursive_num ({recursive_num})")
        dim = base_dim * heads
        drop_path = list(drop_path) if drop_path is not None else [0.0] * depth
        self.layers = nn.ModuleList()  # empty in the official model too; kept for the same attribute set
        shared = [
            SReTBlock(dim, heads, groups1, groups2, mlp_ratio, drop=drop_rate, drop_path=drop_path[i],
                      attn_backend=attn_backend, num_tokens=num_tokens, eval_permutation=eval_permutation,
                      permutation_seed=permutation_seed + i)
            for i in range(recursive_num)
        ]
        loops = depth // recursive_num
        nll = [NonLinearProjection(dim, np_mlp_ratio, drop_rate) for _ in range(depth)]
        order: List[nn.Module] = []
        self._recursive: List[bool] = []
        for b in range(recursive_num):
            for r in range(loops):
                order += [shared[b], nll[b * loops + r]]
                self._recursive += [r > 0, False]
        self.blocks = nn.ModuleList(order)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        # tokens (B, N, C) contiguous: the residual stream keeps the layout of what enters it, and
        # as a transposed view every LayerNorm of the stage would copy its input
        x = x.flatten(2).transpose(1, 2).contiguous()
        for blk, recursive in zip(self.blocks, self._recursive):
            x = blk(x, recursive)
        return x.transpose(1, 2).reshape(B, C, H, W)


class ConvHeadPooling(nn.Module):
    """Depthwise-grouped strided convolution between stages (official ``conv_head_pooling``)."""

    def __init__(self, in_dim: int, out_dim: int, stride: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=stride + 1, padding=stride // 2, stride=stride,
                              groups=in_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class ConvEmbedding(nn.Module):
    """Stem: three stride-2 3x3 conv + BN + ReLU, overall stride 8 (official ``conv_embedding``)."""

    def __init__(self, in_chans: int, out_dim: int):
        super().__init__()
        mid = out_dim // 2
        self.conv1 = nn.Conv2d(in_chans, mid, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, out_dim, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(out_dim)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(out_dim, out_dim, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(out_dim)
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(channels_last_images(x))))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.relu3(self.bn3(self.conv3(x)))


# ---------------------------------------------------------------- model


class SReT(IntermediatesMixin, nn.Module):
    """Sliced Recursive Transformer. See the module docstring for the architecture and the
    ``eval_permutation`` / ``permutation_seed`` switch.

    ``img_size`` must be a multiple of 8 (the position embedding is (img_size / 8)^2) and give
    every stage a token count divisible by its group counts (224 for the official weights).

    ``dynamic_img_size=True`` accepts other input sizes (as timm's ViTs): the position
    embedding is resampled (bicubic) to the stem's output grid, ceil(H / 8) x ceil(W / 8);
    every stage's token count must still be divisible by its group counts (the error says
    which). With False (default) any other size is an error.
    """

    def __init__(self, img_size: int = 224, base_dims: Sequence[int] = (32, 32, 32), depth: Sequence[int] = (4, 10, 6),
                 recursive_num: Sequence[int] = (2, 5, 3), heads: Sequence[int] = (2, 4, 8),
                 groups1: Sequence[int] = (8, 4, 1), groups2: Sequence[int] = (2, 1, 1), mlp_ratio: float = 3.6,
                 np_mlp_ratio: float = 1.0, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1, attn_backend: str = "auto",
                 eval_permutation: str = "fixed", permutation_seed: int = 0, dynamic_img_size: bool = False):
        super().__init__()
        if not isinstance(dynamic_img_size, bool):
            raise TypeError(f"SReT: dynamic_img_size must be a bool, got {type(dynamic_img_size).__name__}")
        self.dynamic_img_size = dynamic_img_size
        self._check_config(img_size, base_dims, depth, recursive_num, heads, groups1, groups2, num_classes,
                           attn_drop_rate, eval_permutation, permutation_seed)
        self.attn_backend = check_attn_backend("SReT", attn_backend, "group_attention")
        self.permutation_seed = permutation_seed
        self.base_dims = list(base_dims)
        self.heads = list(heads)
        self.img_size = img_size
        self.groups1 = list(groups1)
        self.groups2 = list(groups2)
        self.num_classes = num_classes
        width = img_size // 8
        self.pos_embed = nn.Parameter(torch.zeros(1, base_dims[0] * heads[0], width, width))
        self.patch_embed = ConvEmbedding(in_chans, base_dims[0] * heads[0])
        self.pos_drop = nn.Dropout(drop_rate)
        self.transformers = nn.ModuleList()
        self.pools = nn.ModuleList()
        total = sum(depth)
        start = 0
        for s in range(len(depth)):
            dpr = [drop_path_rate * i / total for i in range(start, start + depth[s])]
            start += depth[s]
            self.transformers.append(SReTStage(
                base_dims[s], depth[s], recursive_num[s], groups1[s], groups2[s], heads[s], mlp_ratio,
                np_mlp_ratio, drop_rate=drop_rate, drop_path=dpr, attn_backend=attn_backend,
                num_tokens=self._side(img_size, s) ** 2, eval_permutation=eval_permutation,
                permutation_seed=permutation_seed + 1000 * s))
            if s < len(depth) - 1:
                self.pools.append(ConvHeadPooling(base_dims[s] * heads[s], base_dims[s + 1] * heads[s + 1], 2))
        self.embed_dim = base_dims[-1] * heads[-1]
        self.norm = nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.head = Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _side(img_size: int, stage: int) -> int:
        side = img_size // 8
        for _ in range(stage):
            side = (side + 1) // 2  # 3x3 stride-2 padding-1 pooling conv
        return side

    @classmethod
    def _check_config(cls, img_size, base_dims, depth, recursive_num, heads, groups1, groups2, num_classes,
                      attn_drop_rate, eval_permutation, permutation_seed) -> None:
        if isinstance(img_size, bool) or not isinstance(img_size, int):
            raise TypeError(f"SReT: img_size must be an int, got {type(img_size).__name__}")
        if img_size <= 0 or img_size % 8:
            raise ValueError(f"SReT: img_size must be a positive multiple of 8, got {img_size}")
        n = len(depth)
        for name, seq in (("base_dims", base_dims), ("recursive_num", recursive_num), ("heads", heads),
                          ("groups1", groups1), ("groups2", groups2)):
            if len(seq) != n:
                raise ValueError(f"SReT: {name} must have one entry per stage ({n}), got {list(seq)}")
        for s in range(n):
            tokens = cls._side(img_size, s) ** 2
            for name, g in (("groups1", groups1[s]), ("groups2", groups2[s])):
                if g < 1 or tokens % g:
                    raise ValueError(f"SReT: {name}[{s}]={g} must divide the stage's {tokens} tokens "
                                     f"(img_size={img_size})")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"SReT: num_classes must be an int >= 0, got {num_classes!r}")
        if attn_drop_rate != 0:
            raise ValueError(f"SReT: attn_drop_rate must be 0 (the group_attention op has no attention "
                             f"dropout; the official configs use 0), got {attn_drop_rate}")
        if eval_permutation not in EVAL_PERMUTATIONS:
            raise ValueError(f"SReT: eval_permutation must be one of {EVAL_PERMUTATIONS}, got {eval_permutation!r}")
        if isinstance(permutation_seed, bool) or not isinstance(permutation_seed, int):
            raise TypeError(f"SReT: permutation_seed must be an int, got {type(permutation_seed).__name__}")

    # ------------------------------------------------ permutation switches

    def _group_attentions(self) -> List[GroupAttention]:
        return [m for m in self.modules() if isinstance(m, GroupAttention)]

    def set_eval_permutation(self, mode: str, seed: Optional[int] = None) -> "SReT":
        """Choose the eval-mode permutation of the recursive pass: "fixed", "random" or "off".

        ``seed`` (default: keep the current one) redraws the fixed permutations.
        """
        if mode not in EVAL_PERMUTATIONS:
            raise ValueError(f"SReT: mode must be one of {EVAL_PERMUTATIONS}, got {mode!r}")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"SReT: seed must be an int or None, got {type(seed).__name__}")
            self.permutation_seed = seed
        for s, stage in enumerate(self.transformers):
            # shared blocks in order; the same per-layer seeds as at construction
            attns = [m for m in stage.modules() if isinstance(m, GroupAttention)]
            for i, m in enumerate(attns):
                m.set_eval_permutation(mode, self.permutation_seed + 1000 * s + i)
        return self

    def seed_permutations(self, seed: Optional[int], device=None) -> "SReT":
        """Draw training (and eval "random") permutations from a private generator seeded with
        ``seed`` on ``device`` (default: the parameters' device); ``None`` goes back to the
        device's default generator."""
        gen = None
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"SReT: seed must be an int or None, got {type(seed).__name__}")
            device = torch.device(device) if device is not None else self.pos_embed.device
            gen = torch.Generator(device=device).manual_seed(seed)
        for m in self._group_attentions():
            m.generator = gen
        return self

    # ------------------------------------------------ forward

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str = "") -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"SReT: num_classes must be an int >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        device = self.pos_embed.device
        self.head = Linear(self.embed_dim, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def feature_levels(self) -> List[dict]:
        # the stem has stride 8, every pooling conv 2 more
        return [dict(num_chs=self.base_dims[s] * self.heads[s], reduction=8 * 2 ** s, module=f"transformers.{s}")
                for s in range(len(self.base_dims))]

    def _position(self, x: Tensor) -> Tensor:
        """x + the position embedding (resampled to x's grid with dynamic_img_size)."""
        if x.shape[-2:] == self.pos_embed.shape[-2:]:
            return x + self.pos_embed
        if not self.dynamic_img_size:
            raise ValueError(
                f"SReT: the input must be {8 * self.pos_embed.shape[-2]}x{8 * self.pos_embed.shape[-1]} pixels "
                f"(img_size of this model), got a stem output of {tuple(x.shape[-2:])} patches; build the model "
                f"with dynamic_img_size=True to resample the position embedding to other sizes")
        pos = F.interpolate(self.pos_embed, size=tuple(x.shape[-2:]), mode="bicubic", align_corners=False)
        return x + pos.to(x.dtype)

    def _check_grid(self, H: int, W: int, last: int) -> None:
        for s in range(last + 1):
            n = H * W
            for name, g in (("groups1", self.groups1[s]), ("groups2", self.groups2[s])):
                if n % g:
                    raise ValueError(f"SReT: stage {s} has {H}x{W} = {n} tokens at this input size, not divisible "
                                     f"by {name}[{s}]={g} (its token groups must be equal); choose an input size "
                                     f"whose stage grids give token counts divisible by the group counts")
            H, W = (H + 1) // 2, (W + 1) // 2  # the 3x3 stride-2 padding-1 pooling conv

    def _forward_levels(self, x: Tensor, take: Sequence[int], last: int) -> Tuple[List[Tensor], Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SReT: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.patch_embed.conv1.in_channels:
            raise ValueError(f"SReT: x must have shape (B, {self.patch_embed.conv1.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        x = self.patch_embed(x)
        x = self.pos_drop(self._position(x))
        self._check_grid(x.shape[-2], x.shape[-1], last)
        maps = []
        for s in range(last + 1):
            x = self.transformers[s](x)
            if s in take:
                maps.append(x)
            if s < last:
                x = self.pools[s](x)
        return maps, x

    def _finish(self, x: Tensor) -> Tensor:
        return self.norm(torch.flatten(self.avgpool(x), 1))

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, embed_dim) pooled, normalised features."""
        return self._finish(self._forward_levels(x, (), len(self.transformers) - 1)[1])

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class SReTFeatures(SReT):
    """SReT as a feature extractor (``features_only=True``): forward returns the NCHW output of
    every stage in ``out_indices`` (strides 8, 16, 32). The head, the final norm and the stages
    after the last requested one are not built; a classification checkpoint loads with them
    dropped (vitattn.models._common.load_features_checkpoint). Other arguments as :class:`SReT`."""

    def __init__(self, *args, out_indices=None, **kwargs):
        kwargs["num_classes"] = 0
        super().__init__(*args, **kwargs)
        n = len(self.transformers)
        self._levels = SReT.feature_levels(self)
        self.out_indices = tuple(take_indices(n, out_indices, "SReT: out_indices"))
        last = self.out_indices[-1]
        self.checkpoint_skip = ("norm", "head", *(f"transformers.{s}" for s in range(last + 1, n)),
                                *(f"pools.{s}" for s in range(last, n - 1)))
        self.transformers = self.transformers[:last + 1]
        self.pools = self.pools[:last]
        del self.norm, self.avgpool, self.head

    def feature_levels(self) -> List[dict]:
        return self._levels

    @property
    def feature_info(self) -> FeatureInfo:
        return FeatureInfo(self._levels, self.out_indices)

    def forward(self, x: Tensor) -> List[Tensor]:
        return self._forward_levels(x, self.out_indices, self.out_indices[-1])[0]


# ---------------------------------------------------------------- constructors (official configs)

_TINY = dict(base_dims=(32, 32, 32), depth=(4, 10, 6), recursive_num=(2, 5, 3), heads=(2, 4, 8),
             groups1=(8, 4, 1), groups2=(2, 1, 1))

_CFGS = {
    "sret_t": dict(_TINY, mlp_ratio=3.6, np_mlp_ratio=1.0),   # SReT_T
    "sret_lt": dict(_TINY, mlp_ratio=4.0, np_mlp_ratio=1.0),  # SReT_LT
    "sret_s": dict(base_dims=(42, 42, 42), depth=(4, 10, 6), recursive_num=(2, 5, 3), heads=(3, 6, 12),
                   groups1=(8, 4, 1), groups2=(2, 1, 1), mlp_ratio=3.0, np_mlp_ratio=2.0),  # SReT_S
}


@register_model
def sret_t(pretrained=False, **kwargs) -> SReT:
    """SReT-T (official SReT_T, 4,755,979 parameters). ``pretrained``: local checkpoint path."""
    return build("sret_t", SReT, pretrained, _CFGS["sret_t"], kwargs, features_cls=SReTFeatures)


@register_model
def sret_lt(pretrained=False, **kwargs) -> SReT:
    """SReT-LT (official SReT_LT, 4,988,024 parameters). ``pretrained``: local checkpoint path."""
    return build("sret_lt", SReT, pretrained, _CFGS["sret_lt"], kwargs, features_cls=SReTFeatures)


@register_model
def sret_s(pretrained=False, **kwargs) -> SReT:
    """SReT-S (official SReT_S, 20,899,692 parameters). ``pretrained``: local checkpoint path."""
    return build("sret_s", SReT, pretrained, _CFGS["sret_s"], kwargs, features_cls=SReTFeatures)
