"""Column colouring for compressed finite differences (Curtis, Powell and Reid).

Columns ``i`` and ``j`` of a Jacobian may share a colour, and so be perturbed
together, when no row has a non-zero in both. Then one evaluation per colour
recovers every entry: with ``C[:, c] = sum(J[:, j] for j of colour c)``,
``J[r, j] = C[r, colors[j]]`` for each non-zero ``(r, j)`` of the pattern.

Colouring is greedy on the column-intersection graph, built row-wise from the
pattern's index arrays in ``O(sum_r nnz_r**2)`` time and memory (a dense row of
``n`` entries costs ``n**2``). Three cheap orderings are tried, stopping as soon
as one reaches the lower bound ``max_r nnz_r`` (that row's columns all need
distinct colours), and the one with the fewest colours is kept: largest-first,
DSATUR (Brelaz's saturation ordering) and smallest-last.
"""

from __future__ import annotations

import heapq
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

_WHERE = "jacfd(func, sparsity)"


@dataclass(frozen=True, eq=False)
class Coloring:
    """A column colouring of an ``(m, n)`` sparsity pattern, and the pattern itself.

    Example:
        >>> import torch
        >>> from jacfd._src._coloring import color_columns  # internal: jacfd(sparsity=) uses it
        >>> pattern = torch.ones(4, 4, dtype=torch.bool).triu(-1).tril(1)  # tridiagonal
        >>> coloring = color_columns(pattern)
        >>> coloring.num_colors, coloring.colors.tolist()
        (3, [0, 1, 2, 0])
        >>> J = torch.randn(4, 4) * pattern
        >>> torch.equal(coloring.decompress(J @ coloring.seeds(J.dtype)), J)
        True
    """

    colors: torch.Tensor
    """``(n,)`` int64, the colour ``0 .. num_colors - 1`` of each column (CPU)."""
    num_colors: int
    """Number of colours: evaluations needed per stencil point. 0 when ``n == 0``."""
    rows: torch.Tensor
    """``(nnz,)`` int64 row indices of the pattern's non-zeros, sorted by row then column."""
    cols: torch.Tensor
    """``(nnz,)`` int64 column indices of the pattern's non-zeros, matching ``rows``."""
    shape: tuple[int, int]
    """``(m, n)``: output and input sizes of the Jacobian."""

    def seeds(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``(n, num_colors)`` 0/1 matrix ``S``: column ``c`` perturbs the columns of
        colour ``c``, so the compressed Jacobian is ``J @ S``."""
        seeds = torch.zeros(self.shape[1], self.num_colors, dtype=dtype)
        seeds[torch.arange(self.shape[1]), self.colors] = 1
        return seeds

    def decompress(self, compressed: torch.Tensor) -> torch.Tensor:
        """Dense ``(..., m, n)`` Jacobian from a compressed ``(..., m, num_colors)`` one:
        ``J[..., rows, cols] = compressed[..., rows, colors[cols]]``, zero elsewhere.

        With per-column steps ``h``, divide by ``h[cols]`` afterwards (each entry comes
        from exactly one column)."""
        dense = compressed.new_zeros(*compressed.shape[:-2], *self.shape)
        rows, cols = self.rows.to(compressed.device), self.cols.to(compressed.device)
        dense[..., rows, cols] = self.entries(compressed)
        return dense

    def entries(self, compressed: torch.Tensor) -> torch.Tensor:
        """The pattern's non-zeros (in ``rows, cols`` order) from a compressed
        ``(..., m, num_colors)`` Jacobian: ``compressed[..., rows, colors[cols]]``."""
        device = compressed.device
        return compressed[..., self.rows.to(device), self.colors.to(device)[self.cols.to(device)]]


def color_columns(pattern: Any) -> Coloring:
    """Colour the columns of a sparsity ``pattern`` so that no two columns of one
    colour have a non-zero in the same row.

    Args:
        pattern: ``(m, n)`` pattern of the Jacobian (non-zero = may be non-zero): a
            bool, integer or floating torch tensor holding only 0 and 1, dense or
            sparse (COO, CSR, CSC, BSR, BSC; explicit zeros are ignored), a numpy
            array (or anything with ``__array__``), or a scipy.sparse matrix or
            array. Either size may be 0.

    Returns:
        The :class:`Coloring`.

    Raises:
        TypeError: ``pattern`` is not one of the types above, or its dtype is
            complex or one torch cannot count non-zeros of (e.g. uint16, float8).
        ValueError: ``pattern`` is not 2-D, holds values other than 0 and 1, is
            an invalid sparse tensor, or is a meta tensor.
    """
    m, n, rows, cols = pattern_nonzeros(pattern)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return Coloring(empty, 0, rows, cols, (m, n))
    ptr, nbr = _intersection_graph(rows, cols, m, n)
    bound = int(torch.bincount(rows, minlength=1).max())
    best: list[int] = []
    for candidate in _candidates(ptr, nbr):  # stop at the bound: no colouring does better
        if not best or max(candidate) < max(best):
            best = candidate
        if max(best) + 1 <= bound:
            break
    colors = _by_first_column(best)
    colors[torch.bincount(cols, minlength=n) == 0] = 0  # an empty column fits in any colour
    return Coloring(colors, max(best) + 1, rows, cols, (m, n))


def _candidates(ptr: list[int], nbr: list[int]) -> Iterator[list[int]]:
    """Greedy colourings in three orders, the cheapest first: largest-first (by
    degree, ties by index), DSATUR, smallest-last."""
    n = len(ptr) - 1
    yield _greedy(sorted(range(n), key=lambda v: ptr[v] - ptr[v + 1]), ptr, nbr)
    yield _dsatur(ptr, nbr)
    yield _greedy(_smallest_last(ptr, nbr), ptr, nbr)


def _by_first_column(colors: list[int]) -> torch.Tensor:
    """Relabel the colours in the order of their first column (column 0 gets 0)."""
    labels = torch.tensor(colors, dtype=torch.int64)
    first = torch.full((max(colors) + 1,), len(colors), dtype=torch.int64)
    first.scatter_reduce_(0, labels, torch.arange(len(colors)), "amin")
    return torch.argsort(torch.argsort(first))[labels]


def pattern_nonzeros(
    pattern: Any, where: str = _WHERE
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """``(m, n, rows, cols)``: the distinct non-zeros of a sparsity pattern, sorted by
    row then column, from any accepted input (see :func:`color_columns`).

    The one intake of patterns, shared by ``jacfd(sparsity=)`` and
    ``check_sparsity``; ``where`` names the public function in its errors.
    """
    if isinstance(pattern, torch.Tensor):
        return _tensor_nonzeros(pattern, where)
    scipy_sparse = sys.modules.get("scipy.sparse")  # a scipy object implies scipy is loaded
    if scipy_sparse is not None and scipy_sparse.issparse(pattern):
        return _scipy_nonzeros(pattern, where)
    if hasattr(pattern, "__array__") and not isinstance(pattern, (str, bytes)):
        return _numpy_nonzeros(pattern, where)
    raise TypeError(
        f"{where}: expected a 2-D bool torch.Tensor (dense or sparse), a numpy array "
        f"or a scipy.sparse matrix, got {type(pattern).__name__}. Wrap it in "
        "torch.tensor(..., dtype=torch.bool)."
    )


# Dtypes whose 0/1 check and nonzero() torch implements on CPU; others are refused
# with a fix rather than failing inside torch (uint16..64, float8, quantized).
_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)  # fmt: skip
_LAYOUTS = (
    torch.strided, torch.sparse_coo, torch.sparse_csr, torch.sparse_csc,
    torch.sparse_bsr, torch.sparse_bsc,
)  # fmt: skip


def _tensor_nonzeros(
    pattern: torch.Tensor, where: str
) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    if pattern.is_nested or pattern.layout not in _LAYOUTS:
        kind = "nested" if pattern.is_nested else str(pattern.layout)
        raise TypeError(
            f"{where}: expected a dense or sparse (COO, CSR, CSC, BSR, BSC) tensor, got a "
            f"{kind} tensor. Convert it to a dense bool tensor first."
        )
    if pattern.dtype.is_complex or pattern.is_quantized or pattern.dtype not in _DTYPES:
        raise TypeError(
            f"{where}: expected a bool (or 0/1 integer or real) pattern, got dtype "
            f"{pattern.dtype}. Pass pattern != 0, or pattern.to(torch.bool)."
        )
    hybrid = pattern.layout != torch.strided and pattern.dense_dim() != 0
    _check_shape(tuple(pattern.shape), where, hybrid)
    if pattern.device.type == "meta":
        raise ValueError(
            f"{where}: the pattern is a meta tensor and holds no values. Build it on the "
            "CPU (or any real device)."
        )
    m, n = pattern.shape
    pattern = pattern.detach()
    if pattern.layout == torch.strided:
        dense = pattern.cpu()
        _check_values(dense, where)
        rows, cols = dense.nonzero().T  # row-major: sorted and distinct
        return m, n, rows, cols
    _check_invariants(pattern, where)  # converting an invalid CSR tensor can crash Python
    coo = pattern.cpu().to_sparse()  # COO from any sparse layout
    _check_values(coo._values(), where)
    rows, cols = coo._indices()[:, coo._values() != 0]  # explicit zeros are not entries
    if not coo.is_coalesced():
        rows, cols = _unique(rows, cols, n)
    return m, n, rows, cols


def _check_invariants(pattern: torch.Tensor, where: str) -> None:
    try:
        if pattern.layout == torch.sparse_coo:
            torch._validate_sparse_coo_tensor_args(
                pattern._indices(), pattern._values(), pattern.shape
            )
        else:
            compressed, plain = (
                (pattern.crow_indices(), pattern.col_indices())
                if pattern.layout in (torch.sparse_csr, torch.sparse_bsr)
                else (pattern.ccol_indices(), pattern.row_indices())
            )
            torch._validate_sparse_compressed_tensor_args(
                compressed, plain, pattern.values(), pattern.shape, pattern.layout
            )
    except RuntimeError as error:
        raise ValueError(
            f"{where}: the sparse pattern is invalid ({error}). Build it with "
            "check_invariants=True to find the bad index."
        ) from None


def _scipy_nonzeros(pattern: Any, where: str) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    import numpy as np  # scipy depends on numpy

    _check_shape(tuple(pattern.shape), where)
    m, n = pattern.shape
    coo = pattern.tocoo()
    data = np.asarray(coo.data)
    _check_numpy_values(data, type(pattern).__name__, where)
    keep = data != 0  # explicit zeros are not entries
    rows = torch.from_numpy(np.asarray(coo.row)[keep].astype(np.int64))
    cols = torch.from_numpy(np.asarray(coo.col)[keep].astype(np.int64))
    return m, n, *_unique(rows, cols, n)  # scipy allows duplicates, in any order


def _numpy_nonzeros(pattern: Any, where: str) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    import numpy as np  # pattern has __array__, so numpy is installed

    try:
        array = np.asarray(pattern)
    except Exception as error:  # whatever __array__ raises: the pattern is unusable
        raise TypeError(
            f"{where}: could not convert the {type(pattern).__name__} pattern to an array "
            f"({error}). Pass a bool torch.Tensor."
        ) from None
    _check_numpy_values(array, type(pattern).__name__, where)
    _check_shape(array.shape, where)
    # A contiguous native bool copy: torch refuses negative strides and byte-swapped data.
    mask = torch.from_numpy(np.ascontiguousarray(array != 0))
    rows, cols = mask.nonzero().T
    return array.shape[0], array.shape[1], rows, cols


def _check_numpy_values(array: Any, kind: str, where: str) -> None:
    if array.dtype.kind == "c":
        raise TypeError(
            f"{where}: expected a bool (or 0/1 integer or real) pattern, got dtype "
            f"{array.dtype}. Pass pattern != 0."
        )
    if array.dtype.kind not in "biuf":  # bool, signed, unsigned, floating
        raise TypeError(
            f"{where}: expected a bool (or 0/1 integer or real) pattern, got {kind} of dtype "
            f"{array.dtype}. Convert it, e.g. torch.tensor(..., dtype=torch.bool)."
        )
    bad = array[(array != 0) & (array != 1)]
    if bad.size:
        raise ValueError(
            f"{where}: a pattern holds only 0 and 1 (or False and True), got the value "
            f"{bad.flat[0].item()}. Pass pattern != 0 to mark every non-zero."
        )


def _check_shape(shape: tuple[int, ...], where: str, hybrid: bool = False) -> None:
    if len(shape) != 2 or hybrid:
        raise ValueError(
            f"{where}: expected a 2-D (outputs, inputs) pattern, got shape "
            f"{tuple(shape)}. Reshape it to (m, n): m output elements by n input elements."
        )


def _check_values(values: torch.Tensor, where: str) -> None:
    bad = values[(values != 0) & (values != 1)]
    if bad.numel():
        raise ValueError(
            f"{where}: a pattern holds only 0 and 1 (or False and True), got the value "
            f"{bad[0].item()}. Pass pattern != 0 to mark every non-zero."
        )


def _unique(rows: torch.Tensor, cols: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``(row, col)`` pairs, sorted by row then column."""
    keys = torch.unique(rows * n + cols)  # n > 0 whenever there is a pair
    return keys // max(n, 1), keys % max(n, 1)


def _intersection_graph(
    rows: torch.Tensor, cols: torch.Tensor, m: int, n: int
) -> tuple[list[int], list[int]]:
    """Adjacency ``(ptr, nbr)`` in CSR form of the column-intersection graph: the
    neighbours of column ``j`` are ``nbr[ptr[j]:ptr[j + 1]]``. It is the pattern of
    ``A.T @ A`` (a sparse product: no pair is listed twice), less its diagonal."""
    if rows.numel() == 0:
        return [0] * (n + 1), []
    ones = torch.ones(rows.numel(), dtype=torch.float64)  # products count shared rows: > 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        a = torch.sparse_csr_tensor(_ptr(rows, m), cols, ones, (m, n), check_invariants=False)
        order = torch.argsort(cols, stable=True)
        at = torch.sparse_csr_tensor(
            _ptr(cols, n), rows[order], ones, (n, m), check_invariants=False
        )
        product = at @ a
    ptr, nbr = product.crow_indices(), product.col_indices()
    src = torch.repeat_interleave(torch.arange(n), ptr.diff())
    keep = nbr != src
    return _ptr(src[keep], n).tolist(), nbr[keep].tolist()


def _ptr(index: torch.Tensor, size: int) -> torch.Tensor:
    """CSR pointers of a sorted index array: entries of ``i`` are ``ptr[i]:ptr[i + 1]``."""
    ptr = torch.zeros(size + 1, dtype=torch.int64)
    ptr[1:] = torch.cumsum(torch.bincount(index, minlength=size), 0)
    return ptr


def _greedy(order: list[int], ptr: list[int], nbr: list[int]) -> list[int]:
    """First-fit colouring in ``order``: each column takes the smallest colour
    none of its already coloured neighbours has."""
    colors = [-1] * len(order)
    for v in order:
        used = 0  # bit c set: colour c is taken by a neighbour
        for u in nbr[ptr[v] : ptr[v + 1]]:
            if colors[u] >= 0:
                used |= 1 << colors[u]
        colors[v] = (~used & (used + 1)).bit_length() - 1
    return colors


def _dsatur(ptr: list[int], nbr: list[int]) -> list[int]:
    """First-fit colouring, always next colouring the column whose neighbours have
    the most distinct colours (ties: larger degree, then smaller index)."""
    n = len(ptr) - 1
    weight = [ptr[v + 1] - ptr[v] for v in range(n)]  # sat * (max degree + 1) + degree
    step = max(weight) + 1
    colors, used = [-1] * n, [0] * n
    heap = [v - n * weight[v] for v in range(n)]  # one int per entry: fast to compare
    heapq.heapify(heap)
    while heap:  # a column's newest entry (most colours) pops first; older ones are skipped
        v = heapq.heappop(heap) % n
        if colors[v] >= 0:
            continue
        c = (~used[v] & (used[v] + 1)).bit_length() - 1
        colors[v], bit = c, 1 << c
        for u in nbr[ptr[v] : ptr[v + 1]]:
            if colors[u] < 0 and not used[u] & bit:
                used[u] |= bit
                weight[u] += step
                heapq.heappush(heap, u - n * weight[u])
    return colors


def _smallest_last(ptr: list[int], nbr: list[int]) -> list[int]:
    """Smallest-last order: repeatedly remove a column of smallest remaining degree
    (ties: smaller index); colour in the reverse of the removal order."""
    n = len(ptr) - 1
    degree = [ptr[v + 1] - ptr[v] for v in range(n)]
    heap = [v + n * d for v, d in enumerate(degree)]  # one int per entry: fast to compare
    heapq.heapify(heap)
    removed, order = [False] * n, []
    while heap:  # stale entries have a larger degree than the current one: skip them
        d, v = divmod(heapq.heappop(heap), n)
        if removed[v] or d != degree[v]:
            continue
        removed[v] = True
        order.append(v)
        for u in nbr[ptr[v] : ptr[v + 1]]:
            if not removed[u]:
                degree[u] -= 1
                heapq.heappush(heap, u + n * degree[u])
    return order[::-1]
