"""vitattn: fused GPU kernels for the attention variants of vision backbones."""

__version__ = "0.1.0"

from ._dispatch import BackendUnavailableError  # noqa: F401
from ._validate import set_value_checks  # noqa: F401
from .masa import masa  # noqa: F401
from . import reference  # noqa: F401
