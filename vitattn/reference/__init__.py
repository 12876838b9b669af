"""Dense, readable PyTorch references: the ground truth every backend is tested against."""

from .masa import masa  # noqa: F401
