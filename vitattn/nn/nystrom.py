"""Nyström kernel embedding (CKN / OTKE, as SeTformer uses before its optimal-transport attention).

``v(x) = k(Z, Z)^(-1/2) k(Z, x)`` with anchors Z and the Gaussian kernel
``k(z, x) = exp(-||z - x||^2 / (2 sigma^2))`` on L2-normalised vectors (CKN's and OTKE's
choice: on the unit sphere it is ``exp((<z, x> - 1) / sigma^2)``), so that
``<v(x), v(y)>`` is the projection of ``k(x, y)`` onto the span of ``k(Z, .)``.

* :func:`inverse_sqrt_psd`: the inverse square root of a symmetric positive semi-definite
  matrix by eigendecomposition, regularised as ``(A + eps I)^(-1/2)`` (``l + eps`` clamped at
  ``eps / 2``: no effect on a PSD input, rounding included), with a backward through the divided
  differences of ``f(l) = l^(-1/2)``, written in the closed form
  ``-1 / (s_i s_j (s_i + s_j))`` (``s = sqrt(l + eps)``): no ``1 / (l_i - l_j)``, so equal or
  nearly equal eigenvalues are exact and stable.
* :class:`NystromEmbedding`: per-head anchors, the embedding above; ``init_kmeans_`` draws the
  anchors by spherical k-means on sample features (CKN's unsupervised initialisation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _InverseSqrtPSD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, eps: float) -> Tensor:
        lam, vec = torch.linalg.eigh(a)
        # smooth for every eigenvalue > -eps/2 (every PSD input, rounding included); the floor only
        # keeps an indefinite input finite
        s = (lam + eps).clamp_min(eps / 2).sqrt()
        ctx.save_for_backward(vec, s)
        return (vec / s.unsqueeze(-2)) @ vec.mT

    @staticmethod
    def backward(ctx, grad: Tensor):
        vec, s = ctx.saved_tensors
        grad = grad.to(vec.dtype)
        grad = (grad + grad.mT) / 2
        # divided differences of l -> l^(-1/2) between eigenvalues (the derivative on the diagonal)
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        dd = -1.0 / (si * sj * (si + sj))
        return vec @ (dd * (vec.mT @ grad @ vec)) @ vec.mT, None


def inverse_sqrt_psd(a: Tensor, eps: float = 1e-3) -> Tensor:
    """``(sym(a) + eps I)^(-1/2)`` for (..., k, k) symmetric positive semi-definite ``a``
    (``sym(a) = (a + a^T) / 2``), with its exact gradient. ``eps`` > 0 bounds the condition
    number by ``(max eigenvalue + eps) / eps``."""
    if not isinstance(a, torch.Tensor) or a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"inverse_sqrt_psd: a must be a (..., k, k) tensor, got "
                         f"{tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__}")
    if not a.is_floating_point():
        raise TypeError(f"inverse_sqrt_psd: a must be floating point, got {a.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"inverse_sqrt_psd: eps must be a number > 0, got {eps!r}")
    # eigh in fp32 at least (half precision has no eigensolver and too little precision)
    work = a if a.dtype in (torch.float32, torch.float64) else a.float()
    # autocast would run the products in bf16/fp16: keep the whole solve in the working dtype
    with torch.autocast(device_type=a.device.type, enabled=False):
        out = _InverseSqrtPSD.apply((work + work.mT) / 2, float(eps))
    return out.to(a.dtype)


def spherical_kmeans(x: Tensor, k: int, iters: int = 20, generator: Optional[torch.Generator] = None) -> Tensor:
    """k unit-norm centres of the rows of ``x`` (n, d) by spherical k-means (cosine similarity),
    seeded by k-means++ (CPU ``generator``); an empty cluster is re-seeded with the row farthest
    from every centre. Returns (k, d). An initialisation routine: not for use inside a forward."""
    if x.dim() != 2:
        raise ValueError(f"spherical_kmeans: x must be (n, d), got {tuple(x.shape)}")
    n = x.shape[0]
    if n < k:
        raise ValueError(f"spherical_kmeans: need at least k={k} samples, got {n}")
    x = F.normalize(x.detach().float(), dim=-1)
    # k-means++ seeding: each next centre drawn with probability proportional to its squared
    # distance to the nearest chosen one (on the sphere |x - c|^2 = 2 - 2 <x, c>)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = x[first:first + 1].clone()
    for _ in range(1, k):
        d2 = (2 - 2 * (x @ centres.T).max(dim=1).values).clamp_min(0).cpu()
        if float(d2.sum()) <= 0:  # fewer distinct points than k: any point
            d2 = torch.ones(n)
        pick = int(torch.multinomial(d2.double(), 1, generator=generator))
        centres = torch.cat([centres, x[pick:pick + 1]])
    for _ in range(iters):
        sim = x @ centres.T  # (n, k)
        assign = sim.argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            far = sim.max(dim=1).values.argsort()[: len(empty)]
            sums[empty] = x[far]
        centres = F.normalize(sums, dim=-1)
    return centres


class NystromEmbedding(nn.Module):
    """Per-head Nyström embedding of (..., heads, n, dim) features into (..., heads, n, num_anchors).

    ``anchors`` (heads, num_anchors, dim) are the points Z (used L2-normalised); ``sigma`` is the
    Gaussian kernel's width on the unit sphere (CKN's default 0.5); ``eps`` regularises
    ``k(Z, Z)``. The embedding of a feature has norm close to 1 (exactly 1 on the anchors' span).
    """

    def __init__(self, dim: int, num_anchors: int, heads: int = 1, sigma: float = 0.5, eps: float = 1e-3):
        super().__init__()
        for name, v in (("dim", dim), ("num_anchors", num_anchors), ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"NystromEmbedding: {name} must be an int >= 1, got {v!r}")
        for name, v in (("sigma", sigma), ("eps", eps)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"NystromEmbedding: {name} must be a number > 0, got {v!r}")
        self.dim, self.num_anchors, self.heads = dim, num_anchors, heads
        self.sigma, self.eps = float(sigma), float(eps)
        self.anchors = nn.Parameter(torch.empty(heads, num_anchors, dim))
        # eval mode keeps k(Z, Z)^(-1/2) (a function of the anchors alone): inference skips the
        # eigendecomposition, and torch.export / ONNX export see a constant (ONNX has no eigh).
        # Taken at eval(), after load_state_dict, and by an eager eval forward once the anchors
        # changed in place; an export traces fake tensors and uses the cache as it stands
        self.register_buffer("_projection_cache", None, persistent=False)
        self._cache_version = -1
        self.register_load_state_dict_post_hook(lambda module, keys: module._refresh_cache())
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.anchors.is_meta:
            return
        with torch.no_grad():
            self.anchors.normal_()
            self.anchors.copy_(F.normalize(self.anchors, dim=-1))

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """k(a_i, b_j) = exp((<a_i, b_j> - 1) / sigma^2) for L2-normalised rows of a and b."""
        return torch.exp((a @ b.mT - 1.0) / self.sigma ** 2)

    def projection(self) -> Tensor:
        """k(Z, Z)^(-1/2): (heads, num_anchors, num_anchors)."""
        z = F.normalize(self.anchors, dim=-1)
        return inverse_sqrt_psd(self.kernel(z, z), self.eps)

    def train(self, mode: bool = True) -> "NystromEmbedding":
        super().train(mode)
        self._refresh_cache()
        return self

    def _refresh_cache(self) -> None:
        """Eval mode: compute the projection now (no gradient); training mode: drop it."""
        if self.training or self.anchors.is_meta:
            self._projection_cache, self._cache_version = None, -1
            return
        with torch.no_grad():
            self._projection_cache = self.projection().detach()
        self._cache_version = self.anchors._version

    def _current_projection(self) -> Tensor:
        if self.training or self._projection_cache is None:
            return self.projection()
        tracing = torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()
        if not tracing and (self.anchors._version != self._cache_version
                            or self._projection_cache.device != self.anchors.device):
            self._refresh_cache()  # the anchors changed in place (or moved) since eval()
        return self._projection_cache

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3 or x.shape[-3] != self.heads or x.shape[-1] != self.dim:
            raise ValueError(f"NystromEmbedding: x must be (..., {self.heads}, n, {self.dim}), got {tuple(x.shape)}")
        z = F.normalize(self.anchors, dim=-1).to(x.dtype)
        kzx = self.kernel(F.normalize(x, dim=-1), z)  # (..., heads, n, k): k(Z, x) as rows
        return kzx @ self._current_projection().to(x.dtype)  # the projection is symmetric

    @torch.no_grad()
    def init_kmeans_(self, features: Tensor, iters: int = 20, generator: Optional[torch.Generator] = None) -> None:
        """Anchors from spherical k-means on sample features (..., heads, n, dim), per head."""
        if features.shape[-3] != self.heads or features.shape[-1] != self.dim:
            raise ValueError(f"NystromEmbedding.init_kmeans_: features must be (..., {self.heads}, n, {self.dim}), "
                             f"got {tuple(features.shape)}")
        per_head = features.transpose(0, -3).reshape(self.heads, -1, self.dim) if features.dim() > 3 else features
        for h in range(self.heads):
            self.anchors[h].copy_(spherical_kmeans(per_head[h], self.num_anchors, iters, generator))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_anchors={self.num_anchors}, heads={self.heads}, sigma={self.sigma}, eps={self.eps}"
