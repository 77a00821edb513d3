"""Sparsity patterns for common structures, and a check of a pattern.

The patterns are sparse COO boolean tensors of shape (outputs, inputs), so they
scale to large n; pass them to ``jacfd(func, sparsity=...)``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten

from ._coloring import pattern_nonzeros
from ._inputs import check_kwargs
from ._jacfd import jacfd

if TYPE_CHECKING:  # type aliases only: the public signature is jacfd's
    from ._inputs import Argnums
    from ._stencil import Scheme
    from ._steps import Delta
    from ._strategy import StrategyOption as Strategy
    from ._workers import Workers


def _integer(value: object, where: str, name: str) -> int:
    """``value`` as a Python int: ints, numpy integers and 0-d integer tensors, not bools
    (``True`` is an int to Python, but as a size it is a mistake)."""
    refused = isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy bool
    if isinstance(value, torch.Tensor):  # torch would take a 1-element tensor as an index
        refused = refused or value.dtype == torch.bool or value.dim() != 0
    if not refused:
        try:
            return operator.index(value)  # type: ignore[arg-type]
        except TypeError:
            pass
    raise TypeError(f"{where}: {name} must be an int, got {value!r}. Pass a whole number.")


def _size(value: object, where: str, name: str) -> int:
    size = _integer(value, where, name)
    if size < 0:
        raise ValueError(f"{where}: {name} must be >= 0, got {size}.")
    return size


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
    n = _size(n, "diagonal_pattern(n)", "n")
    index = torch.arange(n)
    return _coo(index, index, (n, n))


def banded_pattern(n: int, lower: int, upper: int | None = None) -> torch.Tensor:
    """Output ``i`` depends on inputs ``i - lower .. i + upper``: ``lower + upper + 1``
    colours (3 for a tridiagonal system), whatever ``n``.

    ``upper`` defaults to ``lower``. A band wider than the matrix is clipped to it
    (``banded_pattern(3, 5)`` is dense). A negative ``lower`` or ``upper`` shifts the
    band off the diagonal (``banded_pattern(n, -1, 1)`` is the superdiagonal alone);
    ``lower + upper`` must be at least 0.

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
    where = "banded_pattern(n, lower, upper)"
    n = _size(n, where, "n")
    lower = _integer(lower, where, "lower")
    upper = lower if upper is None else _integer(upper, where, "upper")
    if lower + upper < 0:
        raise ValueError(
            f"{where}: the band i - lower .. i + upper is empty (lower={lower}, "
            f"upper={upper}). Pass lower + upper >= 0; (n, 0) is the diagonal."
        )
    # Diagonals beyond the matrix hold no entries: clip, so that a wide band is dense.
    offsets = range(max(-lower, 1 - n), min(upper, n - 1) + 1)
    rows = [torch.arange(max(0, -k), min(n, n - k)) for k in offsets]
    cols = [r + k for r, k in zip(rows, offsets)]
    empty = [torch.zeros(0, dtype=torch.int64)]  # no diagonal at all when n == 0
    return _coo(torch.cat(rows or empty), torch.cat(cols or empty), (n, n))


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
    where = "block_diagonal_pattern(blocks, block_outputs, block_inputs)"
    blocks = _size(blocks, where, "blocks")
    block_outputs = _size(block_outputs, where, "block_outputs")
    block_inputs = _size(block_inputs, where, "block_inputs")
    out_index = torch.arange(blocks * block_outputs)
    in_offset = torch.arange(block_inputs)
    rows = out_index.repeat_interleave(block_inputs)
    cols = (out_index // block_outputs).repeat_interleave(block_inputs) * block_inputs
    cols = cols + in_offset.repeat(blocks * block_outputs)
    return _coo(rows, cols, (blocks * block_outputs, blocks * block_inputs))


@dataclass(frozen=True)
class SparsityReport:
    """The result of :func:`check_sparsity`: the entries where the dense Jacobian is
    non-zero but the pattern is not.

    Attributes:
        missed: ``(k, 2)`` int64 (output index, input index) pairs, flattened as
            in the pattern, in row-major order.
        largest_missed: The largest ``|J|`` among the missed entries (0 if none).
        tolerance: Entries of ``|J|`` above this count as non-zero.
    """

    missed: torch.Tensor
    largest_missed: float
    tolerance: float

    @property
    def passed(self) -> bool:
        """True when the pattern covers every entry above the tolerance."""
        return self.missed.shape[0] == 0

    @property
    def ok(self) -> bool:
        """The same as :attr:`passed`, under its earlier name (kept so that code
        written for it keeps working)."""
        return self.passed

    def __str__(self) -> str:
        if self.passed:
            return f"pattern covers every entry above {self.tolerance:.1e}"
        shown = ", ".join(f"({i}, {j})" for i, j in self.missed[:10].tolist())
        more = f" and {self.missed.shape[0] - 10} more" if self.missed.shape[0] > 10 else ""
        return (
            f"pattern misses {self.missed.shape[0]} entries (largest |J| = "
            f"{self.largest_missed:.2e}): {shown}{more}"
        )


_WHERE = "check_sparsity(func, sparsity, *args)"


def check_sparsity(
    func: Callable[..., Any],
    sparsity: Any,
    *args: Any,
    argnums: Argnums = 0,
    kwargs: Mapping[str, Any] | None = None,
    scheme: Scheme = "central",
    delta: Delta = None,
    strategy: Strategy = "vmap",
    chunk_size: int | None = None,
    workers: Workers = None,
    process_group: Any = None,
) -> SparsityReport:
    """Compares a pattern with a dense finite-difference Jacobian at ``args``.

    Use a small, generic point (random values, no exact zeros) so that no entry
    vanishes by accident. Entries of ``|J|`` above the tolerance that the pattern
    misses are reported. The tolerance is ``100 * eps**(p/(p+1)) * max(1, max|J|)``
    for a scheme of order ``p`` (``eps**(2/3)`` for ``"central"``, ``eps**(1/2)``
    one-sided, ``eps`` for ``"complex"``), the error of the default step; with a
    ``delta`` of your own it is ``100 * (eps / h_min + h_max**p) * max(1, max|J|)``.

    Args:
        func: The function, as for :func:`jacfd`: it returns a tensor or a pytree
            of tensors, whose elements are flattened leaf after leaf into the
            pattern's rows.
        sparsity: The pattern, in any form ``jacfd(sparsity=)`` accepts: a torch
            tensor (dense, COO, CSR, CSC, BSR, BSC), a numpy array or a
            scipy.sparse matrix or array, of shape ``(outputs, inputs)``.
        *args: The point: positional arguments of ``func``.
        argnums: The differentiated argument(s), as for :func:`jacfd`; their
            elements, flattened leaf after leaf, are the pattern's columns.
        kwargs: Keyword arguments for ``func``, not differentiated.
        scheme: The finite-difference scheme, as for :func:`jacfd`.
        delta: The step, as for :func:`jacfd` (default: jacfd's own).
        strategy: How ``func`` is evaluated, as for :func:`jacfd`: ``"loop"``
            checks a black box (numpy, ``.item()``, a simulator).
        chunk_size: Stencil points per evaluation, as for :func:`jacfd`.
        workers: Worker processes or a map-like callable, as for :func:`jacfd`.
        process_group: A ``torch.distributed`` group, as for :func:`jacfd`.

    Returns:
        A :class:`SparsityReport`; ``report.passed`` is the verdict.

    Raises:
        TypeError: An argument has the wrong type (the pattern, ``kwargs``, or an
            option :func:`jacfd` refuses).
        ValueError: The pattern's shape is not the Jacobian's, or an argument has
            a wrong value.

    Examples:
        >>> import numpy as np
        >>> import torch
        >>> from jacfd import check_sparsity, diagonal_pattern
        >>> report = check_sparsity(torch.sin, diagonal_pattern(3), torch.rand(3))
        >>> report.passed
        True
        >>> check_sparsity(torch.cumsum, diagonal_pattern(3), torch.rand(3), 0).passed
        False
        >>> def black_box(x):  # numpy inside: vmap cannot trace it
        ...     return torch.from_numpy(np.sin(x.numpy()))
        >>> x = torch.rand(3, dtype=torch.float64)
        >>> check_sparsity(black_box, np.eye(3, dtype=bool), x, strategy="loop").passed
        True
    """
    if not callable(func):
        raise TypeError(f"{_WHERE}: func must be callable, got {type(func).__name__}.")
    m, n, rows, cols = pattern_nonzeros(sparsity, "check_sparsity(func, sparsity)")
    call_kwargs = check_kwargs("check_sparsity(func, sparsity, kwargs)", kwargs)

    flat_outputs = _FlatOutputs(func, call_kwargs)

    try:
        transform = jacfd(
            flat_outputs,
            argnums,
            delta,
            scheme,
            chunk_size=chunk_size,
            strategy=strategy,
            workers=workers,
            process_group=process_group,
        )
        jacobian = transform(*args)
    except (TypeError, ValueError, RuntimeError) as error:
        raise _named(error) from error
    blocks = tree_flatten(jacobian)[0]
    dense = torch.cat([b.reshape(b.shape[0], math.prod(b.shape[1:])) for b in blocks], dim=1)
    if (m, n) != tuple(dense.shape):
        raise ValueError(
            f"check_sparsity(func, sparsity): the pattern has shape {(m, n)} but the "
            f"Jacobian has shape {tuple(dense.shape)} (outputs x inputs, each flattened "
            "leaf after leaf). Build the pattern for this func and these args."
        )
    magnitude = dense.detach().abs().cpu()
    scale = max(1.0, magnitude.max().item()) if magnitude.numel() else 1.0
    tolerance = _relative_error(magnitude.dtype, scheme, delta) * scale
    covered = torch.zeros(m, n, dtype=torch.bool)
    covered[rows, cols] = True
    missed = (magnitude > tolerance) & ~covered
    largest = magnitude[missed].max().item() if bool(missed.any()) else 0.0
    return SparsityReport(missed.nonzero(), largest, tolerance)


@dataclass(frozen=True)
class _FlatOutputs:
    """func's output leaves flattened and joined: a class, not a closure, so that
    worker processes can be sent it."""

    func: Callable[..., Any]
    kwargs: dict[str, Any]

    def __call__(self, *call_args: Any) -> Any:
        out = self.func(*call_args, **self.kwargs)
        leaves = tree_flatten(out)[0]
        if not leaves or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            return out  # not a pytree of tensors: jacfd says what is wrong
        return torch.cat([leaf.reshape(-1) for leaf in leaves])


def _named(error: Exception) -> Exception:
    """jacfd's own errors about the options and arguments, said for check_sparsity
    (errors of func itself pass through unchanged)."""
    if isinstance(error, (TypeError, ValueError, RuntimeError)) and str(error).startswith("jacfd"):
        return type(error)(f"{_WHERE} (through jacfd): {error}")
    return error


def _relative_error(dtype: torch.dtype, scheme: str, delta: Any) -> float:
    """100 times the error of the scheme's difference relative to ``max(1, max|J|)``:
    rounding ``eps / h`` (none for the complex step) plus truncation ``h**p``."""
    eps = torch.finfo(dtype).eps
    order = 1 if scheme in ("forward", "backward") else 2
    leaves = [leaf for leaf in tree_flatten(delta)[0] if leaf is not None]
    steps = [abs(float(v)) for leaf in leaves for v in torch.as_tensor(leaf).flatten()]
    if not steps:  # jacfd's step: rounding and truncation balance
        return 100 * (eps if scheme == "complex" else eps ** (order / (order + 1)))
    rounding = 0.0 if scheme == "complex" else eps / min(steps)
    return 100 * (max(eps, rounding) + max(steps) ** order)
