"""Sinkhorn optimal-transport aggregation (OTKE / SeTformer): public ops, validation,
dispatch and the torch.library custom ops.

* :func:`sinkhorn` - batched log-domain Sinkhorn plan of a scores tensor.
* :func:`ot_aggregate` - OTKE's OTKernel: tokens aggregated onto learned references.
* :func:`ot_attention` - tokens -> references -> tokens with the same plan (SeTformer's mixer).
* :func:`gaussian_filter_1d` / :func:`gaussian_filter_2d` - OTKE's Gaussian position filters.

Every backend implements the same fixed-count loop (zero potentials; row update then
column update, ``iters`` times) and its exact unrolled gradient, keeping only the
per-iteration column potentials (O(iters * m) per problem) and recomputing the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import _validate as V
from ._dispatch import BackendUnavailableError, Dispatcher, torch_reason, triton_reason
from .torch_backend import sinkhorn as _tb

OP = "sinkhorn"
BACKENDS = ("auto", "triton", "torch")
dispatcher = Dispatcher(OP, BACKENDS)

# The Triton kernels keep a row of the plan (all m columns) and the references on chip.
MAX_M = 256
MAX_FEATURE = 256


# ---------------------------------------------------------------- backends
#
# A backend provides
#   sk_fwd(S (Z, n, m), la (Z, n), lb (Z, m), eps, iters) -> (plan (Z, n, m), G (Z, iters, m))
#   sk_bwd(dP, S, la, lb, G, eps) -> (dS, dla, dlb)
#   ot_fwd(x, ref, v, filt, eps, iters, attention) -> (out, zeta, G)
#   ot_bwd(dout, x, ref, v, filt, zeta, G, eps, attention) -> (dx, dref, dv)
# with la/lb the log-marginals in the accumulation dtype (fp32, fp64 for fp64 inputs),
# G the column potentials after every iteration and zeta the aggregate T^T v that
# ot_attention reuses in its backward.


@dataclass
class SinkhornImpl:
    sk_fwd: Callable
    sk_bwd: Callable
    ot_fwd: Callable
    ot_bwd: Callable


# plugs a backend in: register_impl(name, impl, check, rank) (also used by vitattn._extension)
register_impl = dispatcher.register_impl


register_impl("torch", SinkhornImpl(_tb.sinkhorn_fwd, _tb.sinkhorn_bwd, _tb.ot_fwd, _tb.ot_bwd),
              torch_reason, rank=100)


def _register_triton() -> None:
    from . import _triton

    if not _triton.available():
        return
    from .kernels import sinkhorn as _tk

    def check(ctx, auto):
        why = triton_reason(ctx, auto)
        if why is None and ctx["m"] > MAX_M:
            why = f"up to {MAX_M} references (columns) are supported, got m={ctx['m']}"
        if why is None and max(ctx["d"], ctx["dv"]) > MAX_FEATURE:
            why = f"feature dims up to {MAX_FEATURE} are supported, got d={ctx['d']}, dv={ctx['dv']}"
        if why is None and ctx["device"].type == "cuda":
            tile = _pow2(ctx["m"]) * max(_pow2(ctx["d"]), _pow2(ctx["dv"]))
            budget = _tile_budget(ctx["device"])
            if tile > budget:
                why = (f"the references x features tile ({_pow2(ctx['m'])} x {max(_pow2(ctx['d']), _pow2(ctx['dv']))}, "
                       f"padded to powers of 2) needs more shared memory than this GPU offers (at most {budget} "
                       f"elements here); use fewer references or a smaller head dim")
        return why

    register_impl("triton", SinkhornImpl(_tk.sinkhorn_fwd, _tk.sinkhorn_bwd, _tk.ot_fwd, _tk.ot_bwd),
                  check, rank=20)


def _pow2(n: int) -> int:
    return max(16, 1 << (int(n) - 1).bit_length())


def _tile_budget(device) -> int:
    """Largest padded m x max(d, dv) tile the kernels fit in this GPU's shared memory.

    Measured by compiling the backward kernel (the larger of the two) for sm_90 without a
    GPU: padded tiles of 64 x 64 need up to 161 KiB, 256 x 32 178 KiB, 128 x 64 184 KiB,
    64 x 128 208 KiB, 256 x 128 344 KiB (Hopper allows 227 KiB). The 4096 bound for
    163 KiB parts (A100) assumes sm_80 layouts close to sm_90's, and 2048 below that is a
    guess: neither was measured.
    """
    try:
        smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    except Exception:
        smem = 0
    if smem >= 227 * 1024:
        return 8192
    if smem >= 163 * 1024:
        return 4096
    return 2048


_register_triton()


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- custom ops: sinkhorn


@torch.library.custom_op("vitattn::sinkhorn_fwd", mutates_args=())
def _sk_fwd_op(S: Tensor, la: Tensor, lb: Tensor, eps: float, iters: int, backend: str) -> Tuple[Tensor, Tensor]:
    return dispatcher.impl(backend).sk_fwd(S, la, lb, eps, iters)


@_sk_fwd_op.register_fake
def _(S, la, lb, eps, iters, backend):
    Z, n, m = S.shape
    return S.new_empty((Z, n, m)), S.new_empty((Z, iters, m), dtype=_acc_dtype(S.dtype))


@torch.library.custom_op("vitattn::sinkhorn_bwd", mutates_args=())
def _sk_bwd_op(dP: Tensor, S: Tensor, la: Tensor, lb: Tensor, G: Tensor, eps: float,
               backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    dS, dla, dlb = dispatcher.impl(backend).sk_bwd(dP, S, la, lb, G, eps)
    return dS, dla.to(la.dtype), dlb.to(lb.dtype)


@_sk_bwd_op.register_fake
def _(dP, S, la, lb, G, eps, backend):
    Z, n, m = S.shape
    return S.new_empty((Z, n, m)), la.new_empty((Z, n)), lb.new_empty((Z, m))


def _sk_setup(ctx, inputs, output):
    S, la, lb, eps, iters, backend = inputs
    ctx.save_for_backward(S, la, lb, output[1])
    ctx.eps, ctx.backend = eps, backend


def _sk_backward(ctx, dP, _dG):
    S, la, lb, G = ctx.saved_tensors
    dS, dla, dlb = torch.ops.vitattn.sinkhorn_bwd(dP.contiguous(), S, la, lb, G, ctx.eps, ctx.backend)
    return dS, dla, dlb, None, None, None


torch.library.register_autograd("vitattn::sinkhorn_fwd", _sk_backward, setup_context=_sk_setup)


# ---------------------------------------------------------------- custom ops: ot_aggregate / ot_attention


@torch.library.custom_op("vitattn::sinkhorn_ot_fwd", mutates_args=())
def _ot_fwd_op(x: Tensor, ref: Tensor, v: Tensor, pos_filter: Optional[Tensor], eps: float, iters: int,
               attention: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return dispatcher.impl(backend).ot_fwd(x, ref, v, pos_filter, eps, iters, attention)


@_ot_fwd_op.register_fake
def _(x, ref, v, pos_filter, eps, iters, attention, backend):
    B, heads, n, _ = x.shape
    m, dv = ref.shape[1], v.shape[-1]
    acc = _acc_dtype(x.dtype)
    out = x.new_empty((B, heads, n if attention else m, dv))
    zeta = x.new_empty((B, heads, m, dv), dtype=acc) if attention else x.new_empty((0,), dtype=acc)
    return out, zeta, x.new_empty((B, heads, iters, m), dtype=acc)


@torch.library.custom_op("vitattn::sinkhorn_ot_bwd", mutates_args=())
def _ot_bwd_op(dout: Tensor, x: Tensor, ref: Tensor, v: Tensor, pos_filter: Optional[Tensor], zeta: Tensor,
               G: Tensor, eps: float, attention: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return dispatcher.impl(backend).ot_bwd(dout, x, ref, v, pos_filter, zeta, G, eps, attention)


@_ot_bwd_op.register_fake
def _(dout, x, ref, v, pos_filter, zeta, G, eps, attention, backend):
    return x.new_empty(x.shape), ref.new_empty(ref.shape), v.new_empty(v.shape)


def _ot_setup(ctx, inputs, output):
    x, ref, v, pos_filter, eps, iters, attention, backend = inputs
    _, zeta, G = output
    ctx.save_for_backward(x, ref, v, pos_filter, zeta, G)
    ctx.eps, ctx.attention, ctx.backend = eps, attention, backend


def _ot_backward(ctx, dout, _dzeta, _dG):
    x, ref, v, pos_filter, zeta, G = ctx.saved_tensors
    dx, dref, dv = torch.ops.vitattn.sinkhorn_ot_bwd(dout.contiguous(), x, ref, v, pos_filter, zeta, G, ctx.eps,
                                            ctx.attention, ctx.backend)
    return dx, dref, dv, None, None, None, None, None


torch.library.register_autograd("vitattn::sinkhorn_ot_fwd", _ot_backward, setup_context=_ot_setup)


# ---------------------------------------------------------------- validation helpers


def _autocast(*tensors: Optional[Tensor]):
    """Under autocast, run in the autocast dtype (custom ops are not cast automatically)."""
    dev = tensors[0].device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        return tuple(t.to(low) if t is not None else None for t in tensors)
    return tensors


def _eps_iters(op: str, eps, iters) -> Tuple[float, int]:
    return V.positive_float(op, "eps", eps), V.positive_int(op, "iters", iters, 1)


def _marginal(op: str, name: str, t, batch: Tuple[int, ...], size: int, ref: Tensor) -> Tensor:
    """Validate a marginal and return its log as a (Z, size) view in the accumulation dtype."""
    acc = _acc_dtype(ref.dtype)
    Z = math.prod(batch)
    if t is None:
        return torch.full((1, 1), -math.log(size), device=ref.device, dtype=acc).expand(Z, size)
    V.tensor(op, name, t, min_ndim=1)
    V.floating(op, name, t)
    V.same_device(op, "scores", ref, **{name: t})
    want = batch + (size,)
    try:
        ok = torch.broadcast_shapes(tuple(t.shape), want) == torch.Size(want)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{op}: {name} must be broadcastable to shape {want} (the scores' batch dims and "
                         f"{'n' if name == 'a' else 'm'}), got shape {tuple(t.shape)}")
    if V.value_checks_enabled():
        with torch.no_grad():
            if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
                raise ValueError(f"{op}: {name} must hold finite positive masses, got min "
                                 f"{float(t.min())}")
    return torch.log(t.to(acc)).expand(want).reshape(Z, size)


def _check_filter(op: str, pos_filter, n: int, m: int, x: Tensor) -> Optional[Tensor]:
    if pos_filter is None:
        return None
    V.tensor(op, "pos_filter", pos_filter, 2)
    V.floating(op, "pos_filter", pos_filter)
    V.same_device(op, "x", x, pos_filter=pos_filter)
    V.shape_eq(op, "pos_filter", pos_filter.shape, (n, m), "tokens x references")
    if pos_filter.requires_grad:
        raise ValueError(f"{op}: pos_filter must be a constant (it requires grad; gradients with respect "
                         f"to pos_filter are not computed), pass pos_filter.detach()")
    # kept in the accumulation dtype: the filter is exact data, not an activation
    return pos_filter.to(_acc_dtype(x.dtype))


def _validate_ot(op: str, x, ref, v, pos_filter, eps, iters):
    V.tensor(op, "x", x, 4)
    V.tensor(op, "ref", ref, 3)
    V.floating(op, "x", x)
    # V.same_dtype/same_device name their reference argument "ref", hence the spelled-out ref check
    if ref.dtype != x.dtype:
        raise TypeError(f"{op}: ref has dtype {ref.dtype} but x has {x.dtype}; they must match")
    if ref.device != x.device:
        raise ValueError(f"{op}: ref is on {ref.device} but x is on {x.device}; they must match")
    if v is not None:
        V.tensor(op, "v", v, 4)
        V.same_dtype(op, "x", x, v=v)
        V.same_device(op, "x", x, v=v)
    B, heads, n, d = x.shape
    if ref.shape[0] != heads or ref.shape[2] != d:
        raise ValueError(f"{op}: ref must have shape ({heads}, m, {d}) (heads and feature dim of x), "
                         f"got {tuple(ref.shape)}")
    if v is not None and tuple(v.shape[:3]) != (B, heads, n):
        raise ValueError(f"{op}: v must have shape {(B, heads, n, 'dv')} to match x, got {tuple(v.shape)}")
    if min(x.shape) == 0 or ref.shape[1] == 0 or (v is not None and v.shape[-1] == 0):
        vs = "None" if v is None else tuple(v.shape)
        raise ValueError(f"{op}: empty inputs are not supported, got x {tuple(x.shape)}, ref {tuple(ref.shape)}, "
                         f"v {vs}")
    eps, iters = _eps_iters(op, eps, iters)
    filt = _check_filter(op, pos_filter, n, ref.shape[1], x)
    return eps, iters, filt


def _choose(op: str, backend, ctx: dict) -> str:
    """dispatcher.choose, with errors naming the public function called (one dispatcher serves three)."""
    try:
        return dispatcher.choose(backend, ctx)
    except (TypeError, ValueError, BackendUnavailableError) as exc:
        msg = str(exc)
        if op != OP and msg.startswith(OP + ":"):
            raise type(exc)(op + msg[len(OP):]) from None
        raise


def _ot_context(x: Tensor, ref: Tensor, v: Tensor) -> dict:
    return dict(device=x.device, dtype=x.dtype, n=x.shape[2], m=ref.shape[1], d=x.shape[3], dv=v.shape[3])


# ---------------------------------------------------------------- public ops


def sinkhorn(scores: Tensor, *, eps: float = 0.1, iters: int = 10, a: Optional[Tensor] = None,
             b: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Batched log-domain Sinkhorn: the entropic transport plan of (..., n, m) scores.

    Larger scores attract more mass. a (..., n) and b (..., m) are the row and column
    marginals (positive, broadcastable to the scores' batch shape; default uniform 1/n
    and 1/m; tensors that require grad get a gradient). From zero potentials, ``iters``
    times: ``f = log a - LSE_j(S/eps + g)`` then ``g = log b - LSE_i(S/eps + f)``;
    returns ``exp(S/eps + f + g)`` in the scores' dtype, whose columns sum to b.
    The backward is the exact gradient of the unrolled iterations.

    backend: "auto", "triton" or "torch".
    """
    V.tensor(OP, "scores", scores, min_ndim=2)
    V.floating(OP, "scores", scores)
    eps, iters = _eps_iters(OP, eps, iters)
    if min(scores.shape) == 0:
        raise ValueError(f"{OP}: empty scores are not supported, got shape {tuple(scores.shape)}")
    (scores,) = _autocast(scores)
    *batch, n, m = scores.shape
    batch = tuple(batch)
    la = _marginal(OP, "a", a, batch, n, scores)
    lb = _marginal(OP, "b", b, batch, m, scores)
    S = scores.reshape(-1, n, m)
    ctx = dict(device=scores.device, dtype=scores.dtype, n=n, m=m, d=1, dv=1)
    name = _choose(OP, backend, ctx)
    P = torch.ops.vitattn.sinkhorn_fwd(S, la, lb, eps, iters, name)[0]
    return P.reshape(scores.shape)


def ot_aggregate(x: Tensor, ref: Tensor, v: Optional[Tensor] = None, *, eps: float = 0.1, iters: int = 10,
                 pos_filter: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """OTKE aggregation of tokens onto references (OTKernel, log domain).

    x (B, heads, n, d) tokens; ref (heads, m, d) learned references; v (B, heads, n, dv)
    or None (then v = x); pos_filter (n, m) constant or None. S = x . ref^T, multiplied by
    the filter; Sinkhorn with row mass m/n and column mass 1; T = filter * plan;
    returns out_j = sum_i T_ij v_i as (B, heads, m, dv) in x's dtype.
    """
    eps, iters, filt = _validate_ot("ot_aggregate", x, ref, v, pos_filter, eps, iters)
    x, ref, v = _autocast(x, ref, v)
    v = x if v is None else v
    filt = None if filt is None else filt.to(_acc_dtype(x.dtype))
    name = _choose("ot_aggregate", backend, _ot_context(x, ref, v))
    return torch.ops.vitattn.sinkhorn_ot_fwd(x, ref, v, filt, eps, iters, False, name)[0]


def ot_attention(x: Tensor, ref: Tensor, v: Optional[Tensor] = None, *, eps: float = 0.1, iters: int = 10,
                 pos_filter: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """SeTformer-style token mixer: tokens -> references -> tokens with one OTKE plan T.

    Same arguments as :func:`ot_aggregate`; returns ``(n/m) T (T^T v)`` as (B, heads, n, dv)
    without forming an n x n matrix.
    """
    eps, iters, filt = _validate_ot("ot_attention", x, ref, v, pos_filter, eps, iters)
    x, ref, v = _autocast(x, ref, v)
    v = x if v is None else v
    filt = None if filt is None else filt.to(_acc_dtype(x.dtype))
    name = _choose("ot_attention", backend, _ot_context(x, ref, v))
    return torch.ops.vitattn.sinkhorn_ot_fwd(x, ref, v, filt, eps, iters, True, name)[0]


def explain(x: Tensor, ref: Tensor, v: Optional[Tensor] = None):
    """[(backend, None or the reason it cannot run)] for an ot_* call, in the order "auto" tries them."""
    _validate_ot("ot_aggregate", x, ref, v, None, 0.1, 1)
    return dispatcher.explain(_ot_context(x, ref, x if v is None else v))


# ---------------------------------------------------------------- position filters


def _filter_args(op: str, sigma, **sizes) -> float:
    for name, val in sizes.items():
        V.positive_int(op, name, val, 1)
    return V.positive_float(op, "sigma", sigma)


def gaussian_filter_1d(n: int, m: int, *, sigma: float = 0.1, device=None, dtype=torch.float32) -> Tensor:
    """OTKE's 1-D Gaussian position filter, (n, m): exp(-((i/n - j/m) / sigma)^2), i, j from 0.

    With sigma = tau this is SeTformer's positional term.
    """
    sigma = _filter_args("gaussian_filter_1d", sigma, n=n, m=m)
    i = torch.arange(n, dtype=torch.float64) / n
    j = torch.arange(m, dtype=torch.float64) / m
    return torch.exp(-(((i[:, None] - j[None, :]) / sigma) ** 2)).to(device=device, dtype=dtype)


def gaussian_filter_2d(height: int, width: int, m: int, *, sigma: float = 0.1, device=None,
                       dtype=torch.float32) -> Tensor:
    """The filter OTKernel builds for an height x width input and an s x s grid of m = s*s
    references, as an (height*width, m) matrix (tokens and references row-major).

    Entry ((r, c), (p, q)) is exp(-((r/H - p/s)/sigma)^2) * exp(-((c/W - q/s)/sigma)^2)
    with r, c, p, q counted from 1, as in OTKE's 2-D branch.
    """
    sigma = _filter_args("gaussian_filter_2d", sigma, height=height, width=width, m=m)
    s = math.isqrt(m)
    if s * s != m:
        raise ValueError(f"gaussian_filter_2d: m must be a perfect square (an s x s grid of references), got {m}")
    q = torch.arange(1, s + 1, dtype=torch.float64) / s
    r = torch.arange(1, height + 1, dtype=torch.float64) / height
    c = torch.arange(1, width + 1, dtype=torch.float64) / width
    fr = torch.exp(-(((r[:, None] - q[None, :]) / sigma) ** 2))
    fc = torch.exp(-(((c[:, None] - q[None, :]) / sigma) ** 2))
    filt = torch.einsum("rp,cq->rcpq", fr, fc).reshape(height * width, m)
    return filt.to(device=device, dtype=dtype)
