"""Column colouring: validity, decompression, structured counts, quality against
scipy's own grouping, scale, and input errors."""

from __future__ import annotations

import time
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize._numdiff import group_columns

from jacfd._src._coloring import (
    Coloring,
    _dsatur,
    _greedy,
    _intersection_graph,
    _smallest_last,
    color_columns,
)


def random_pattern(m: int, n: int, density: float, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(m, n, generator=generator) < density


def banded(n: int, w: int) -> torch.Tensor:
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= w


def block_diagonal(b: int, blocks: int) -> torch.Tensor:
    return torch.block_diag(*[torch.ones(b, b)] * blocks).to(torch.bool)


def tridiagonal_coo(n: int) -> torch.Tensor:
    i = torch.arange(n)
    indices = torch.stack([torch.cat([i, i[1:], i[:-1]]), torch.cat([i, i[:-1], i[1:]])])
    values = torch.ones(3 * n - 2, dtype=torch.bool)
    return torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=False)


def check(pattern: torch.Tensor, coloring: Coloring) -> None:
    """A valid colouring of ``pattern`` whose decompression is exact."""
    m, n = pattern.shape
    colors, k = coloring.colors, coloring.num_colors
    assert coloring.shape == (m, n)
    assert colors.dtype == torch.int64 and colors.shape == (n,) and colors.device.type == "cpu"
    assert sorted(set(colors.tolist())) == list(range(k))  # 0 .. k-1, all used
    rows, cols = pattern.nonzero().T
    assert torch.equal(coloring.rows, rows) and torch.equal(coloring.cols, cols)
    # no two columns of one colour share a row: per row, the colours are distinct
    hits = torch.zeros(m, max(k, 1), dtype=torch.int64).index_put_(
        (rows, colors[cols]), torch.ones_like(rows), accumulate=True
    )
    assert int(hits.max()) <= 1
    J = torch.randn(m, n, dtype=torch.float64) * pattern
    C = torch.zeros(m, k, dtype=torch.float64).index_add_(1, colors, J)
    assert torch.equal(J[rows, cols], C[rows, colors[cols]])
    assert torch.equal(C, J @ coloring.seeds())
    assert torch.equal(coloring.decompress(C), J)
    assert torch.equal(coloring.decompress(torch.stack([C, 2 * C])), torch.stack([J, 2 * J]))


@settings(max_examples=50, deadline=None)
@given(
    m=st.integers(1, 40),
    n=st.integers(1, 40),
    density=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_patterns(m: int, n: int, density: float, seed: int) -> None:
    pattern = random_pattern(m, n, density, seed)
    coloring = color_columns(pattern)
    check(pattern, coloring)
    assert coloring.num_colors >= int(pattern.sum(1).max())  # a row's columns all differ


STRUCTURED = {
    "diagonal": (torch.eye(50, dtype=torch.bool), 1),
    "tridiagonal n=1000": (banded(1000, 1), 3),
    "banded w=2": (banded(200, 2), 5),
    "banded w=5": (banded(200, 5), 11),
    "block b=3 x 7": (block_diagonal(3, 7), 3),
    "block b=5 x 4": (block_diagonal(5, 4), 5),
    "dense 5x8": (torch.ones(5, 8, dtype=torch.bool), 8),
    "arrow": (torch.eye(30, dtype=torch.bool) | (torch.arange(30) == 0), 2),  # column 0 full
    "rectangular banded 300x100": (banded(300, 4)[:, ::3], 3),
}


@pytest.mark.parametrize("name", list(STRUCTURED))
def test_structured(name: str) -> None:
    pattern, expected = STRUCTURED[name]
    coloring = color_columns(pattern)
    check(pattern, coloring)
    assert coloring.num_colors == expected


def test_tridiagonal_colors_cycle() -> None:
    assert color_columns(banded(7, 1)).colors.tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_empty_rows_and_columns() -> None:
    pattern = torch.zeros(6, 5, dtype=torch.bool)
    pattern[1, [0, 2]] = pattern[4, [2, 4]] = True  # rows 0, 2, 3, 5 and columns 1, 3 empty
    coloring = color_columns(pattern)
    check(pattern, coloring)
    assert coloring.num_colors == 2 and coloring.colors[[1, 3]].tolist() == [0, 0]


@pytest.mark.parametrize("shape", [(4, 3), (0, 3), (3, 0), (0, 0)])
def test_all_zero(shape: tuple[int, int]) -> None:
    coloring = color_columns(torch.zeros(shape, dtype=torch.bool))
    assert coloring.colors.tolist() == [0] * shape[1]
    assert coloring.num_colors == min(shape[1], 1)
    assert coloring.rows.numel() == coloring.cols.numel() == 0
    assert coloring.decompress(torch.zeros(shape[0], coloring.num_colors)).shape == shape


def as_inputs(pattern: torch.Tensor) -> dict[str, object]:
    """The same pattern in every accepted form."""
    uncoalesced = pattern.to_sparse_coo()
    indices = torch.cat([uncoalesced.indices()] * 2, dim=1).flip(1)  # duplicated, unsorted
    with_zero = torch.sparse_coo_tensor(
        torch.cat([indices, torch.tensor([[0], [0]])], dim=1),
        torch.cat([torch.ones(indices.shape[1]), torch.zeros(1)]),
        pattern.shape,
        check_invariants=False,
    )  # an explicit stored zero at (0, 0), which the pattern below leaves empty
    return {
        "bool": pattern,
        "uint8": pattern.to(torch.uint8),
        "int64": pattern.to(torch.int64),
        "float32": pattern.to(torch.float32),
        "requires_grad": pattern.to(torch.float64).requires_grad_(),
        "transposed view": pattern.T.contiguous().T,
        "coo": pattern.to_sparse_coo(),
        "coo uncoalesced": with_zero,
        "csr": pattern.to_sparse_csr(),
        "csc": pattern.to_sparse_csc(),
        "bsr": pattern.to(torch.float32).to_sparse_bsr((2, 2)),
        "numpy": pattern.numpy(),
        "numpy float": pattern.numpy().astype(np.float64),
        "scipy csr": sp.csr_matrix(pattern.numpy()),
        "scipy coo array": sp.coo_array(pattern.numpy()),
    }


INPUT_KINDS = [
    "bool", "uint8", "int64", "float32", "requires_grad", "transposed view", "coo",
    "coo uncoalesced", "csr", "csc", "bsr", "numpy", "numpy float", "scipy csr",
    "scipy coo array",
]  # fmt: skip


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_input_types(kind: str) -> None:
    pattern = banded(8, 1) | torch.eye(8, dtype=torch.bool).roll(3, 1)
    pattern[0, 0] = False
    inputs = as_inputs(pattern)
    assert list(inputs) == INPUT_KINDS
    expected = color_columns(pattern)
    coloring = color_columns(inputs[kind])
    check(pattern, coloring)
    assert torch.equal(coloring.colors, expected.colors)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("kind", ["bool", "coo uncoalesced", "numpy", "scipy csr"])
def test_no_warnings(kind: str) -> None:
    pattern = as_inputs(banded(10, 2))[kind]  # built before: CSR inputs warn when built
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        color_columns(pattern)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), seed=st.integers(0, 2**31 - 1))
def test_every_heuristic_is_valid(m: int, n: int, seed: int) -> None:
    """Each candidate colouring is proper, not only the one kept."""
    rows, cols = random_pattern(m, n, 0.15, seed).nonzero().T
    ptr, nbr = _intersection_graph(rows, cols, m, n)
    for colors in (
        _greedy(list(range(n)), ptr, nbr),
        _dsatur(ptr, nbr),
        _greedy(_smallest_last(ptr, nbr), ptr, nbr),
    ):
        assert all(colors[v] != colors[u] for v in range(n) for u in nbr[ptr[v] : ptr[v + 1]])
        assert sorted(set(colors)) == list(range(max(colors) + 1))


def scipy_groups(pattern: torch.Tensor) -> int:
    """Number of groups from scipy's greedy CPR grouping (its default order: a random
    permutation, seed 0)."""
    return int(group_columns(sp.csc_array(pattern.numpy())).max()) + 1


QUALITY = {
    **{name: pattern for name, (pattern, _) in STRUCTURED.items()},
    **{
        f"random {m}x{n} d={density} seed={seed}": random_pattern(m, n, density, seed)
        for m, n in [(40, 40), (100, 60), (60, 200)]
        for density in (0.02, 0.05, 0.1, 0.3)
        for seed in range(3)
    },
    "random 2000x2000 5/row": torch.zeros(2000, 2000, dtype=torch.bool).scatter_(
        1, torch.randint(0, 2000, (2000, 5), generator=torch.Generator().manual_seed(0)), True
    ),
    "banded + random 500": banded(500, 2) | random_pattern(500, 500, 0.004, 1),
}


@pytest.mark.parametrize("name", list(QUALITY))
def test_no_more_colors_than_scipy(name: str) -> None:
    pattern = QUALITY[name]
    ours, theirs = color_columns(pattern).num_colors, scipy_groups(pattern)
    print(f"{name}: jacfd {ours}, scipy {theirs}")
    assert ours <= theirs


def test_scale_tridiagonal() -> None:
    n = 100_000
    pattern = tridiagonal_coo(n)
    start = time.perf_counter()
    coloring = color_columns(pattern)
    elapsed = time.perf_counter() - start
    print(f"tridiagonal n={n}: {coloring.num_colors} colours in {elapsed:.3f} s")
    assert coloring.num_colors == 3
    assert coloring.colors[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert coloring.rows.numel() == 3 * n - 2
    assert elapsed < 10.0


def build_errors() -> list[tuple[object, type[Exception], list[str]]]:
    with warnings.catch_warnings():  # building a batched CSR tensor warns
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return [
            (torch.ones(3, dtype=torch.bool), ValueError, ["2-D", "shape (3,)", "Reshape"]),
            (torch.ones(2, 3, 4, dtype=torch.bool), ValueError, ["2-D", "(2, 3, 4)"]),
            (torch.tensor(True), ValueError, ["2-D", "shape ()"]),
            (torch.ones(3, 3, 2).to_sparse(2), ValueError, ["2-D", "(3, 3, 2)"]),
            (torch.ones(2, 3, 3).to_sparse_csr(), ValueError, ["2-D", "(2, 3, 3)"]),
            (
                torch.ones(2, 2, dtype=torch.complex64),
                TypeError,
                ["dtype torch.complex64", "!= 0"],
            ),
            (torch.full((2, 2), 0.5), ValueError, ["only 0 and 1", "0.5", "!= 0"]),
            (torch.tensor([[0, 2]]), ValueError, ["only 0 and 1", "2"]),
            (torch.tensor([[-1.0, 1.0]]), ValueError, ["only 0 and 1", "-1.0"]),
            (torch.tensor([[float("nan")]]), ValueError, ["only 0 and 1", "nan"]),
            (torch.tensor([[1.0, 3.0]]).to_sparse(), ValueError, ["only 0 and 1", "3.0"]),
            (sp.csr_matrix(np.array([[0.0, 0.25]])), ValueError, ["only 0 and 1", "0.25"]),
            (np.ones(4, dtype=bool), ValueError, ["2-D", "shape (4,)"]),
            (sp.coo_array(np.ones(4)), ValueError, ["2-D", "shape (4,)"]),
            (np.array([[object()]]), TypeError, ["got ndarray", "torch.tensor"]),
            ([[True, False]], TypeError, ["got list", "torch.tensor(..., dtype=torch.bool)"]),
            ("tridiagonal", TypeError, ["got str"]),
            (None, TypeError, ["got NoneType"]),
        ]


@pytest.mark.parametrize(("pattern", "kind", "phrases"), build_errors())
def test_errors(pattern: object, kind: type[Exception], phrases: list[str]) -> None:
    with pytest.raises(kind) as info:
        color_columns(pattern)
    message = str(info.value)
    assert message.startswith("jacfd(func, sparsity): ")
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
