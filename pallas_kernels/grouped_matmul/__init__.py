"""Grouped matmul (megablox / ragged_dot): out[rows of g] = lhs[rows of g] @ rhs[g] over rows sorted by group."""

from pallas_kernels.grouped_matmul.api import (
    DEFAULT_FOR_BACKEND,
    IMPLEMENTATIONS,
    OP,
    available_implementations,
    grouped_matmul,
)

__all__ = ["DEFAULT_FOR_BACKEND", "IMPLEMENTATIONS", "OP", "available_implementations", "grouped_matmul"]
