"""nn.Module wrappers of the vitattn ops (they call only the public ops), and the Nyström kernel
embedding SeTformer uses."""

from .dynamixer import DynaMixerBlock, DynaMixerOp, Mlp  # noqa: F401
from .nystrom import NystromEmbedding, inverse_sqrt_psd, spherical_kmeans  # noqa: F401
