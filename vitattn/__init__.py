"""vitattn: fused GPU kernels for the attention variants of vision backbones."""

__version__ = "0.1.0"

from ._dispatch import BackendUnavailableError  # noqa: F401
from ._validate import set_value_checks  # noqa: F401
from .masa import masa  # noqa: F401
from .sinkhorn import gaussian_filter_1d, gaussian_filter_2d, ot_aggregate, ot_attention, sinkhorn  # noqa: F401
from .group_attention import group_attention, inverse_permutation, random_permutation  # noqa: F401
from .dynamixer import dynamixer  # noqa: F401
from . import _extension  # noqa: F401  (registers the compiled "cpu"/"cuda" backends when built)
from . import reference  # noqa: F401


def explain(op: str, *args, **kwargs):
    """For op ("masa", "sinkhorn", "group_attention", "dynamixer"), the backends in the order
    "auto" tries them, each with None (it can run these arguments) or the reason it cannot."""
    import importlib

    try:
        mod = importlib.import_module(f"{__name__}.{op}")
    except ModuleNotFoundError:
        raise ValueError(f"explain: unknown op {op!r}") from None
    if not hasattr(mod, "explain"):
        raise ValueError(f"explain: unknown op {op!r}")
    return mod.explain(*args, **kwargs)
