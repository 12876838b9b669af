"""Sinkhorn optimal-transport aggregation (OTKE / SeTformer): public functions, validation,
and the ``vitattn::sinkhorn_*`` custom ops that run the chosen backend.

* :func:`sinkhorn` - batched log-domain Sinkhorn plan of a scores tensor.
* :func:`ot_aggregate` - OTKE's OTKernel: tokens aggregated onto learned references.
* :func:`ot_attention` - tokens -> references -> tokens with the same plan (SeTformer's mixer).
* :func:`gaussian_filter_1d` / :func:`gaussian_filter_2d` - OTKE's Gaussian position filters.

Every backend implements the same fixed-count loop (zero potentials; row update then
column update, ``iters`` times) and its exact unrolled gradient (see backends.py).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _validate as V
from ..._dtypes import acc_dtype, autocast_inputs
from .._library import LIB, op_caller, register_autograd
from .._onnx import exporting as _onnx_exporting
from . import onnx_impl
from .backends import dispatcher

OP = "sinkhorn"

# ---------------------------------------------------------------- custom ops: sinkhorn

LIB.define("sinkhorn_fwd(Tensor S, Tensor la, Tensor lb, float eps, int iters, str backend) -> (Tensor, Tensor)")
LIB.define("sinkhorn_bwd(Tensor dP, Tensor S, Tensor la, Tensor lb, Tensor G, float eps, str backend)"
           " -> (Tensor, Tensor, Tensor)")


def _sk_shapes(S: Tensor, iters: int):
    Z, n, m = S.shape
    return S.new_empty((Z, n, m)), S.new_empty((Z, iters, m), dtype=acc_dtype(S.dtype))


def _sk_fwd(S, la, lb, eps, iters, backend):
    if S.shape[0] == 0:  # an empty batch
        return _sk_shapes(S, iters)
    return tuple(dispatcher.impl(backend).sk_fwd(S, la, lb, eps, iters))


def _sk_bwd(dP, S, la, lb, G, eps, backend):
    if S.shape[0] == 0:
        return torch.zeros_like(S), torch.zeros_like(la), torch.zeros_like(lb)
    dS, dla, dlb = dispatcher.impl(backend).sk_bwd(dP, S, la, lb, G, eps)
    return dS, dla.to(la.dtype), dlb.to(lb.dtype)


LIB.impl("sinkhorn_fwd", _sk_fwd, "CompositeExplicitAutograd")
LIB.impl("sinkhorn_bwd", _sk_bwd, "CompositeExplicitAutograd")
sinkhorn_bwd_call = op_caller("sinkhorn_bwd", _sk_bwd)


@torch.library.register_fake("vitattn::sinkhorn_fwd", lib=LIB)
def _(S, la, lb, eps, iters, backend):
    return _sk_shapes(S, iters)


@torch.library.register_fake("vitattn::sinkhorn_bwd", lib=LIB)
def _(dP, S, la, lb, G, eps, backend):
    Z, n, m = S.shape
    return S.new_empty((Z, n, m)), la.new_empty((Z, n)), lb.new_empty((Z, m))


def _sk_setup(ctx, inputs, output):
    S, la, lb, eps, iters, backend = inputs
    ctx.save_for_backward(S, la, lb, output[1])
    ctx.eps, ctx.backend = eps, backend


def _sk_backward(ctx, dP, _dG):
    S, la, lb, G = ctx.saved_tensors
    dS, dla, dlb = sinkhorn_bwd_call(dP.contiguous(), S, la, lb, G, ctx.eps, ctx.backend)
    return dS, dla, dlb, None, None, None


sinkhorn_fwd_call = register_autograd("sinkhorn_fwd", _sk_fwd, _sk_backward, _sk_setup)


# ---------------------------------------------------------------- custom ops: ot_aggregate / ot_attention

LIB.define("sinkhorn_ot_fwd(Tensor x, Tensor ref, Tensor v, Tensor? pos_filter, float eps, int iters, "
           "bool attention, str backend) -> (Tensor, Tensor, Tensor)")
LIB.define("sinkhorn_ot_bwd(Tensor dout, Tensor x, Tensor ref, Tensor v, Tensor? pos_filter, Tensor zeta, "
           "Tensor G, float eps, bool attention, str backend) -> (Tensor, Tensor, Tensor)")


def _ot_shapes(x: Tensor, ref: Tensor, v: Tensor, iters: int, attention: bool):
    B, heads, n, _ = x.shape
    m, dv = ref.shape[1], v.shape[-1]
    acc = acc_dtype(x.dtype)
    out = x.new_empty((B, heads, n if attention else m, dv))
    zeta = x.new_empty((B, heads, m, dv), dtype=acc) if attention else x.new_empty((0,), dtype=acc)
    return out, zeta, x.new_empty((B, heads, iters, m), dtype=acc)


def _ot_fwd(x, ref, v, pos_filter, eps, iters, attention, backend):
    if x.shape[0] * x.shape[1] == 0 or v.shape[-1] == 0:  # an empty batch or value width
        return tuple(t.zero_() for t in _ot_shapes(x, ref, v, iters, attention))
    return tuple(dispatcher.impl(backend).ot_fwd(x, ref, v, pos_filter, eps, iters, attention))


def _ot_bwd(dout, x, ref, v, pos_filter, zeta, G, eps, attention, backend):
    if x.shape[0] * x.shape[1] == 0 or v.shape[-1] == 0:
        return torch.zeros_like(x), torch.zeros_like(ref), torch.zeros_like(v)
    return tuple(dispatcher.impl(backend).ot_bwd(dout, x, ref, v, pos_filter, zeta, G, eps, attention))


LIB.impl("sinkhorn_ot_fwd", _ot_fwd, "CompositeExplicitAutograd")
LIB.impl("sinkhorn_ot_bwd", _ot_bwd, "CompositeExplicitAutograd")
sinkhorn_ot_bwd_call = op_caller("sinkhorn_ot_bwd", _ot_bwd)


@torch.library.register_fake("vitattn::sinkhorn_ot_fwd", lib=LIB)
def _(x, ref, v, pos_filter, eps, iters, attention, backend):
    return _ot_shapes(x, ref, v, iters, attention)


@torch.library.register_fake("vitattn::sinkhorn_ot_bwd", lib=LIB)
def _(dout, x, ref, v, pos_filter, zeta, G, eps, attention, backend):
    return x.new_empty(x.shape), ref.new_empty(ref.shape), v.new_empty(v.shape)


def _ot_setup(ctx, inputs, output):
    x, ref, v, pos_filter, eps, iters, attention, backend = inputs
    _, zeta, G = output
    ctx.save_for_backward(x, ref, v, pos_filter, zeta, G)
    ctx.eps, ctx.attention, ctx.backend = eps, attention, backend


def _ot_backward(ctx, dout, _dzeta, _dG):
    x, ref, v, pos_filter, zeta, G = ctx.saved_tensors
    dx, dref, dv = sinkhorn_ot_bwd_call(dout.contiguous(), x, ref, v, pos_filter, zeta, G, ctx.eps,
                                                     ctx.attention, ctx.backend)
    return dx, dref, dv, None, None, None, None, None


sinkhorn_ot_fwd_call = register_autograd("sinkhorn_ot_fwd", _ot_fwd, _ot_backward, _ot_setup)


# ---------------------------------------------------------------- validation


def _eps_iters(op: str, eps, iters) -> Tuple[float, int]:
    return V.positive_float(op, "eps", eps), V.positive_int(op, "iters", iters, 1)


def _bad_mass(t: Tensor) -> Tensor:
    return torch.isfinite(t).logical_not() | (t <= 0)


def _marginal(op: str, name: str, t, batch: Tuple[int, ...], size: int, ref: Tensor) -> Tensor:
    """Validate a marginal and return its log as a (Z, size) view in the accumulation dtype."""
    acc = acc_dtype(ref.dtype)
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
    V.check_values(op, f"{name} holds finite positive masses", t, _bad_mass,
                   lambda t: f"{op}: {name} must hold finite positive masses, got min {float(t.min())}")
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
    return pos_filter.to(acc_dtype(x.dtype))


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
    # an empty batch or head set gives an empty result; the transport problem itself needs
    # tokens (row mass m/n), references and features
    if n == 0 or d == 0:
        raise ValueError(f"{op}: x must have at least one token and one feature (n, d >= 1); an empty "
                         f"token or feature dim has no transport plan, got shape {tuple(x.shape)}")
    if ref.shape[1] == 0:
        raise ValueError(f"{op}: ref must have at least one reference (m >= 1), got shape {tuple(ref.shape)}")
    eps, iters = _eps_iters(op, eps, iters)
    filt = _check_filter(op, pos_filter, n, ref.shape[1], x)
    return eps, iters, filt


def _ot_context(kind: str, x: Tensor, ref: Tensor, v: Tensor) -> dict:
    return dict(kind=kind, device=x.device, dtype=x.dtype, n=x.shape[2], m=ref.shape[1], d=x.shape[3],
                dv=v.shape[3])


def _sk_context(scores: Tensor) -> dict:
    return dict(kind="sinkhorn", device=scores.device, dtype=scores.dtype, n=scores.shape[-2],
                m=scores.shape[-1], d=1, dv=1)


def _validate_sk(scores, eps, iters):
    V.tensor(OP, "scores", scores, min_ndim=2)
    V.floating(OP, "scores", scores)
    eps, iters = _eps_iters(OP, eps, iters)
    if scores.shape[-1] == 0 or scores.shape[-2] == 0:
        raise ValueError(f"{OP}: scores must have n, m >= 1 (the last two dims), got shape {tuple(scores.shape)}")
    return eps, iters


# ---------------------------------------------------------------- public ops


def sinkhorn(scores: Tensor, *, eps: float = 0.1, iters: int = 10, a: Optional[Tensor] = None,
             b: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Batched log-domain Sinkhorn: the entropic transport plan of (..., n, m) scores.

    Larger scores attract more mass. a (..., n) and b (..., m) are the row and column
    marginals (positive, broadcastable to the scores' batch shape; default uniform 1/n
    and 1/m; tensors that require grad get a gradient). From zero potentials, ``iters``
    times: ``f = log a - LSE_j(S/eps + g)`` then ``g = log b - LSE_i(S/eps + f)``;
    returns ``exp(S/eps + f + g)`` in the scores' dtype, whose columns sum to b.
    The backward is the exact gradient of the unrolled iterations. An empty batch gives an
    empty plan.

    backend: "auto", "triton" or "torch".
    """
    (scores,) = autocast_inputs(scores)
    eps, iters = _validate_sk(scores, eps, iters)
    *batch, n, m = scores.shape
    batch = tuple(batch)
    la = _marginal(OP, "a", a, batch, n, scores)
    lb = _marginal(OP, "b", b, batch, m, scores)
    if _onnx_exporting():  # the ONNX exporter cannot lower the custom op: standard ops instead
        return onnx_impl.sinkhorn(scores.reshape(-1, n, m), la, lb, eps, iters).reshape(scores.shape)
    name = dispatcher.choose(backend, _sk_context(scores), OP)
    P = sinkhorn_fwd_call(scores.reshape(-1, n, m), la, lb, eps, iters, name)[0]
    return P.reshape(scores.shape)


def _ot(op: str, attention: bool, x, ref, v, eps, iters, pos_filter, backend) -> Tensor:
    x, ref, v = autocast_inputs(x, ref, v)
    eps, iters, filt = _validate_ot(op, x, ref, v, pos_filter, eps, iters)
    v = x if v is None else v
    if _onnx_exporting():  # the ONNX exporter cannot lower the custom op: standard ops instead
        return onnx_impl.ot(x, ref, v, filt, eps, iters, attention)
    name = dispatcher.choose(backend, _ot_context(op, x, ref, v), op)
    return sinkhorn_ot_fwd_call(x, ref, v, filt, eps, iters, attention, name)[0]


def ot_aggregate(x: Tensor, ref: Tensor, v: Optional[Tensor] = None, *, eps: float = 0.1, iters: int = 10,
                 pos_filter: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """OTKE aggregation of tokens onto references (OTKernel, log domain).

    x (B, heads, n, d) tokens; ref (heads, m, d) learned references; v (B, heads, n, dv)
    or None (then v = x); pos_filter (n, m) constant or None. S = x . ref^T, multiplied by
    the filter; Sinkhorn with row mass m/n and column mass 1; T = filter * plan;
    returns out_j = sum_i T_ij v_i as (B, heads, m, dv) in x's dtype. An empty batch or
    head set gives an empty result.
    """
    return _ot("ot_aggregate", False, x, ref, v, eps, iters, pos_filter, backend)


def ot_attention(x: Tensor, ref: Tensor, v: Optional[Tensor] = None, *, eps: float = 0.1, iters: int = 10,
                 pos_filter: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """SeTformer-style token mixer: tokens -> references -> tokens with one OTKE plan T.

    Same arguments as :func:`ot_aggregate`; returns ``(n/m) T (T^T v)`` as (B, heads, n, dv)
    without forming an n x n matrix.
    """
    return _ot("ot_attention", True, x, ref, v, eps, iters, pos_filter, backend)


def explain_sinkhorn(scores: Tensor, *, eps: float = 0.1, iters: int = 10, a: Optional[Tensor] = None,
                     b: Optional[Tensor] = None, backend: str = "auto"):
    """Which backends can run ``sinkhorn(scores, ...)`` here, and why (not)."""
    (scores,) = autocast_inputs(scores)
    eps, iters = _validate_sk(scores, eps, iters)
    *batch, n, m = scores.shape
    _marginal(OP, "a", a, tuple(batch), n, scores)
    _marginal(OP, "b", b, tuple(batch), m, scores)
    return dispatcher.explain(_sk_context(scores), OP)


def _explain_ot(op: str):
    def explain(x: Tensor, ref: Tensor, v: Optional[Tensor] = None, *, eps: float = 0.1, iters: int = 10,
                pos_filter: Optional[Tensor] = None, backend: str = "auto"):
        x, ref, v = autocast_inputs(x, ref, v)
        _validate_ot(op, x, ref, v, pos_filter, eps, iters)
        return dispatcher.explain(_ot_context(op, x, ref, x if v is None else v), op)

    explain.__doc__ = f"Which backends can run ``{op}(x, ref, v, ...)`` here, and why (not)."
    return explain


explain_ot_aggregate = _explain_ot("ot_aggregate")
explain_ot_attention = _explain_ot("ot_attention")


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
