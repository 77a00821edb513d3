"""``jacfd_adaptive``'s choice among the steps ``h/4 ... 8h``, per column.

:class:`Selection` holds the derivative estimates of every step evaluated so far
and keeps, per column, the Richardson extrapolation whose error estimate is
smallest (see ``_adaptive`` for the estimate and its floors).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ._stencil import Stencil
from ._with_error import ROUNDING_SAFETY

if TYPE_CHECKING:
    from ._adaptive import _Round
    from ._driver import Columns
    from ._plan import Call

SAFETY = 2.0
"""Factor on the difference between neighbouring extrapolations."""
NOISE_SAFETY = 2.0
"""Factor on the noise measured at the smallest step."""


class Selection:
    """The derivative estimates at every step evaluated so far, per output leaf as
    float64 ``(steps, columns, outputs)``, and the selection among them."""

    def __init__(
        self,
        round_: _Round,
        columns: Columns,
        call: Call,
        stencil: Stencil,
        index: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> None:
        """The columns are the coordinates ``index`` (or all); only the ``valid``
        ones (or all) sample f's noise."""
        self.power, self.derivative = 2**stencil.accuracy, stencil.derivative
        unit = columns.steps.to(torch.float64)
        self.unit = unit if index is None else unit[index]
        self.valid = valid
        self.multiples = list(round_.multiples)
        blocks = columns.blocks[0]
        self.dtypes = [b.dtype for b in blocks]
        self.out_shapes = [b.shape[1:] for b in blocks]
        # The rounding of one evaluation, relative: the coarser of input and output,
        # or func's noise where it is larger.
        eps = max(
            *(torch.finfo(p.dtype).eps for p in call.primals),
            *(torch.finfo(b.dtype).eps for b in blocks if b.dtype.is_floating_point),
            call.plan.output_eps[0],
        )
        noise = call.noise  # (a tensor per sample when estimated under vmap)
        self.eps: float | torch.Tensor = (
            eps
            if noise is None
            else noise.clamp_min(eps)
            if isinstance(noise, torch.Tensor)
            else max(eps, noise)
        )
        self.d, self.a = self._blocks(round_, columns, self.unit)
        self.jacobian: list[torch.Tensor] = []
        self.error: list[torch.Tensor] = []
        self.step = self.unit

    def _blocks(
        self, round_: _Round, columns: Columns, h: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per output leaf: D and sum|w||f|/h as ``(steps, columns, outputs)``; the
        colours' columns are not divided by their steps yet."""
        count = len(round_.multiples)
        scale = h.reshape(1, -1, 1) ** self.derivative
        d, a = [], []
        for k in range(len(columns.blocks[0])):
            stack = [columns.blocks[c][k] for c in range(2 * count)]
            # (flatten, not reshape(n, -1): n is 0 for an input of no elements)
            flat = torch.stack([s.flatten(1) if s.dim() > 1 else s[:, None] for s in stack])
            flat = flat.to(torch.float64)
            d.append(flat[:count] / scale)
            a.append(flat[count:] / scale.abs())  # (a step turned by bounds is negative)
        return d, a

    def add(self, round_: _Round, columns: Columns, todo: torch.Tensor) -> None:
        """Merges the second round's steps for the columns ``todo`` (the other
        columns are dropped from the stacks: they are done)."""
        d, a = self._blocks(round_, columns, self.unit[todo])
        merged = self.multiples + list(round_.multiples)
        order = sorted(range(len(merged)), key=merged.__getitem__)
        self.multiples = [merged[i] for i in order]
        self.d = [torch.cat([old[:, todo], new])[order] for old, new in zip(self.d, d)]
        self.a = [torch.cat([old[:, todo], new])[order] for old, new in zip(self.a, a)]

    def select(self, rtol: float, atol: float, todo: torch.Tensor | None = None) -> torch.Tensor:
        """Keeps each column's best extrapolation (into the columns ``todo``);
        returns which columns have ``max error <= atol + rtol * max|J|``."""
        p, eps = self.power, self.eps
        h = self.unit if todo is None else self.unit[todo]
        scales = torch.tensor(self.multiples[:-1], dtype=torch.float64, device=h.device)
        steps = scales.reshape(-1, 1) * h.reshape(1, -1)  # (K, columns)
        results, errors, scores = [], [], []
        for d, a in zip(self.d, self.a):
            r = (p * d[:-1] - d[1:]) / (p - 1)
            spread = (r[1:] - r[:-1]).abs()
            nearby = torch.maximum(
                torch.cat([spread[:1], spread]), torch.cat([spread, spread[-1:]])
            )
            floor = ROUNDING_SAFETY * eps * (p * a[:-1] + a[1:]) / (p - 1)
            if self.multiples[0] == 1 and d.shape[1] > 0:  # the smallest step: f's noise
                noise = (d[0] - d[1]).abs() * h.abs().reshape(-1, 1)
                if self.valid is not None:
                    valid = self.valid if todo is None else self.valid[todo]
                    noise = torch.where(valid[:, None], noise, torch.zeros_like(noise))
                floor = floor + NOISE_SAFETY * noise.amax(dim=0) / steps.abs()[..., None]
            error = SAFETY * nearby + floor
            results.append(r)
            errors.append(error)
            worst = error.amax(dim=2) if error.shape[2] else error.sum(dim=2)
            scores.append(worst.nan_to_num(torch.inf))
        best = torch.stack(scores).amax(dim=0).argmin(dim=0)  # (columns,)
        jac, err = [], []
        largest = torch.zeros(best.shape, dtype=torch.float64, device=best.device)
        worst = torch.zeros_like(largest)
        for r, e in zip(results, errors):
            index = best.reshape(1, -1, 1).expand(1, *r.shape[1:])
            jac.append(r.gather(0, index)[0])
            err.append(e.gather(0, index)[0])
            if r.shape[2]:
                largest = torch.maximum(largest, jac[-1].abs().amax(dim=1))
                worst = torch.maximum(worst, err[-1].amax(dim=1))
        # Per column, as a norm: an entry that is zero (f ignores the input) keeps
        # its rounding floor, which no relative tolerance of its own would meet.
        done = worst <= atol + rtol * largest
        chosen = steps.gather(0, best.reshape(1, -1))[0]
        if todo is None:
            self.jacobian, self.error, self.step = jac, err, chosen
        else:
            self.jacobian = [j.index_copy(0, todo, new) for j, new in zip(self.jacobian, jac)]
            self.error = [e.index_copy(0, todo, new) for e, new in zip(self.error, err)]
            self.step = self.step.index_copy(0, todo, chosen)
        return done

    def take(self, index: torch.Tensor, other: Selection, mask: torch.Tensor) -> None:
        """The columns ``index`` from ``other`` (whose columns they are) where ``mask``
        (over all columns) is set."""
        pick = mask[index]

        def merge(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            chosen = pick.reshape(-1, *([1] * (theirs.dim() - 1)))
            return mine.index_copy(0, index, torch.where(chosen, theirs, mine[index]))

        self.jacobian = [merge(j, o) for j, o in zip(self.jacobian, other.jacobian)]
        self.error = [merge(e, o) for e, o in zip(self.error, other.error)]
        self.step = merge(self.step, other.step)

    def blocks(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per output leaf, ``(columns, *out)`` in the output's dtype."""
        return [
            v.reshape(v.shape[0], *shape).to(dtype)
            for v, shape, dtype in zip(values, self.out_shapes, self.dtypes)
        ]
