"""Dense, readable PyTorch references: the ground truth every backend is tested against."""

from .dynamixer import dynamixer  # noqa: F401
from .group_attention import group_attention  # noqa: F401
from .masa import masa  # noqa: F401
from .sinkhorn import ot_aggregate, ot_attention, sinkhorn  # noqa: F401
