"""hessfd_with_error (issue 15): the points at h and 2h in one evaluation, the error
estimate against torch.func.hessian in float64 and analytic Hessians, and the options
it shares with hessfd (typical, noise, bounds, has_aux, chunk_size, vmap)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import fd_tolerance
from test_reference import uniform
from test_second import SMOOTH, counting, scalar, two_args, vector
from torch.func import hessian, vmap
from torch.utils._pytree import tree_flatten

from jacfd import hessfd, hessfd_with_error, jacfd_with_error

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

F64 = torch.float64
PARTS = ["full", "diagonal", "laplacian"]
STENCILS = [("central", 2), ("central", 4), ("forward", 1), ("backward", 2)]


def part_of(hess: torch.Tensor, part: str) -> torch.Tensor:
    """The part of a ``(*out, n, n)`` Hessian that ``part`` returns."""
    if part == "full":
        return hess
    diagonal = torch.diagonal(hess, dim1=-2, dim2=-1)
    return diagonal.sum(-1) if part == "laplacian" else diagonal


def assert_bounded(value: Any, error: Any, exact: Any, largest: float) -> list[float]:
    """Every entry within its estimate, every estimate below ``largest`` times
    ``max(1, max|exact|)`` (an estimate, not a blanket); returns the ratios
    estimate / true error."""
    ratios = []
    for v, e, r in zip(tree_flatten(value)[0], tree_flatten(error)[0], tree_flatten(exact)[0]):
        assert v.shape == e.shape == r.shape
        true = (v - r).abs()
        assert bool((true <= e).all()), float((true - e).max())
        scale = max(1.0, float(r.abs().max()))
        assert bool((e >= 0).all()) and float(e.max()) < largest * scale
        ratios += (e[true > 0] / true[true > 0]).tolist()
    return ratios


FUNCS = {"scalar": scalar, "vector": vector, **SMOOTH}


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize(("scheme", "order"), STENCILS)
def test_estimate_bounds_the_error(part: str, scheme: str, order: int) -> None:
    """Against torch.func.hessian in float64, on test_second's functions (measured
    median estimate / error 20-600)."""
    ratios: list[float] = []
    for k, func in enumerate(FUNCS.values()):
        x = uniform((3,), 20 + k, F64, bound=1.0)
        value, error = hessfd_with_error(func, scheme=scheme, order=order, part=part)(x)  # type: ignore[arg-type]
        largest = 30 * fd_tolerance(F64, scheme, 2, order)
        ratios += assert_bounded(value, error, part_of(hessian(func)(x), part), largest)
    assert 1 < torch.tensor(ratios).median() < 1e3


def test_estimate_bounds_the_error_analytic() -> None:
    """``exp(a . x)``: the Hessian ``a a^T exp(a . x)`` in closed form."""
    a = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    x = torch.tensor([0.3, 0.1, -0.2], dtype=F64)
    exact = torch.outer(a, a) * torch.exp(a @ x)
    for part in PARTS:
        value, error = hessfd_with_error(lambda x: torch.exp(a @ x), part=part)(x)  # type: ignore[arg-type]
        assert_bounded(value, error, part_of(exact, part), 1e-6)


@pytest.mark.parametrize(
    ("scheme", "order", "part", "points"),
    [
        ("central", 2, "full", 4 * 3**2 + 1),  # 2 n**2 + 1 at h, the same at 2h, one centre
        ("central", 2, "diagonal", 4 * 3 + 1),
        ("central", 2, "laplacian", 4 * 3 + 1),
        ("central", 4, "full", 1 + 6 * 3 + 28 * 3),  # offsets 2h and (2h, 2h) shared
        ("forward", 1, "full", (3 + 1) ** 2),  # offsets 1, 2, 4 per axis, (1, 1), (2, 2) per pair
        ("forward", 1, "diagonal", 3 * 3 + 1),
    ],
)
def test_one_evaluation(scheme: str, order: int, part: str, points: int) -> None:
    """One call of func (one vmap) for the points at h and 2h, f(x) among them; the
    points one by one with chunk_size=1. (Two runs of hessfd and a call of f took
    2 (2 n**2 + 1) + 1 = 39 points in three calls for the central Hessian, and
    2 (1 + 4 n + 16 n (n - 1) / 2) + 1 = 123 at order 4.)"""
    x = uniform((3,), 7, F64, bound=1.0)
    func, calls = counting(scalar)
    hessfd_with_error(func, scheme=scheme, order=order, part=part)(x)  # type: ignore[arg-type]
    assert calls[0] == 1
    func, calls = counting(scalar)
    options: dict[str, Any] = {"scheme": scheme, "order": order, "part": part, "chunk_size": 1}
    hessfd_with_error(func, **options)(x)
    assert calls[0] == points


def recording(func: Callable[..., Any]) -> tuple[Callable[..., Any], list[torch.Tensor]]:
    """func, and the list of every point it is called at (with strategy="loop")."""
    points: list[torch.Tensor] = []

    def recorded(x: torch.Tensor) -> Any:
        points.append(x.detach().clone())
        return func(x)

    return recorded, points


def half_line(x: torch.Tensor) -> torch.Tensor:
    """Defined for x >= 0 only: log and sqrt curve on a scale of 0.1 at the bound."""
    if bool((x < 0).any()):
        raise AssertionError("evaluated outside the bounds")
    return (torch.log(x + 0.1) + torch.sqrt(x + 0.1) * x.sum()).sum() * torch.cos(x).sum()


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize(("scheme", "order"), [("central", 2), ("central", 4), ("forward", 1)])
def test_bounds_are_respected(part: str, scheme: str, order: int) -> None:
    """Every point inside [0, 2] (x at, near and far from both bounds), and the
    estimate still bounds the error there (one-sided stencils at h and 2h)."""
    x = torch.tensor([0.0, 1e-6, 1e-3, 0.5, 2.0], dtype=F64)
    func, points = recording(half_line)
    value, error = hessfd_with_error(
        func, scheme=scheme, order=order, part=part, bounds=(0.0, 2.0), strategy="loop"
    )(x)  # type: ignore[arg-type]
    every = torch.stack(points)
    assert float(every.min()) >= 0.0 and float(every.max()) <= 2.0
    assert_bounded(value, error, part_of(hessian(half_line)(x), part), 0.1)
    with pytest.raises(ValueError, match=r"^hessfd_with_error\(func, bounds\).*outside"):
        hessfd_with_error(half_line, part=part, bounds=(0.0, 1.0))(x)  # type: ignore[arg-type]


@pytest.mark.parametrize("option", [{"typical": 0.01}, {"noise": 1e-8}, {"delta": 1e-3}])
def test_steps_as_in_hessfd(option: dict[str, Any]) -> None:
    """typical, noise and delta change the steps as they change hessfd's: hessfd's
    points (at h) are among hessfd_with_error's (at h and 2h), and not the default's."""
    x = uniform((3,), 8, F64, bound=0.1)
    func, plain = recording(scalar)
    hessfd(func, strategy="loop", **option)(x)
    func, with_error = recording(scalar)
    _, error = hessfd_with_error(func, strategy="loop", **option)(x)
    func, default = recording(scalar)
    _, default_error = hessfd_with_error(func, strategy="loop")(x)
    assert len(with_error) == 4 * 9 + 1
    mine = {tuple(p.tolist()) for p in with_error}
    assert {tuple(p.tolist()) for p in plain} <= mine
    assert not {tuple(p.tolist()) for p in default} <= mine
    if "noise" in option:  # a noisier func: longer steps and a larger rounding term
        assert bool((error > default_error).all())


def test_composes_with_vmap() -> None:
    """Under vmap, each sample gets what a call on it alone gets, as with hessfd
    (with bounds: its own one-sided columns)."""
    X = uniform((4, 3), 9, F64, bound=1.0).abs()
    for part in PARTS:
        for bounds in (None, (0.0, 1.0)):
            transform = hessfd_with_error(scalar, part=part, bounds=bounds)  # type: ignore[arg-type]
            values, errors = vmap(transform)(X)
            for x, v, e in zip(X, values, errors):
                alone = transform(x)
                torch.testing.assert_close(v, alone[0], rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(e, alone[1], rtol=1e-12, atol=1e-12)
            assert_bounded(values, errors, part_of(vmap(hessian(scalar))(X), part), 1e-4)


def test_layout_aux_and_chunks() -> None:
    """hessfd's layout for pytrees of arguments; aux from the centre point; chunks
    change nothing."""
    x, y = uniform((2,), 10, F64, bound=1.0), uniform((3,), 11, F64, bound=1.0)
    value, error, aux = hessfd_with_error(
        lambda x, y: (two_args(x, y), x.sum()), (0, 1), has_aux=True
    )(x, y)
    exact = hessian(two_args, (0, 1))(x, y)
    assert tree_flatten(value)[1] == tree_flatten(hessfd(two_args, (0, 1))(x, y))[1]
    assert_bounded(value, error, exact, 1e-5)
    assert torch.equal(aux, x.sum())
    whole = hessfd_with_error(scalar)(x)
    for chunk_size in (1, 4):
        chunked = hessfd_with_error(scalar, chunk_size=chunk_size)(x)
        assert all(torch.equal(a, b) for a, b in zip(chunked, whole))


def test_options_checked_when_built() -> None:
    name = r"^hessfd_with_error\(func"
    with pytest.raises(ValueError, match=name + r", part='trace'\)"):
        hessfd_with_error(scalar, part="trace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=name + r", scheme='complex'\)"):
        hessfd_with_error(scalar, scheme="complex")
    with pytest.raises(ValueError, match=name + r", noise='guess'\)"):
        hessfd_with_error(scalar, noise="guess")
    with pytest.raises(TypeError, match=name + r", bounds\): bounds must be a pair"):
        hessfd_with_error(scalar, bounds=0.0)
    with pytest.raises(ValueError, match=name + r", chunk_size=0\)"):
        hessfd_with_error(scalar, chunk_size=0)
    with pytest.raises(ValueError, match=name + r", typical=-1.0\)"):
        hessfd_with_error(scalar, typical=-1.0)


def test_jacfd_with_error_turned_steps() -> None:
    """Near the upper bound the one-sided steps are negative: the rounding term of
    jacfd_with_error's estimate stays positive (it was subtracted before)."""
    x = torch.tensor([1.0 - 1e-9, 0.5], dtype=F64)
    f = lambda x: 1e3 * torch.exp(x)  # noqa: E731
    for scheme in ("central", "forward"):
        jac, error = jacfd_with_error(f, scheme=scheme, bounds=(-math.inf, 1.0))(x)  # type: ignore[arg-type]
        assert bool((error > 0).all())
        assert bool(((jac - torch.diag(f(x))).abs() <= error).all())


def test_noise_estimate_float32_inside() -> None:
    """float32 arithmetic behind float64 casts: at float64-sized steps the Hessian is
    off by ~3 and the estimate misses it; noise="estimate" sizes the steps for the
    float32 noise (error ~2e-4) and the estimate bounds it, per sample under vmap."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x.float()).double().sum() * x.sum()

    X = uniform((3, 4), 12, F64, bound=1.0)
    exact = vmap(hessian(lambda x: torch.sin(x).sum() * x.sum()))(X)
    value, error = hessfd_with_error(f)(X[0])
    assert not bool(((value - exact[0]).abs() <= error).all())
    transform = hessfd_with_error(f, noise="estimate")
    values, errors = vmap(transform)(X)
    assert_bounded(values, errors, exact, 1e-2)
    for x, v, e in zip(X, values, errors):
        assert all(torch.equal(a, b) for a, b in zip((v, e), transform(x)))
