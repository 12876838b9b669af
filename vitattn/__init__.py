"""vitattn: fused kernels for the attention variants of spatial-prior vision backbones.

The public ops (each lives in vitattn/ops/<op>/):
  masa, sinkhorn, ot_aggregate, ot_attention, gaussian_filter_1d, gaussian_filter_2d,
  group_attention, random_permutation, inverse_permutation, dynamixer, depthwise_conv2d_nhwc.
Dense references: vitattn.reference.<op>. Which backend runs a call, and why:
vitattn.explain("<op>", *the op's arguments). Models: vitattn.models.
"""

__version__ = "0.1.0"

from ._dispatch import BackendUnavailableError, Explanation, Verdict  # noqa: F401
from ._validate import set_value_checks  # noqa: F401
from .ops.masa.op import masa  # noqa: F401
from .ops.sinkhorn.op import (  # noqa: F401
    gaussian_filter_1d, gaussian_filter_2d, ot_aggregate, ot_attention, sinkhorn)
from .ops.group_attention.op import group_attention, inverse_permutation, random_permutation  # noqa: F401
from .ops.dynamixer.op import dynamixer  # noqa: F401
from .ops.depthwise_conv.op import depthwise_conv2d_nhwc  # noqa: F401
from . import reference  # noqa: F401


def _ops():
    from .ops.depthwise_conv import op as dc
    from .ops.dynamixer import op as dm
    from .ops.group_attention import op as ga
    from .ops.masa import op as ma
    from .ops.sinkhorn import op as sk

    # op name -> (explain function, dispatcher)
    return {
        "masa": (ma.explain, ma.dispatcher),
        "sinkhorn": (sk.explain_sinkhorn, sk.dispatcher),
        "ot_aggregate": (sk.explain_ot_aggregate, sk.dispatcher),
        "ot_attention": (sk.explain_ot_attention, sk.dispatcher),
        "group_attention": (ga.explain, ga.dispatcher),
        "dynamixer": (dm.explain, dm.dispatcher),
        "depthwise_conv2d_nhwc": (dc.explain, dc.dispatcher),
    }


def _lookup(fn: str, op):
    ops = _ops()
    if not isinstance(op, str):
        raise TypeError(f"{fn}: op must be a string, got {type(op).__name__}")
    if op not in ops:
        raise ValueError(f"{fn}: unknown op {op!r}; op must be one of {tuple(ops)}")
    return ops[op]


def explain(op: str, *args, **kwargs) -> Explanation:
    """Which backends can run ``vitattn.<op>(*args, **kwargs)`` here, in the order "auto" tries
    them, each with the reason it can or cannot run; takes exactly the op's own arguments.

    The result prints as a table and iterates as (backend, can_run, reason) rows;
    ``.chosen`` is the backend "auto" picks.
    """
    return _lookup("explain", op)[0](*args, **kwargs)


def backends(op: str) -> tuple:
    """The names ``vitattn.<op>(..., backend=...)`` accepts ("auto" first), whether or not
    they can run here (see explain)."""
    return _lookup("backends", op)[1].names
