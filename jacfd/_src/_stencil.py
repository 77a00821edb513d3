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
from typing import TYPE_CHECKING, Literal, TypeAlias, overload

if TYPE_CHECKING:
    import torch

Scheme: TypeAlias = Literal["forward", "backward", "central", "complex"]
SCHEMES: tuple[str, ...] = ("forward", "backward", "central", "complex")
ORDERS: dict[str, tuple[int, ...]] = {
    "forward": (1, 2, 3, 4),
    "backward": (1, 2, 3, 4),
    "central": (2, 4, 6, 8),
    "complex": (2,),
}


@dataclass(frozen=True)
class Stencil:
    """Offsets (multiples of the step) and exact weights of one stencil.

    The float views (``shifted_offsets``, ``step_constant``) are derived once here,
    so that no rational arithmetic runs inside a traced or compiled call.
    """

    offsets: tuple[int, ...]
    weights: tuple[Fraction, ...]
    derivative: int
    accuracy: int
    imaginary: bool = False
    """Complex step: the points are ``x + i o h`` and the imaginary part is used."""
    shifted_offsets: tuple[int, ...] = field(init=False)
    """The non-zero offsets with a non-zero weight: one evaluation each."""
    step_constant: float = field(init=False)
    """``c`` in the automatic step ``h = c * eps**step_exponent * max(1, |x|)``.

    Minimising ``C1 eps / h**q + C2 h**p`` gives ``h = (q C1 eps / (p C2))**(1/(p+q))``
    with ``C1 = sum |w_k|`` (rounding) and ``C2 = |sum w_k o_k**(p+q)| |f^(p+q)| / (p+q)!``
    (truncation). Analytic functions have ``|f^(P)| / P! ~ 1 / r**P`` for the
    distance ``r`` to their nearest singularity; taking ``r ~ 1`` (the scale of
    ``max(1, |x|)``) keeps the wide high-order stencils inside it.
    """

    leading_direction: int = field(init=False)
    """+1 if the stencil reaches furthest to the right, else -1: the step is rounded
    so that the point in this direction is exact."""

    def __post_init__(self) -> None:
        shifted = tuple(o for o, w in zip(self.offsets, self.weights) if o != 0 and w != 0)
        object.__setattr__(self, "shifted_offsets", shifted)
        object.__setattr__(self, "step_constant", self._step_constant())
        leading = 1 if max(self.offsets) >= -min(self.offsets) else -1
        object.__setattr__(self, "leading_direction", leading)

    def _step_constant(self) -> float:
        if self.imaginary:
            return 1.0
        p, q = self.accuracy, self.derivative
        c1 = sum(abs(w) for w in self.weights)
        c2 = abs(sum(w * o ** (p + q) for o, w in zip(self.offsets, self.weights)))
        if c2 == 0:  # a combination with no error term of that order (never for our stencils)
            return 1.0
        step: float = float(q * c1 / (p * c2)) ** (1.0 / (p + q))
        return step

    @property
    def step_exponent(self) -> float:
        """Exponent ``e`` of the error-balancing step ``h ~ eps**e * scale``.

        Truncation error ~ h**accuracy and rounding error ~ eps / h**derivative
        balance at h ~ eps**(1 / (accuracy + derivative)). The complex step has
        no subtraction, hence no rounding error to balance: a step of eps
        makes the truncation error negligible too.
        """
        return 1.0 if self.imaginary else 1.0 / (self.accuracy + self.derivative)

    @overload
    def relative_step(self, precision: float) -> float: ...
    @overload
    def relative_step(self, precision: torch.Tensor) -> torch.Tensor: ...
    def relative_step(self, precision: float | torch.Tensor) -> float | torch.Tensor:
        """The automatic step relative to ``max(1, |x|)``, for values accurate to
        ``precision`` (the dtype's eps for an ordinary function; a tensor for a
        noise level estimated under vmap or torch.compile)."""
        return self.step_constant * precision**self.step_exponent

    @property
    def accuracy_exponent(self) -> float:
        """At the balanced step the error is ~ eps**(p / (p + q)) relative."""
        return 1.0 if self.imaginary else self.accuracy / (self.accuracy + self.derivative)

    def scaled(self, factor: int) -> Stencil:
        """The same formula with every offset times ``factor`` (a step ``factor*h``),
        still normalised by ``h**derivative``."""
        return Stencil(
            tuple(factor * o for o in self.offsets),
            tuple(w / factor**self.derivative for w in self.weights),
            self.derivative,
            self.accuracy,
            self.imaginary,
        )

    def absolute(self) -> Stencil:
        """``|weights|``: contracted with ``|f|`` it bounds the rounding error."""
        return Stencil(
            self.offsets,
            tuple(abs(w) for w in self.weights),
            self.derivative,
            self.accuracy,
            self.imaginary,
        )

    def weight(self, offset: int) -> float:
        return sum((float(w) for o, w in zip(self.offsets, self.weights) if o == offset), 0.0)


def combine(terms: list[tuple[Fraction, Stencil]], accuracy: int) -> Stencil:
    """The exact linear combination ``sum c * stencil`` over the union of offsets."""
    first = terms[0][1]
    offsets = tuple(sorted({o for _, stencil in terms for o in stencil.offsets}))
    weights = tuple(
        sum(
            (c * w for c, st in terms for o2, w in zip(st.offsets, st.weights) if o2 == o),
            Fraction(0),
        )
        for o in offsets
    )
    return Stencil(offsets, weights, first.derivative, accuracy, first.imaginary)


@functools.cache  # exact rational arithmetic: ~1 ms, and every jacfd_with_error asks for it
def richardson(stencil: Stencil) -> tuple[Stencil, Stencil]:
    """From steps h and 2h: the extrapolated stencil (error O(h**(p+1)) or better),
    and the spread ``(D_h - D_2h) / (2**p - 1)`` that estimates D_h's truncation error."""
    p = stencil.accuracy
    gain = Fraction(1, 2**p - 1)
    doubled = stencil.scaled(2)
    extrapolated = combine([(2**p * gain, stencil), (-gain, doubled)], p + 1)
    spread = combine([(gain, stencil), (-gain, doubled)], p)
    return extrapolated, spread


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


def resolve_stencil(name: str, scheme: str, order: int | None, derivative: int = 1) -> Stencil:
    """The validated stencil for a transform's ``scheme`` and ``order`` options."""
    if scheme not in SCHEMES:
        raise ValueError(
            f"{name}(func, scheme={scheme!r}): unknown scheme; choose one of {SCHEMES}."
        )
    if scheme == "complex" and derivative != 1:
        raise ValueError(
            f"{name}(func, scheme='complex'): the complex step gives first derivatives only; "
            "use scheme='central'."
        )
    if order is not None and (
        isinstance(order, bool) or not isinstance(order, int) or order not in ORDERS[scheme]
    ):
        raise ValueError(
            f"{name}(func, scheme={scheme!r}, order={order!r}): order must be one of "
            f"{ORDERS[scheme]} for this scheme (the power of h in the truncation error)."
        )
    return get_stencil(scheme, order, derivative)


@functools.cache
def get_stencil(scheme: str, accuracy: int | None = None, derivative: int = 1) -> Stencil:
    """The stencil for ``scheme`` with truncation error O(h**accuracy).

    One-sided stencils of accuracy p use the p + derivative points 0, ±1, ...;
    central ones use the symmetric points -m..m (accuracy must be even). The
    complex step ``Im f(x + ih) / h`` is second-order accurate from one point.
    """
    if scheme == "complex":
        return Stencil((1,), (Fraction(1),), derivative, 2, imaginary=True)
    if scheme == "central":
        accuracy = 2 if accuracy is None else accuracy
        half = (accuracy + derivative - 1) // 2
        offsets = tuple(range(-half, half + 1))
    else:
        accuracy = 1 if accuracy is None else accuracy
        sign = 1 if scheme == "forward" else -1
        offsets = tuple(sign * k for k in range(accuracy + derivative))
    return Stencil(offsets, fornberg_weights(offsets, derivative), derivative, accuracy)
