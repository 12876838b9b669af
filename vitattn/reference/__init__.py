"""Dense, readable PyTorch references: the ground truth every backend is tested against.

Each lives with its op (vitattn/ops/<op>/reference.py); they materialise the N x N
(n x m, L x L) intermediates exactly as the official code does.
"""

from ..ops.depthwise_conv.reference import depthwise_conv2d_nhwc  # noqa: F401
from ..ops.dynamixer.reference import dynamixer  # noqa: F401
from ..ops.group_attention.reference import group_attention  # noqa: F401
from ..ops.masa.reference import masa  # noqa: F401
from ..ops.sinkhorn.reference import ot_aggregate, ot_attention, sinkhorn  # noqa: F401
