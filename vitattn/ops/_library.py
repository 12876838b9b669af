"""The ``vitattn`` torch.library namespace every op registers its custom ops in, and the
eager fast path that calls the same implementations without the dispatcher's Python layers.

Ops are registered with torch.library.Library (define, impl, register_fake,
register_autograd) rather than the torch.library.custom_op decorator: the decorator wraps
each kernel in torch._disable_dynamo, whose first call imports torch._dynamo, sympy and
some 800 modules (~1 s and ~100 MB on the first op call); this path has the same
torch.compile / torch.export behaviour without that cost.

Why a fast path: a call through ``torch.ops.vitattn.<op>`` with a Python implementation and
a Python autograd formula crosses from C++ to Python three times per forward and three per
backward (the Autograd kernel, the autograd.Function it builds, the
CompositeExplicitAutograd kernel): about 0.1 ms forward and 0.3 ms forward+backward on this
project's CPU, 5-15% of an attention call at the smallest model shapes (RMT stage 4, SReT
groups of 49 tokens). In plain eager mode -- no torch.compile or export trace, no dispatch
mode (FakeTensorMode, make_fx), no functorch transform, no JIT trace, no tensor subclass
other than nn.Parameter -- :func:`register_autograd` and :func:`op_caller` run the very same
Python implementation, setup_context and backward through one torch.autograd.Function (or
directly when no input needs a gradient); everywhere else they call the custom op.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

LIB = torch.library.Library("vitattn", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_eager(args: Sequence) -> bool:
    """True when a call with these arguments may skip the custom op (see the module docstring)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() != 0
            or torch._C._functorch.peek_interpreter_stack() is not None or torch.jit.is_tracing()):
        return False
    return all(type(a) in _PLAIN for a in args if isinstance(a, torch.Tensor))


def op_caller(name: str, impl: Callable) -> Callable:
    """A function with the custom op ``vitattn::<name>``'s arguments that runs ``impl`` (the op's
    registered implementation) directly in plain eager mode, and the custom op otherwise."""
    packet = getattr(torch.ops.vitattn, name)

    def call(*args):
        return impl(*args) if plain_eager(args) else packet.default(*args)

    call.__name__ = call.__qualname__ = f"{name}_call"
    return call


def register_autograd(name: str, impl: Callable, backward: Callable, setup_context: Callable) -> Callable:
    """torch.library.register_autograd for ``vitattn::<name>`` (implemented by ``impl``), and a
    caller for the public function: in plain eager mode ``impl`` runs inside a
    torch.autograd.Function with the same setup_context and backward (or bare when no tensor
    argument needs a gradient), otherwise the custom op runs."""
    torch.library.register_autograd(f"vitattn::{name}", backward, setup_context=setup_context, lib=LIB)
    packet = getattr(torch.ops.vitattn, name)

    # forward(ctx, ...) rather than a separate setup_context staticmethod: with the latter,
    # every apply() binds its arguments through inspect.signature (~60 us a call)
    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    # built with type() so the autograd node is named after the op (<name>_eagerBackward)
    EagerFunction = type(f"{name}_eager", (torch.autograd.Function,),
                         {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    def call(*args):
        if not plain_eager(args):
            return packet.default(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return EagerFunction.apply(*args)
        return impl(*args)

    call.__name__ = call.__qualname__ = f"{name}_call"
    return call
