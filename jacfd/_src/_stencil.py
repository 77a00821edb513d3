"""Finite-difference stencils: offsets and exact weights.

A stencil estimates the ``derivative``-th derivative as
``sum_k weights[k] * f(x + offsets[k] * h) / h**derivative``. Weights are solved
once in exact rational arithmetic (Fornberg's algorithm) and cached, so no
rounding enters before the function values themselves are combined.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from typing_extensions import TypeAlias

Scheme: TypeAlias = Literal["forward", "backward", "central"]
SCHEMES: tuple[str, ...] = ("forward", "backward", "central")


@dataclass(frozen=True)
class Stencil:
    """Offsets (multiples of the step) and exact weights of one stencil.

    The float views (``center_weight``, ``shifted_*``) are derived once here, so
    that no rational arithmetic runs inside a traced or compiled call.
    """

    offsets: tuple[int, ...]
    weights: tuple[Fraction, ...]
    derivative: int
    accuracy: int
    center_weight: float = field(init=False)
    """Weight of ``f(x)`` itself; zero for central first differences."""
    shifted_offsets: tuple[int, ...] = field(init=False)
    """The non-zero offsets with a non-zero weight: one evaluation each."""
    shifted_weights: tuple[float, ...] = field(init=False)

    def __post_init__(self) -> None:
        pairs = [(o, w) for o, w in zip(self.offsets, self.weights) if o != 0 and w != 0]
        center = sum((w for o, w in zip(self.offsets, self.weights) if o == 0), Fraction(0))
        object.__setattr__(self, "center_weight", float(center))
        object.__setattr__(self, "shifted_offsets", tuple(o for o, _ in pairs))
        object.__setattr__(self, "shifted_weights", tuple(float(w) for _, w in pairs))

    @property
    def step_exponent(self) -> float:
        """Exponent ``e`` of the error-balancing step ``h ~ eps**e * scale``.

        Truncation error ~ h**accuracy and rounding error ~ eps / h**derivative
        balance at h ~ eps**(1 / (accuracy + derivative)).
        """
        return 1.0 / (self.accuracy + self.derivative)

    @property
    def accuracy_exponent(self) -> float:
        """At the balanced step the error is ~ eps**(p / (p + q)) relative."""
        return self.accuracy / (self.accuracy + self.derivative)

    @property
    def leading_direction(self) -> int:
        """+1 if the stencil reaches furthest to the right, else -1.

        The step is rounded so that the point in this direction is exact.
        """
        return 1 if max(self.offsets) >= -min(self.offsets) else -1


def fornberg_weights(offsets: tuple[int, ...], derivative: int) -> tuple[Fraction, ...]:
    """Exact weights of the ``derivative``-th derivative at 0 on integer ``offsets``.

    Fornberg (1988), "Generation of finite difference formulas on arbitrarily
    spaced grids", evaluated in ``Fraction`` so the weights are exact.
    """
    n = len(offsets) - 1
    if derivative > n:
        raise ValueError(f"{len(offsets)} points cannot estimate derivative {derivative}")
    grid = [Fraction(o) for o in offsets]
    # c[i][k]: weight of point i for the k-th derivative, updated point by point.
    c = [[Fraction(0)] * (derivative + 1) for _ in grid]
    c[0][0] = Fraction(1)
    c1 = Fraction(1)
    for i in range(1, n + 1):
        c2 = Fraction(1)
        for j in range(i):
            c3 = grid[i] - grid[j]
            c2 *= c3
            for k in range(min(i, derivative), -1, -1):
                previous = c[i - 1][k - 1] if k else Fraction(0)
                c[i][k] = c1 * (k * previous - grid[i - 1] * c[i - 1][k]) / c2
            for k in range(min(i, derivative), -1, -1):
                lower = c[j][k - 1] if k else Fraction(0)
                c[j][k] = (grid[i] * c[j][k] - k * lower) / c3
        c1 = c2
    return tuple(row[derivative] for row in c)


@functools.cache
def get_stencil(scheme: str, accuracy: int | None = None, derivative: int = 1) -> Stencil:
    """The stencil for ``scheme`` with truncation error O(h**accuracy).

    One-sided stencils of accuracy p use the p + derivative points 0, ±1, ...;
    central ones use the symmetric points -m..m (accuracy must be even).
    """
    if scheme == "central":
        accuracy = 2 if accuracy is None else accuracy
        half = (accuracy + derivative - 1) // 2
        offsets = tuple(range(-half, half + 1))
    else:
        accuracy = 1 if accuracy is None else accuracy
        sign = 1 if scheme == "forward" else -1
        offsets = tuple(sign * k for k in range(accuracy + derivative))
    return Stencil(offsets, fornberg_weights(offsets, derivative), derivative, accuracy)
