"""nn.Module wrappers of the vitattn ops (they call only the public ops)."""

from .dynamixer import DynaMixerBlock, DynaMixerOp, Mlp  # noqa: F401
