"""nn.Module wrappers of the vitattn ops (they call only the public ops), the Nyström kernel
embedding SeTformer uses, and the models' linear layer (F.linear with the GEMM chosen per
machine: vitattn/nn/_linear.py)."""

from .dynamixer import DynaMixerBlock, DynaMixerOp  # noqa: F401
from .mlp import Mlp  # noqa: F401
from ._linear import Linear, cpu_linear_choice, linear  # noqa: F401
from .nystrom import NystromEmbedding, inverse_sqrt_psd, spherical_kmeans  # noqa: F401
