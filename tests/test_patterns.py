"""Pattern builders and check_sparsity: structures against dense references, every
pattern form jacfd accepts, black boxes, zero sizes, and errors for bad input."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from jacfd import (
    banded_pattern,
    block_diagonal_pattern,
    check_sparsity,
    diagonal_pattern,
    jacfd,
)
from jacfd._src._coloring import color_columns

F64 = torch.float64


def point(n: int, seed: int = 0) -> torch.Tensor:
    """A generic point: values in [0.5, 1.5), no exact zeros."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.5


def band_reference(n: int, lower: int, upper: int) -> torch.Tensor:
    """Dense ``(n, n)`` mask of ``i - lower <= j <= i + upper``."""
    offset = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # j - i
    return (offset >= -lower) & (offset <= upper)


@pytest.mark.parametrize(
    ("n", "lower", "upper"),
    [(3, 5, 5), (3, 0, 7), (2, 4, None), (1, 3, 3), (0, 2, 2), (4, -6, 9), (4, 5, -2)],
)  # fmt: skip
def test_banded_pattern_matches_dense_band(n: int, lower: int, upper: int | None) -> None:
    """A band wider than the matrix is clipped; a negative side shifts it."""
    pattern = banded_pattern(n, lower, upper)
    expected = band_reference(n, lower, lower if upper is None else upper)
    assert pattern.layout == torch.sparse_coo and pattern.is_coalesced()
    assert torch.equal(pattern.to_dense(), expected)


BUILDER_ERRORS: list[tuple[Callable[..., torch.Tensor], tuple[Any, ...], type[Exception], str]] = [
    (diagonal_pattern, (-1,), ValueError, "n must be >= 0, got -1"),
    (diagonal_pattern, (3.0,), TypeError, "n must be an int, got 3.0"),
    (diagonal_pattern, (True,), TypeError, "n must be an int, got True"),
    (diagonal_pattern, (float("nan"),), TypeError, "n must be an int"),
    (diagonal_pattern, ("3",), TypeError, "n must be an int, got '3'"),
    (diagonal_pattern, (None,), TypeError, "n must be an int, got None"),
    (diagonal_pattern, (1j,), TypeError, "n must be an int"),
    (banded_pattern, (-2, 1), ValueError, "n must be >= 0"),
    (banded_pattern, (False, 1), TypeError, "n must be an int, got False"),
    (banded_pattern, (4, 1.5), TypeError, "lower must be an int, got 1.5"),
    (banded_pattern, (4, True), TypeError, "lower must be an int, got True"),
    (banded_pattern, (4, torch.tensor([1])), TypeError, "lower must be an int"),
    (banded_pattern, (4, 1, np.float64(1.0)), TypeError, "upper must be an int"),
    (banded_pattern, (4, 1, False), TypeError, "upper must be an int, got False"),
    (banded_pattern, (4, -5, 1), ValueError, "lower + upper >= 0"),
    (block_diagonal_pattern, (-1, 2, 2), ValueError, "blocks must be >= 0"),
    (block_diagonal_pattern, (2, -1, 2), ValueError, "block_outputs must be >= 0"),
    (block_diagonal_pattern, (2, 2, -3), ValueError, "block_inputs must be >= 0"),
    (block_diagonal_pattern, (float("inf"), 2, 2), TypeError, "blocks must be an int"),
    (block_diagonal_pattern, (2, 2, torch.tensor(3.0)), TypeError, "block_inputs must be an int"),
    (block_diagonal_pattern, (2, 2, True), TypeError, "block_inputs must be an int, got True"),
]


@pytest.mark.parametrize(("builder", "args", "kind", "phrase"), BUILDER_ERRORS)
def test_builder_errors(
    builder: Callable[..., torch.Tensor], args: tuple[Any, ...], kind: type[Exception], phrase: str
) -> None:
    with pytest.raises(kind) as info:
        builder(*args)
    message = str(info.value)
    assert message.startswith(f"{builder.__name__}(")
    assert phrase in message, f"{phrase!r} not in {message!r}"


class BrokenArray:
    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        raise RuntimeError("no array today")


def intake_errors() -> list[tuple[str, object, type[Exception], list[str]]]:
    v = torch.ones(1)
    with warnings.catch_warnings():  # CSR, quantized and nested tensors warn when built
        warnings.simplefilter("ignore")
        return [
            ("uint16", torch.eye(2).to(torch.uint16), TypeError, ["dtype torch.uint16", "!= 0"]),
            ("uint32", torch.eye(2).to(torch.uint32), TypeError, ["dtype torch.uint32"]),
            ("float8", torch.eye(2).to(torch.float8_e4m3fn), TypeError, ["float8_e4m3fn"]),
            (
                "quantized",
                torch.quantize_per_tensor(torch.eye(2), 1.0, 0, torch.quint8),
                TypeError,
                ["torch.quint8"],
            ),
            ("meta", torch.eye(2, device="meta"), ValueError, ["meta tensor", "holds no values"]),
            (
                "nested",
                torch.nested.nested_tensor([torch.ones(2, 2), torch.ones(3, 2)]),
                TypeError,
                ["nested tensor"],
            ),
            (
                "coo index out of range",
                torch.sparse_coo_tensor(
                    torch.tensor([[5], [0]]), v, (2, 2), check_invariants=False
                ),
                ValueError,
                ["sparse pattern is invalid", "check_invariants=True"],
            ),
            (
                "coo negative index",
                torch.sparse_coo_tensor(
                    torch.tensor([[-1], [0]]), v, (2, 2), check_invariants=False
                ),
                ValueError,
                ["sparse pattern is invalid"],
            ),
            (
                "csr column out of range",
                torch.sparse_csr_tensor(
                    torch.tensor([0, 1, 1]), torch.tensor([7]), v, (2, 2), check_invariants=False
                ),
                ValueError,
                ["sparse pattern is invalid"],
            ),
            (
                "broken __array__",
                BrokenArray(),
                TypeError,
                ["could not convert", "no array today"],
            ),
            ("numpy datetime", np.zeros((2, 2), "datetime64[D]"), TypeError, ["datetime64"]),
            ("numpy 3-D", np.ones((2, 2, 2)), ValueError, ["2-D", "(2, 2, 2)"]),
            ("scipy nan", sp.csr_array(np.array([[np.nan, 1.0]])), ValueError, ["only 0 and 1"]),
        ]


@pytest.mark.parametrize(("name", "pattern", "kind", "phrases"), intake_errors())
def test_pattern_intake_errors(
    name: str, pattern: object, kind: type[Exception], phrases: list[str]
) -> None:
    """Both users of the one intake name themselves and say what is wrong."""
    for call, where in [
        (lambda: color_columns(pattern), "jacfd(func, sparsity): "),
        (lambda: jacfd(torch.sin, sparsity=pattern), "jacfd(func, sparsity): "),
        (
            lambda: check_sparsity(torch.sin, pattern, torch.rand(2, dtype=F64)),
            "check_sparsity(func, sparsity): ",
        ),
    ]:
        with pytest.raises(kind) as info:
            call()
        message = str(info.value)
        assert message.startswith(where), message
        for phrase in phrases:
            assert phrase in message, f"{phrase!r} not in {message!r}"


@pytest.mark.parametrize(
    "array",
    [
        np.eye(4, dtype=np.uint64),
        np.eye(4).astype(">f8"),  # byte-swapped
        np.eye(4, dtype=bool)[::-1, ::-1],  # negative strides
    ],
)
def test_numpy_layouts_torch_refuses_are_accepted(array: np.ndarray) -> None:
    coloring = color_columns(array)
    assert coloring.num_colors == 1
    assert coloring.rows.tolist() == coloring.cols.tolist() == [0, 1, 2, 3]


# --- check_sparsity ----------------------------------------------------------------------


def shifted_product(x: torch.Tensor) -> torch.Tensor:
    """out[i] = sin(x[i]) * x[i + 1] (last: sin(x[-1])): diagonal and superdiagonal."""
    return torch.sin(x) * torch.cat([x[1:], torch.ones_like(x[:1])])


def expected_missed(f: Callable[..., Any], pattern: torch.Tensor, *args: Any) -> list[list[int]]:
    """Missed entries from the exact float64 Jacobian (torch.func.jacrev)."""
    exact = torch.func.jacrev(f)(*args)
    return (exact.ne(0) & ~pattern).nonzero().tolist()


def pattern_forms(pattern: torch.Tensor) -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return {
            "bool": pattern,
            "coo": pattern.to_sparse(),
            "csr": pattern.to_sparse_csr(),
            "csc": pattern.to_sparse_csc(),
            "float": pattern.double(),
            "numpy": pattern.numpy(),
            "scipy csr": sp.csr_matrix(pattern.numpy()),
            "scipy coo array": sp.coo_array(pattern.numpy().astype(np.int8)),
        }


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("form", list(pattern_forms(torch.eye(2, dtype=torch.bool))))
def test_check_sparsity_accepts_every_pattern_form(form: str) -> None:
    x = point(5)
    diagonal = torch.eye(5, dtype=torch.bool)
    complete = diagonal | diagonal.roll(1, 1)
    complete[-1, 0] = False
    for pattern, passed in [(diagonal, False), (complete, True)]:
        report = check_sparsity(shifted_product, pattern_forms(pattern)[form], x)
        assert report.missed.tolist() == expected_missed(shifted_product, pattern, x)
        assert report.passed is report.ok is passed


def test_check_sparsity_black_box_with_loop_and_kwargs() -> None:
    """A numpy function fails under vmap, and is checked with strategy='loop'."""

    def simulator(x: torch.Tensor, *, power: float) -> torch.Tensor:
        a = x.numpy()
        return torch.from_numpy(np.cumsum(a**power))  # out[i] depends on x[:i + 1]

    x = point(4)
    kwargs = {"power": 3.0}
    with pytest.raises(RuntimeError, match=r"(?s)^check_sparsity\(.*strategy='loop'"):
        check_sparsity(simulator, diagonal_pattern(4), x, kwargs=kwargs)
    exact = torch.func.jacrev(lambda v: torch.cumsum(v**3, 0))(x)
    lower = torch.ones(4, 4, dtype=torch.bool).tril()
    for strategy, chunk_size in [("loop", None), ("vmap", 1), ("loop", 3)]:
        options = {"strategy": strategy, "chunk_size": chunk_size}
        report = check_sparsity(simulator, lower, x, kwargs=kwargs, **options)  # type: ignore[arg-type]
        assert report.passed
        missed = check_sparsity(simulator, diagonal_pattern(4), x, kwargs=kwargs, **options)  # type: ignore[arg-type]
        assert missed.missed.tolist() == torch.tril(exact, -1).nonzero().tolist()
        torch.testing.assert_close(missed.largest_missed, exact.tril(-1).abs().max().item())


@pytest.mark.parametrize(
    ("scheme", "delta", "tolerance"),
    [
        ("forward", None, 100 * torch.finfo(F64).eps ** 0.5),
        ("backward", 1e-4, 100 * (torch.finfo(F64).eps / 1e-4 + 1e-4)),
        ("complex", None, 100 * torch.finfo(F64).eps),
        ("central", torch.full((5,), 1e-3, dtype=F64), 100 * (torch.finfo(F64).eps / 1e-3 + 1e-6)),
    ],
)
def test_check_sparsity_scheme_and_delta(scheme: str, delta: Any, tolerance: float) -> None:
    x = point(5)
    report = check_sparsity(shifted_product, diagonal_pattern(5), x, scheme=scheme, delta=delta)  # type: ignore[arg-type]
    assert report.missed.tolist() == expected_missed(shifted_product, torch.eye(5).bool(), x)
    exact = torch.func.jacrev(shifted_product)(x)
    # max|J| is the finite-difference one: within the scheme's error of the exact one
    scale = max(1.0, exact.abs().max().item())
    assert report.tolerance == pytest.approx(tolerance * scale, rel=1e-3)


@pytest.mark.parametrize(
    ("func", "x", "shape"),
    [
        (torch.sin, torch.zeros(0, dtype=F64), (0, 0)),
        (lambda v: v.sum() + torch.ones(3, dtype=F64), torch.zeros(0, dtype=F64), (3, 0)),
        (lambda v: v[:0], torch.rand(3, dtype=F64), (0, 3)),
    ],
)
def test_check_sparsity_zero_size(func: Callable[..., Any], x: torch.Tensor, shape: Any) -> None:
    report = check_sparsity(func, np.zeros(shape, dtype=bool), x)
    assert report.passed and report.missed.shape == (0, 2) and report.largest_missed == 0.0
    assert "covers every entry" in str(report)


def test_check_sparsity_pytrees_and_argnums() -> None:
    x, y = point(3), point(2, seed=1)

    def f(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": a.sin(), "b": b.sum(0, keepdim=True) * a[:1]}

    pattern = torch.zeros(4, 5, dtype=torch.bool)  # rows a (3), b (1); columns x (3), y (2)
    pattern[:3, :3] = torch.eye(3, dtype=torch.bool)
    pattern[3, 3:] = True
    report = check_sparsity(f, pattern, x, y, argnums=(0, 1))
    assert report.missed.tolist() == [[3, 0]]  # b depends on x[0] too
    assert not report.passed


ARGUMENT_ERRORS: list[tuple[dict[str, Any], type[Exception], list[str]]] = [
    ({"func": None}, TypeError, ["func must be callable"]),
    ({"kwargs": [("power", 2)]}, TypeError, ["check_sparsity(func, sparsity, kwargs)", "mapping"]),
    ({"kwargs": {1: 2}}, TypeError, ["mapping of names"]),
    ({"sparsity": [[True]]}, TypeError, ["got list", "torch.tensor(..., dtype=torch.bool)"]),
    ({"sparsity": np.eye(3)[None]}, ValueError, ["2-D", "(1, 3, 3)"]),
    ({"sparsity": diagonal_pattern(4)}, ValueError, ["shape (4, 4)", "Jacobian has shape (3, 3)"]),
    ({"scheme": "centre"}, ValueError, ["through jacfd", "unknown scheme"]),
    ({"strategy": "loopy"}, ValueError, ["through jacfd", "unknown strategy"]),
    ({"chunk_size": 0}, ValueError, ["through jacfd", "chunk_size must be positive"]),
    ({"delta": -1.0}, ValueError, ["through jacfd", "delta"]),
    ({"argnums": 2}, ValueError, ["through jacfd", "argnum=2"]),
    ({"args": ()}, ValueError, ["through jacfd", "argnum=0"]),
    ({"func": lambda v: ()}, TypeError, ["through jacfd", "non-empty pytree"]),
]


@pytest.mark.parametrize(("change", "kind", "phrases"), ARGUMENT_ERRORS)
def test_check_sparsity_errors(
    change: dict[str, Any], kind: type[Exception], phrases: list[str]
) -> None:
    call: dict[str, Any] = {"func": torch.sin, "sparsity": diagonal_pattern(3)}
    call["args"] = (torch.rand(3, dtype=F64),)
    call.update(change)
    func, sparsity, args = call.pop("func"), call.pop("sparsity"), call.pop("args")
    with pytest.raises(kind) as info:
        check_sparsity(func, sparsity, *args, **call)
    message = str(info.value)
    assert message.startswith("check_sparsity(func, sparsity"), message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"


def test_errors_of_func_itself_pass_through() -> None:
    def failing(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("my own message")

    with pytest.raises(ValueError, match=r"^my own message$"):
        check_sparsity(failing, diagonal_pattern(2), torch.rand(2, dtype=F64), strategy="loop")
