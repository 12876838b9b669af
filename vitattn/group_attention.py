"""SReT group / permuted attention: public op, permutation helpers, validation, dispatch and
the torch.library custom op."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import _validate as V
from ._dispatch import Dispatcher, torch_reason, triton_head_dims_reason
from .torch_backend import group_attention as _tb

OP = "group_attention"
BACKENDS = ("auto", "triton", "torch")
dispatcher = Dispatcher(OP, BACKENDS)


# ---------------------------------------------------------------- backend implementations
#
# A backend provides, on (B, heads, N, .) tensors of any strides and perm (N,) int64 or None:
#   fwd(q, k, v, perm, groups, scale) -> (out contiguous, lse (B, heads, N) fp32/fp64)
#   bwd(dout, q, k, v, out, lse, perm, groups, scale) -> (dq, dk, dv)
# out, lse and the gradients are in the original token order.


@dataclass
class GroupImpl:
    fwd: Callable
    bwd: Callable


# plugs a backend in: register_impl(name, impl, check, rank) (also used by vitattn._extension)
register_impl = dispatcher.register_impl


register_impl("torch", GroupImpl(_tb.group_attention_fwd, _tb.group_attention_bwd), torch_reason, rank=100)


def _register_triton() -> None:
    from . import _triton

    if not _triton.available():
        return
    from .kernels import group_attention as _tk

    register_impl("triton", GroupImpl(_tk.group_attention_fwd, _tk.group_attention_bwd), triton_head_dims_reason, rank=20)


_register_triton()


# ---------------------------------------------------------------- custom ops


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("vitattn::group_attention_fwd", mutates_args=())
def _group_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, perm: Optional[Tensor], groups: int, scale: float, backend: str
) -> Tuple[Tensor, Tensor]:
    return dispatcher.impl(backend).fwd(q, k, v, perm, groups, scale)


@_group_fwd_op.register_fake
def _(q, k, v, perm, groups, scale, backend):
    B, heads, N, _ = q.shape
    return q.new_empty((B, heads, N, v.shape[-1])), q.new_empty((B, heads, N), dtype=_acc_dtype(q.dtype))


@torch.library.custom_op("vitattn::group_attention_bwd", mutates_args=())
def _group_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, perm: Optional[Tensor],
    groups: int, scale: float, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return dispatcher.impl(backend).bwd(dout, q, k, v, out, lse, perm, groups, scale)


@_group_bwd_op.register_fake
def _(dout, q, k, v, out, lse, perm, groups, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, perm, groups, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, perm)
    ctx.groups, ctx.scale, ctx.backend = groups, scale, backend


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, perm = ctx.saved_tensors
    dq, dk, dv = torch.ops.vitattn.group_attention_bwd(
        dout, q, k, v, out, lse, perm, ctx.groups, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("vitattn::group_attention_fwd", _backward, setup_context=_setup_context)


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
    return torch.argsort(keys)


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
    # Reading the values costs a synchronisation on the GPU: there it follows the value-check
    # switch (vitattn.set_value_checks / VITATTN_CHECK_VALUES); CPU tensors are always checked
    # in eager mode. Under torch.compile values are unknown and the check is skipped (the
    # kernels still never touch memory out of range).
    if torch.compiler.is_compiling():
        return
    if perm.device.type != "cpu" and not V.value_checks_enabled():
        return
    n = perm.shape[0]
    with torch.no_grad():
        in_range = (perm >= 0) & (perm < n)
        seen = torch.zeros(n, dtype=torch.bool, device=perm.device)
        seen.index_fill_(0, perm.clamp(0, max(n - 1, 0)), True)
        if not bool(in_range.all() & seen.all()):
            raise ValueError(f"{op}: perm must be a permutation of range({n}) (every index exactly once)")


def inverse_permutation(perm: Tensor) -> Tensor:
    """inv with inv[perm[i]] = i, computed on perm's device by one scatter (no sort)."""
    op = "inverse_permutation"
    _validate_perm(op, perm, -1, None)
    inv = torch.empty_like(perm)
    inv.scatter_(0, perm, torch.arange(perm.shape[0], device=perm.device, dtype=perm.dtype))
    return inv


# ---------------------------------------------------------------- public op


def _autocast(*tensors: Tensor):
    """Under autocast, run in the autocast dtype (custom ops are not cast automatically)."""
    dev = tensors[0].device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        return tuple(t.to(low) for t in tensors)
    return tensors


def _context(q: Tensor, v: Tensor, groups: int, perm: Optional[Tensor]) -> dict:
    B, heads, N, d = q.shape
    return dict(device=q.device, dtype=q.dtype, d=d, dv=v.shape[-1], B=B, heads=heads, N=N,
                groups=groups, group_size=N // groups, permuted=perm is not None)


def _validate(q, k, v, groups) -> int:
    V.tensor(OP, "q", q, 4)
    V.tensor(OP, "k", k, 4)
    V.tensor(OP, "v", v, 4)
    V.floating(OP, "q", q)
    V.same_dtype(OP, "q", q, k=k, v=v)
    V.same_device(OP, "q", q, k=k, v=v)
    V.shape_eq(OP, "k", k.shape, q.shape, "it must match q's (B, heads, N, d)")
    if tuple(v.shape[:3]) != tuple(q.shape[:3]):
        raise ValueError(f"{OP}: v must have shape {tuple(q.shape[:3]) + ('dv',)} to match q, got {tuple(v.shape)}")
    if min(q.shape) == 0 or v.shape[-1] == 0:
        raise ValueError(f"{OP}: empty inputs are not supported, got q {tuple(q.shape)} and v {tuple(v.shape)}")
    groups = V.positive_int(OP, "groups", groups)
    N = q.shape[2]
    if N % groups:
        raise ValueError(f"{OP}: groups must divide the number of tokens N={N}, got groups={groups}")
    return groups


def group_attention(q: Tensor, k: Tensor, v: Tensor, groups: int, *, perm: Optional[Tensor] = None,
                    scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Group attention of SReT (Sliced Recursive Transformer), optionally over permuted tokens.

    q, k: (B, heads, N, d); v: (B, heads, N, dv); any strides. With x_p = x[..., perm, :]
    (perm an int64 permutation of range(N) on q's device, or None for the identity), the
    tokens are split into `groups` contiguous chunks of N / groups; inside each chunk
    ``softmax(scale * q k^T) v`` is taken; the result is returned in the original token
    order. scale defaults to d ** -0.5. With groups=1 the result does not depend on perm
    (full attention is permutation-equivariant), so perm is validated and then not used.

    perm is validated (length, dtype, device; being a permutation is checked on CPU tensors
    always and on the GPU while value checks are on, see vitattn.set_value_checks).
    backend: "auto", "triton" or "torch". Under autocast the op runs in the autocast dtype
    (fp32 accumulation inside). Returns (B, heads, N, dv) in q's dtype.
    """
    groups = _validate(q, k, v, groups)
    if perm is not None:
        _validate_perm(OP, perm, q.shape[2], q.device)
        if groups == 1:
            perm = None
    scale = V.scale_arg(OP, scale, q.shape[-1])
    q, k, v = _autocast(q, k, v)
    name = dispatcher.choose(backend, _context(q, v, groups, perm))
    return torch.ops.vitattn.group_attention_fwd(q, k, v, perm, groups, scale, name)[0]


def explain(q: Tensor, k: Tensor, v: Tensor, groups: int, *, perm: Optional[Tensor] = None):
    """[(backend, None or the reason it cannot run)] in the order "auto" tries them."""
    groups = _validate(q, k, v, groups)
    return dispatcher.explain(_context(q, v, groups, perm))
