"""Tile and block sizes shared by the ops' PyTorch code (the Triton and C++ kernels size
their own tiles)."""

from __future__ import annotations

from typing import Iterator, Tuple

import torch

from . import _env


def pow2(n: int, lo: int = 16) -> int:
    """The smallest power of two >= n, at least lo (tile sizes)."""
    return max(lo, 1 << (max(int(n), 1) - 1).bit_length())


def dense_elems(dtype: torch.dtype, tensors: int = 1) -> int:
    """How many elements each of `tensors` same-sized dense intermediates of `dtype` may hold
    within VITATTN_DENSE_BUDGET_MB (the "torch" backends' switch from dense to blocked math)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, _env.dense_budget_bytes() // (itemsize * max(1, tensors)))


def problem_blocks(Z: int, rows: int, cols: int, dtype: torch.dtype, tensors: int = 4
                   ) -> Iterator[Tuple[int, int, int, int]]:
    """Split Z problems with (rows, cols) intermediates into (z0, z1, r0, r1) blocks whose
    `tensors` intermediates of `dtype` fit VITATTN_DENSE_BUDGET_MB: whole problems batched
    together while one fits, else row blocks of one problem."""
    limit = dense_elems(dtype, tensors)
    per_problem = max(1, rows * cols)
    if per_problem <= limit:
        zc = max(1, limit // per_problem)
        for z0 in range(0, Z, zc):
            yield z0, min(Z, z0 + zc), 0, rows
    else:
        rc = max(1, limit // max(1, cols))
        for z in range(Z):
            for r0 in range(0, rows, rc):
                yield z, z + 1, r0, min(rows, r0 + rc)
