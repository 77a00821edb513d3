"""Contraction: the outputs at a chunk's stencil points -> derivative columns.

A :class:`Contraction` lays a stencil's exact weights over the offsets actually
evaluated, once per transform, so a call only does float arithmetic. Several
contractions may share one evaluation (the steps h and 2h of an error estimate).

Every derivative stencil's weights sum to zero, so the sum is formed from
*differences* of values: ``w_k (f_k - f_0)`` when the centre is evaluated, else
``w_k (f_k - f_-k)`` for antisymmetric pairs. Where ``func`` does not depend on
an input the differences are exactly zero, and so is the derivative.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._stencil import Stencil

CENTER = -1
"""Index of ``f(x)`` in a term; ``NONE`` marks a term with no subtrahend."""
NONE = -2


@dataclass(frozen=True)
class Contraction:
    terms: tuple[tuple[int, int, float], ...]
    """``(k, m, w)``: ``w * (f[k] - f[m])`` with k, m offset indices (or CENTER/NONE)."""
    derivative: int
    imaginary: bool
    absolute: bool = False
    """Contract ``|values|``: with ``|weights|`` this bounds the rounding error."""
    magnitude: float = 0.0
    """The terms' common weight magnitude if they differ only in sign, else 0."""

    simple: bool = field(init=False)
    """One term ``±(f[k] - f(x))`` of a first derivative: forward or backward.
    (A field, not a property: ``contract`` reads it on every call.)"""

    def __post_init__(self) -> None:
        simple = (
            len(self.terms) == 1
            and self.terms[0][1] == CENTER
            and abs(self.terms[0][2]) == 1
            and self.derivative == 1
            and not (self.imaginary or self.absolute)
        )
        object.__setattr__(self, "simple", simple)

    @property
    def needs_center(self) -> bool:
        return any(CENTER in (k, m) for k, m, _ in self.terms)

    @staticmethod
    def of(stencil: Stencil, offsets: tuple[int, ...], absolute: bool = False) -> Contraction:
        """``stencil`` over the evaluated ``offsets`` (the centre is implicit)."""
        if absolute:
            stencil = stencil.absolute()
        weights = {o: stencil.weight(o) for o in offsets if stencil.weight(o)}
        center = stencil.weight(0)
        index = {o: k for k, o in enumerate(offsets)}
        terms: list[tuple[int, int, float]] = []
        if absolute or stencil.imaginary:
            terms = [(index[o], NONE, w) for o, w in weights.items()]
            if center:
                terms.append((CENTER, NONE, center))
        elif center or any(-o not in weights or weights[-o] != -w for o, w in weights.items()):
            terms = [(index[o], CENTER, w) for o, w in weights.items()]
        else:  # antisymmetric, no centre: central first derivatives
            terms = [(index[o], index[-o], w) for o, w in weights.items() if o > 0]
        magnitudes = {abs(w) for _, _, w in terms}
        return Contraction(
            tuple(terms),
            stencil.derivative,
            stencil.imaginary,
            absolute,
            magnitudes.pop() if len(magnitudes) == 1 else 0.0,
        )


def contract(
    values: torch.Tensor,
    center: torch.Tensor | None,
    contraction: Contraction,
    steps: torch.Tensor | None,
    count: int,
    num_offsets: int,
) -> torch.Tensor:
    """``sum_k w_k f(x + o_k h_j e_j) / h_j**q`` for each direction ``j`` of a chunk.

    ``values`` holds one output leaf at the shifted points, offset-major: shape
    ``(num_offsets * count, *out)``. ``center`` is ``f(x)``, if evaluated. Each
    direction is divided by its own step; with ``steps`` None (coloured
    directions, whose columns have different steps) the structure divides
    after decompressing. Returns shape ``(count, *out)``.
    """
    by_offset = (values,) if num_offsets == 1 else torch.unflatten(values, 0, (num_offsets, count))
    if contraction.simple and center is not None:  # forward and backward differences
        k = contraction.terms[0][0]
        h = steps if steps is not None else torch.ones((), dtype=values.dtype)
        h = h if h.dtype == values.dtype else h.to(values.dtype)
        if values.dim() > 1:
            h = h.view(-1, *(1,) * (values.dim() - 1))
        scale = h if contraction.terms[0][2] > 0 else -h
        return torch.sub(by_offset[k], center).div_(scale)

    def value(k: int) -> torch.Tensor:
        if k == CENTER:
            if center is None:
                raise AssertionError("the centre point was not evaluated")
            v = center
        else:
            v = by_offset[k]
        v = v.imag if contraction.imaginary else v
        return v.abs() if contraction.absolute else v

    diffs = [(value(k) - value(m) if m != NONE else value(k), w) for k, m, w in contraction.terms]
    first = diffs[0][0]
    if steps is None:
        h = torch.ones((), dtype=first.dtype, device=first.device)
    else:
        h = steps if steps.dtype == first.dtype else steps.to(first.dtype)
        h = h.view(-1, *(1,) * (first.dim() - 1)) if first.dim() > 1 else h
        h = h**contraction.derivative if contraction.derivative > 1 else h
    if contraction.magnitude:
        # The weights differ only in sign: sum the differences with signs and divide
        # once by h / |w|, a power-of-two scaling for central differences, so the
        # result rounds exactly as (f(x+h) - f(x-h)) / 2h.
        sign = diffs[0][1]
        scale = h / contraction.magnitude if contraction.magnitude != 1 else h
        scale = scale if sign > 0 else -scale
        if len(diffs) == 1:
            return first / scale
        total = torch.add(first, diffs[1][0], alpha=diffs[1][1] / sign)
        for v, w in diffs[2:]:
            total.add_(v, alpha=w / sign)
        return total.div_(scale)
    total = first * diffs[0][1]
    for v, w in diffs[1:]:
        total.add_(v, alpha=w)
    return total.div_(h)
