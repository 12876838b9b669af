"""SReT group / permuted attention: the public function, permutation helpers, validation,
and the ``vitattn::group_attention_fwd`` / ``_bwd`` custom ops that run the chosen backend."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _validate as V
from ..._dtypes import acc_dtype, autocast_inputs
from .._library import LIB, op_caller, register_autograd
from .._onnx import exporting as _onnx_exporting
from . import onnx_impl
from .backends import dispatcher

OP = "group_attention"
PERM_CHECK = "perm is a permutation"

# ---------------------------------------------------------------- custom ops

LIB.define("group_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? perm, int groups, float scale, str backend)"
           " -> (Tensor, Tensor)")
LIB.define("group_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? perm, "
           "int groups, float scale, str backend) -> (Tensor, Tensor, Tensor)")


def _fwd_shapes(q: Tensor, v: Tensor):
    B, heads, N, _ = q.shape
    return q.new_empty((B, heads, N, v.shape[-1])), q.new_empty((B, heads, N), dtype=acc_dtype(q.dtype))


def _group_fwd(q, k, v, perm, groups, scale, backend):
    if q.numel() == 0 or v.numel() == 0:  # an empty batch, token set or value width
        return tuple(t.zero_() for t in _fwd_shapes(q, v))
    return tuple(dispatcher.impl(backend).fwd(q, k, v, perm, groups, scale))


def _group_bwd(dout, q, k, v, out, lse, perm, groups, scale, backend):
    if q.numel() == 0 or v.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return tuple(dispatcher.impl(backend).bwd(dout, q, k, v, out, lse, perm, groups, scale))


LIB.impl("group_attention_fwd", _group_fwd, "CompositeExplicitAutograd")
LIB.impl("group_attention_bwd", _group_bwd, "CompositeExplicitAutograd")
group_attention_bwd_call = op_caller("group_attention_bwd", _group_bwd)


@torch.library.register_fake("vitattn::group_attention_fwd", lib=LIB)
def _(q, k, v, perm, groups, scale, backend):
    return _fwd_shapes(q, v)


@torch.library.register_fake("vitattn::group_attention_bwd", lib=LIB)
def _(dout, q, k, v, out, lse, perm, groups, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, perm, groups, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, perm)
    ctx.groups, ctx.scale, ctx.backend = groups, scale, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, perm = ctx.saved_tensors
    dq, dk, dv = group_attention_bwd_call(dout, q, k, v, out, lse, perm, ctx.groups, ctx.scale,
                                                       ctx.backend)
    return dq, dk, dv, None, None, None, None


group_attention_fwd_call = register_autograd("group_attention_fwd", _group_fwd, _backward, _setup_context)


# ---------------------------------------------------------------- permutations


def _check_generator(op: str, generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != device.type:
        raise ValueError(f"{op}: generator is on {generator.device} but the permutation is drawn on {device}; "
                         "they must match")


def random_permutation(n: int, *, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
    """A uniformly random permutation of range(n) as an int64 tensor drawn on `device`.

    Unlike SReT's CPU ``torch.randperm`` + copy, the permutation is made on the device from
    random keys and a sort (argsort of fp64 uniforms: ties, which would only bias the order
    of equal keys, have probability ~n^2 / 2^54), so no host-to-device copy or
    synchronisation happens and the call can be captured in a CUDA graph (with a
    graph-safe generator).
    """
    op = "random_permutation"
    n = V.positive_int(op, "n", n)
    try:
        device = torch.device("cpu") if device is None else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{op}: device must name a torch device, got {device!r} ({exc})") from None
    _check_generator(op, generator, device)
    key_dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
    keys = torch.rand(n, device=device, dtype=key_dtype, generator=generator)
    # made here, so valid: group_attention skips its value check for it
    return V.trust(torch.argsort(keys), PERM_CHECK)


def _validate_perm(op: str, perm, N: int, device: Optional[torch.device]) -> None:
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{op}: perm must be a torch.Tensor or None, got {type(perm).__name__}")
    if perm.dtype != torch.int64:
        raise TypeError(f"{op}: perm must be an int64 tensor, got {perm.dtype}")
    if perm.dim() != 1 or (N >= 0 and perm.shape[0] != N):
        want = f"({N},) to match the {N} tokens" if N >= 0 else "(n,)"
        raise ValueError(f"{op}: perm must have shape {want}, got {tuple(perm.shape)}")
    if device is not None and perm.device != device:
        raise ValueError(f"{op}: perm is on {perm.device} but q is on {device}; they must match")
    if perm.requires_grad:
        raise ValueError(f"{op}: perm must not require grad")
    # CPU tensors are checked even with value checks off: the kernels index with perm
    V.check_values(op, PERM_CHECK, perm, _not_a_permutation,
                   lambda p: f"{op}: perm must be a permutation of range({p.shape[0]}) (every index exactly once)",
                   always_on_cpu=True)


def _not_a_permutation(perm: Tensor) -> Tensor:
    n = perm.shape[0]
    in_range = (perm >= 0) & (perm < n)
    seen = torch.zeros(n, dtype=torch.bool, device=perm.device)
    seen.index_fill_(0, perm.clamp(0, max(n - 1, 0)), True)
    return (in_range.all() & seen.all()).logical_not()


def inverse_permutation(perm: Tensor) -> Tensor:
    """inv with inv[perm[i]] = i, computed on perm's device by one scatter (no sort)."""
    op = "inverse_permutation"
    _validate_perm(op, perm, -1, None)
    inv = torch.empty_like(perm)
    inv.scatter_(0, perm, torch.arange(perm.shape[0], device=perm.device, dtype=perm.dtype))
    return V.trust(inv, PERM_CHECK) if V.is_trusted(perm, PERM_CHECK) else inv


# ---------------------------------------------------------------- public


def _context(q: Tensor, v: Tensor, groups: int, perm: Optional[Tensor]) -> dict:
    B, heads, N, d = q.shape
    return dict(device=q.device, dtype=q.dtype, d=d, dv=v.shape[-1], B=B, heads=heads, N=N,
                groups=groups, group_size=N // groups, permuted=perm is not None)


def _validate(q, k, v, groups, perm, scale):
    V.attention_inputs(OP, q, k, v, "B, heads, N, d")
    groups = V.positive_int(OP, "groups", groups)
    N = q.shape[2]
    if N % groups:
        raise ValueError(f"{OP}: groups must divide the number of tokens N={N}, got groups={groups}")
    if perm is not None:
        _validate_perm(OP, perm, N, q.device)
        if groups == 1:
            perm = None  # full attention is permutation-equivariant
    return groups, perm, V.scale_arg(OP, scale, q.shape[-1])


def group_attention(q: Tensor, k: Tensor, v: Tensor, groups: int, *, perm: Optional[Tensor] = None,
                    scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Group attention of SReT (Sliced Recursive Transformer), optionally over permuted tokens.

    q, k: (B, heads, N, d); v: (B, heads, N, dv); any strides. With x_p = x[..., perm, :]
    (perm an int64 permutation of range(N) on q's device, or None for the identity), the
    tokens are split into `groups` contiguous chunks of N / groups; inside each chunk
    ``softmax(scale * q k^T) v`` is taken; the result is returned in the original token
    order. scale defaults to d ** -0.5. With groups=1 the result does not depend on perm
    (full attention is permutation-equivariant), so perm is validated and then not used.
    An empty batch or token set gives an empty result (and empty gradients).

    perm is validated (length, dtype, device, and being a permutation: see
    vitattn.set_value_checks; permutations from vitattn.random_permutation are known valid).
    backend: "auto", "triton" or "torch". Under autocast the op runs in the autocast dtype
    (fp32 accumulation inside). Returns (B, heads, N, dv) in q's dtype.
    """
    q, k, v = autocast_inputs(q, k, v)
    groups, perm, scale = _validate(q, k, v, groups, perm, scale)
    if _onnx_exporting():  # the ONNX exporter cannot lower the custom op: standard ops instead
        return onnx_impl.group_attention(q, k, v, perm, groups, scale)
    name = dispatcher.choose(backend, _context(q, v, groups, perm), OP)
    return group_attention_fwd_call(q, k, v, perm, groups, scale, name)[0]


def explain(q: Tensor, k: Tensor, v: Tensor, groups: int, *, perm: Optional[Tensor] = None,
            scale: Optional[float] = None, backend: str = "auto"):
    """Which backends can run ``group_attention(q, k, v, groups, ...)`` here, and why (not)."""
    q, k, v = autocast_inputs(q, k, v)
    groups, perm, _ = _validate(q, k, v, groups, perm, scale)
    return dispatcher.explain(_context(q, v, groups, perm), OP)
