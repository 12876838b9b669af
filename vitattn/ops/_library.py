"""The ``vitattn`` torch.library namespace every op registers its custom ops in.

Ops are registered with torch.library.Library (define, impl, register_fake,
register_autograd) rather than the torch.library.custom_op decorator: the decorator wraps
each kernel in torch._disable_dynamo, whose first call imports torch._dynamo, sympy and
some 800 modules (~1 s and ~100 MB on the first op call); this path has the same
torch.compile / torch.export behaviour without that cost.
"""

import torch

LIB = torch.library.Library("vitattn", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)
