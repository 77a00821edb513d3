"""``bounds=``: stencil points that stay inside ``[lower, upper]``.

scipy's semantics (``approx_derivative(bounds=)``): func is never evaluated
outside the bounds. Per coordinate:

- a one-sided stencil steps towards the side with room: a negative step turns
  a forward stencil into a backward one (the formula divides by the signed
  step), so the order is kept; with room for the whole stencil on neither
  side, it steps towards the larger room with the step shrunk to fit;
- a central stencil keeps its step where both sides have room. Elsewhere the
  transform evaluates a second, one-sided stencil of the same order (at most 4)
  for those coordinates (:class:`OneSided`) and takes their columns from it;
  the central points of those coordinates still shrink to fit, so that no
  point leaves the box. With ``sparsity`` or ``batch_dim`` (colours mix
  coordinates) only the shrinking applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ._stencil import Stencil, get_stencil

if TYPE_CHECKING:
    from ._driver import Columns
    from ._plan import Call, Options, Planner
    from ._points import PointSet
    from ._rule import RuleSpecs

_SAFETY = 8.0
"""A shrunk step leaves this many ulps of the room unused, against rounding."""


def flat_bound(bound: float | torch.Tensor | None, leaf: torch.Tensor) -> torch.Tensor:
    x = leaf.detach()
    if isinstance(bound, torch.Tensor):
        return bound.detach().to(x.dtype).expand(x.shape).reshape(-1)
    value = float(bound) if bound is not None else torch.nan  # (None never reaches here)
    return torch.full((x.numel(),), value, dtype=x.dtype, device=x.device)


def _readable() -> bool:
    return not torch.compiler.is_compiling()


def check_inside(name: str, primals: list[torch.Tensor], specs: RuleSpecs) -> None:
    """Refuses a point outside the bounds (or bounds with lower > upper)."""
    if not _readable():
        return
    for k, leaf in enumerate(primals):
        x = leaf.detach().reshape(-1)
        lo, hi = flat_bound(specs.lower[k], leaf), flat_bound(specs.upper[k], leaf)
        bad = (x < lo) | (x > hi) | (lo > hi)
        try:
            if not bool(bad.any()):
                continue
        except RuntimeError:  # under vmap the values cannot be read
            return
        i = int(torch.nonzero(bad)[0, 0])
        index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), leaf.shape))
        raise ValueError(
            f"{name}(func, bounds): the element {index} = {float(x[i]):.6g} of differentiated "
            f"tensor {k} is outside its bounds [{float(lo[i]):.6g}, {float(hi[i]):.6g}]; "
            "func is never evaluated outside the bounds, so start inside them (or widen them)."
        )


def reach_of(points: PointSet) -> tuple[int, int]:
    """The lowest and highest multiple of a coordinate's step among the points."""
    if points.reach is not None:
        return points.reach
    offsets: tuple[int, ...] | list[int] | None = getattr(points, "offsets", None)
    if offsets is None:
        offsets = getattr(points, "axis", [0])
    values = [0, *offsets]
    return min(values), max(values)


def fit_to_bounds(
    leaf: torch.Tensor,
    h: torch.Tensor,
    lower: float | torch.Tensor | None,
    upper: float | torch.Tensor | None,
    reach: tuple[int, int],
    stencil: Stencil,
) -> torch.Tensor:
    """The steps ``h`` (positive) turned and shrunk so that every point
    ``x + o h`` with ``o`` in ``reach`` is inside the bounds, and rounded so that
    ``x + h`` stays exact."""
    x = leaf.detach().reshape(-1).to(h.dtype)
    lo, hi = flat_bound(lower, leaf).to(h.dtype), flat_bound(upper, leaf).to(h.dtype)
    up, down = hi - x, x - lo
    low, high = reach
    shrink = 1 - _SAFETY * torch.finfo(h.dtype).eps
    if low == -high:  # central: keep the step where it fits, else shrink it
        fits = (high * h <= up) & (high * h <= down)
        h = torch.where(fits, h, torch.minimum(up, down) / high * shrink)
    else:  # one-sided: its natural side, else the other, else the larger room, shrunk
        forward = high > -low
        extent = high if forward else -low
        room, other = (up, down) if forward else (down, up)
        fits, fits_other = extent * h <= room, extent * h <= other
        one = torch.ones_like(h)
        sign = torch.where(fits, one, torch.where(fits_other | (other > room), -one, one))
        size = torch.where(
            fits | fits_other, h, torch.maximum(room, other).clamp_max(torch.finfo(h.dtype).max)
        )
        h = sign * torch.where(fits | fits_other, size, size / extent * shrink)
    h = torch.where(torch.isfinite(h), h, torch.zeros_like(h))
    for _ in range(3):  # exact steps; halve the few that rounding pushed out of the box
        h = (x + h) - x if stencil.leading_direction > 0 else x - (x - h)
        a, b = x + h * high, x + h * low
        out = (torch.maximum(a, b) > hi) | (torch.minimum(a, b) < lo)
        h = torch.where(out, h / 2, h)
    return h


def misfit(
    leaf: torch.Tensor,
    h: torch.Tensor,
    lower: float | torch.Tensor | None,
    upper: float | torch.Tensor | None,
    high: int,
) -> torch.Tensor:
    """Flat mask of the coordinates whose central points do not fit at step ``h``."""
    x = leaf.detach().reshape(-1).to(h.dtype)
    lo, hi = flat_bound(lower, leaf).to(h.dtype), flat_bound(upper, leaf).to(h.dtype)
    return ~((hi - x >= high * h) & (x - lo >= high * h))


class OneSided:
    """The one-sided pass of a central transform with bounds.

    ``build`` makes the transform's planner for given options: it is called with
    the same options but a forward stencil of the same order (at most 4), whose
    steps :func:`fit_to_bounds` turns towards the room.
    """

    def __init__(self, options: Options, build: Callable[[Options], Planner]) -> None:
        stencil = options.stencil
        one_sided = get_stencil("forward", min(stencil.accuracy, 4), stencil.derivative)
        self.options = dataclasses.replace(options, stencil=one_sided)
        self.planner = build(self.options)

    @staticmethod
    def of(options: Options, build: Callable[[Options], Planner]) -> OneSided | None:
        rule, stencil = options.rule, options.stencil
        if rule is None or rule.bounds is None or stencil.imaginary:
            return None
        if min(stencil.offsets) >= 0 or max(stencil.offsets) <= 0:  # already one-sided
            return None
        return OneSided(options, build)

    def merge(
        self,
        call: Call,
        columns: Columns,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        mixed: bool = False,
    ) -> Columns:
        """``columns`` with the columns of the coordinates whose central stencil
        did not fit replaced by one-sided ones (for ``mixed``, the Hessian's
        rows and columns of those coordinates)."""
        from ._driver import run_points

        mask = call.misfit
        if mask is None:
            return columns
        try:
            if _readable() and not bool(mask.any()):
                return columns
        except RuntimeError:  # under vmap: evaluate both, pick per coordinate
            pass
        options = self.options
        if call.noise is not None and options.rule is not None:
            # The same noise level: not estimated a second time.
            options = dataclasses.replace(
                options, rule=dataclasses.replace(options.rule, noise=call.noise)
            )
        other = run_points(self.planner.prepare(args, kwargs), options)
        blocks = []
        for central_block, side_block in zip(columns.blocks, other.blocks):
            merged = []
            for c, s in zip(central_block, side_block):
                if mixed:
                    pick = mask[:, None] | mask[None, :]
                    pick = pick.reshape(*pick.shape, *([1] * (c.dim() - 2)))
                else:
                    pick = mask.reshape(-1, *([1] * (c.dim() - 1)))
                merged.append(torch.where(pick.to(c.device), s, c))
            blocks.append(merged)
        return dataclasses.replace(columns, blocks=blocks)
