"""ONNX export of the vitattn ops: what every op's ``onnx_impl.py`` shares.

The ONNX exporters (``torch.onnx.export``, dynamo or TorchScript) have no lowering for the
``vitattn::*`` custom ops. While one of them traces, each public op skips its custom op and
computes the same math with standard PyTorch ops (``vitattn/ops/<op>/onnx_impl.py``), which
the exporter lowers to standard ONNX operators: ``torch.onnx.export(model, x, dynamo=True)``
works with no extra arguments. Eager calls, torch.compile and a plain torch.export are
unchanged (they keep the custom op as one node).

The decompositions work on the static shapes seen at export time. Where an op's math needs
an N x N (or n x n per group) intermediate, its query rows are split into blocks whose
intermediates fit VITATTN_DENSE_BUDGET_MB per batch element (read at export time), so the
exported graph needs bounded memory at large token counts; below that it is one dense block.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import torch

from .._tiles import dense_elems


def exporting() -> bool:
    """True while torch.onnx.export traces a model.

    torch.compiler.is_exporting() (dynamo exporter) or torch.jit.is_tracing() (TorchScript
    exporter) is checked first: both are cheap flags, so eager calls never import
    torch.onnx, and torch.compile folds all three to False.
    """
    return (torch.compiler.is_exporting() or torch.jit.is_tracing()) and torch.onnx.is_in_onnx_export()


def row_blocks(rows: int, elems_per_row: int, dtype: torch.dtype, tensors: int = 3) -> Iterator[Tuple[int, int]]:
    """Split range(rows) into [r0, r1) blocks whose `tensors` intermediates of
    `elems_per_row` elements per row (per batch element) fit the dense budget; one block
    when everything fits."""
    step = max(1, dense_elems(dtype, tensors) // max(1, elems_per_row))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def cat(parts, dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def abs_diff(n: int, device, dtype: torch.dtype) -> torch.Tensor:
    """(n, n) matrix |i - j| (axis distances of MaSA's decay)."""
    i = torch.arange(n, device=device)
    return (i[:, None] - i[None, :]).abs().to(dtype)


def logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Max-shifted log-sum-exp, written out so that the exported graph is stable whatever
    the exporter lowers torch.logsumexp to."""
    m = x.amax(dim, keepdim=True)
    return (m + torch.log(torch.exp(x - m).sum(dim, keepdim=True))).squeeze(dim)
