"""Stencil weights: exact, known values, and the moment conditions that define them."""

from __future__ import annotations

from fractions import Fraction
from math import factorial

import pytest

from jacfd._src._stencil import fornberg_weights, get_stencil

F = Fraction


@pytest.mark.parametrize(
    ("scheme", "accuracy", "derivative", "offsets", "weights"),
    [
        ("central", 2, 1, (-1, 0, 1), (F(-1, 2), F(0), F(1, 2))),
        ("central", 4, 1, (-2, -1, 0, 1, 2), (F(1, 12), F(-2, 3), F(0), F(2, 3), F(-1, 12))),
        ("forward", 1, 1, (0, 1), (F(-1), F(1))),
        ("backward", 1, 1, (0, -1), (F(1), F(-1))),
        ("forward", 2, 1, (0, 1, 2), (F(-3, 2), F(2), F(-1, 2))),
        ("central", 2, 2, (-1, 0, 1), (F(1), F(-2), F(1))),
    ],
)
def test_known_weights(
    scheme: str,
    accuracy: int,
    derivative: int,
    offsets: tuple[int, ...],
    weights: tuple[Fraction, ...],
) -> None:
    stencil = get_stencil(scheme, accuracy, derivative)
    assert stencil.offsets == offsets
    assert stencil.weights == weights
    assert stencil.shifted_offsets == tuple(o for o, w in zip(offsets, weights) if o and w)


@pytest.mark.parametrize(
    ("derivative", "offsets"),
    [
        (q, offsets)
        for offsets in [(-1, 0, 1), (0, 1, 2, 3), (-3, -1, 0, 2, 5), (-2, -1, 0, 1, 2)]
        for q in range(1, len(offsets))
    ],
)
def test_moment_conditions(derivative: int, offsets: tuple[int, ...]) -> None:
    """Exact on polynomials of degree < len(offsets): sum_k w_k o_k**m = m! [m == q]."""
    weights = fornberg_weights(offsets, derivative)
    for m in range(len(offsets)):
        moment = sum(w * F(o) ** m for o, w in zip(offsets, weights))
        assert moment == (factorial(m) if m == derivative else 0)


def test_too_few_points() -> None:
    with pytest.raises(ValueError, match="2 points cannot estimate derivative 2"):
        fornberg_weights((0, 1), 2)


def test_default_accuracy_and_step_exponent() -> None:
    assert get_stencil("central").accuracy == 2
    assert get_stencil("central").step_exponent == pytest.approx(1 / 3)
    assert get_stencil("forward").step_exponent == pytest.approx(1 / 2)
    assert get_stencil("backward").leading_direction == -1
    assert get_stencil("central").weight(0) == 0.0
    assert get_stencil("forward").weight(0) == -1.0
