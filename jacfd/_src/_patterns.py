"""Sparsity patterns for common structures, and a check of a pattern.

The patterns are sparse COO boolean tensors of shape (outputs, inputs), so they
scale to large n; pass them to ``jacfd(func, sparsity=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten


def _coo(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    values = torch.ones(rows.numel(), dtype=torch.bool)
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), values, shape, check_invariants=True
    ).coalesce()


def diagonal_pattern(n: int) -> torch.Tensor:
    """An element-wise function of ``n`` inputs: one colour, one evaluation per
    stencil point for the whole Jacobian.

    Examples:
        >>> import torch
        >>> from jacfd import diagonal_pattern, jacfd
        >>> x = torch.linspace(0.0, 1.0, 100, dtype=torch.float64)
        >>> J = jacfd(torch.sin, sparsity=diagonal_pattern(100))(x)  # 2 evaluations, not 200
        >>> bool(torch.allclose(J, torch.diag(torch.cos(x))))
        True
    """
    index = torch.arange(n)
    return _coo(index, index, (n, n))


def banded_pattern(n: int, lower: int, upper: int | None = None) -> torch.Tensor:
    """Output ``i`` depends on inputs ``i - lower .. i + upper``: ``lower + upper + 1``
    colours (3 for a tridiagonal system), whatever ``n``.

    Examples:
        >>> import torch
        >>> from jacfd import banded_pattern, jacfd
        >>> def second_difference(u):  # out[i] depends on u[i - 1], u[i], u[i + 1]
        ...     padded = torch.nn.functional.pad(u, (1, 1))
        ...     return padded[:-2] - 2 * u + padded[2:]
        >>> u = torch.rand(100, dtype=torch.float64)
        >>> pattern = banded_pattern(100, 1)
        >>> J = jacfd(second_difference, sparsity=pattern, sparse_output=True)(u)
        >>> J.layout, J._nnz()  # 6 evaluations for 298 non-zeros
        (torch.sparse_coo, 298)
    """
    upper = lower if upper is None else upper
    rows = [torch.arange(max(0, -k), min(n, n - k)) for k in range(-lower, upper + 1)]
    cols = [r + k for r, k in zip(rows, range(-lower, upper + 1))]
    return _coo(torch.cat(rows), torch.cat(cols), (n, n))


def block_diagonal_pattern(blocks: int, block_outputs: int, block_inputs: int) -> torch.Tensor:
    """``blocks`` independent blocks of ``block_outputs x block_inputs``: as many
    colours as inputs per block.

    Examples:
        >>> import torch
        >>> from jacfd import block_diagonal_pattern, jacfd
        >>> w = torch.randn(4, 3, 2, dtype=torch.float64)  # 4 blocks, 2 inputs -> 3 outputs
        >>> def blockwise(x):
        ...     return torch.einsum("boi,bi->bo", w, x.reshape(4, 2)).reshape(-1)
        >>> x = torch.randn(8, dtype=torch.float64)
        >>> J = jacfd(blockwise, sparsity=block_diagonal_pattern(4, 3, 2))(x)  # 4 evaluations
        >>> bool(torch.allclose(J, torch.func.jacrev(blockwise)(x)))
        True
    """
    out_index = torch.arange(blocks * block_outputs)
    in_offset = torch.arange(block_inputs)
    rows = out_index.repeat_interleave(block_inputs)
    cols = (out_index // block_outputs).repeat_interleave(block_inputs) * block_inputs
    cols = cols + in_offset.repeat(blocks * block_outputs)
    return _coo(rows, cols, (blocks * block_outputs, blocks * block_inputs))


@dataclass(frozen=True)
class SparsityReport:
    """Entries where the dense Jacobian is non-zero but the pattern is not."""

    missed: torch.Tensor
    """``(k, 2)`` (output index, input index) pairs, flattened as in the pattern."""
    largest_missed: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.missed.shape[0] == 0

    def __str__(self) -> str:
        if self.ok:
            return f"pattern covers every entry above {self.tolerance:.1e}"
        shown = ", ".join(f"({i}, {j})" for i, j in self.missed[:10].tolist())
        more = f" and {self.missed.shape[0] - 10} more" if self.missed.shape[0] > 10 else ""
        return (
            f"pattern misses {self.missed.shape[0]} entries (largest |J| = "
            f"{self.largest_missed:.2e}): {shown}{more}"
        )


def check_sparsity(
    func: Callable[..., Any],
    sparsity: torch.Tensor,
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
) -> SparsityReport:
    """Compares a pattern with a dense central-difference Jacobian at ``args``.

    Use a small, generic point (random values, no exact zeros) so that no entry
    vanishes by accident. Entries above ``100 * eps**(2/3) * max|J|`` that the
    pattern misses are reported.

    Examples:
        >>> import torch
        >>> from jacfd import check_sparsity, diagonal_pattern
        >>> report = check_sparsity(torch.sin, diagonal_pattern(3), torch.rand(3))
        >>> report.ok
        True
        >>> check_sparsity(torch.cumsum, diagonal_pattern(3), torch.rand(3), 0).ok
        False
    """
    from ._jacfd import jacfd  # the dense transform is the reference

    def flat_outputs(*call_args: Any) -> torch.Tensor:
        leaves = tree_flatten(func(*call_args))[0]
        return torch.cat([leaf.reshape(-1) for leaf in leaves])

    jacobian = jacfd(flat_outputs, argnums)(*args)
    blocks = tree_flatten(jacobian)[0]
    dense = torch.cat([b.reshape(b.shape[0], -1) for b in blocks], dim=1)
    pattern = sparsity.to_dense() if sparsity.is_sparse else torch.as_tensor(sparsity)
    if pattern.shape != dense.shape:
        raise ValueError(
            f"check_sparsity: the pattern has shape {tuple(pattern.shape)} but the "
            f"Jacobian has shape {tuple(dense.shape)} (outputs x inputs, flattened)."
        )
    tolerance = 100 * torch.finfo(dense.dtype).eps ** (2 / 3) * max(1.0, dense.abs().max().item())
    missed = (dense.abs() > tolerance) & ~pattern.bool()
    largest = dense.abs()[missed].max().item() if bool(missed.any()) else 0.0
    return SparsityReport(missed.nonzero(), largest, tolerance)
