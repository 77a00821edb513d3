"""The full Hessian's points, ``x + a h_i e_i + b h_j e_j``, and their contractions.

A :class:`MixedStencil` is one contraction of those points: ``hessfd``'s
product stencil, or ``hessfd_with_error``'s extrapolation of the steps ``h`` and
``2h``, its spread and its rounding bound. :class:`MixedPoints` evaluates the
union of the points of its contractions in one point set and contracts them
all in ``finish`` (a pair needs the axis points of other chunks).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from ._points import Blocks, Chunk, Leaves, PointSet, plan_chunks
from ._stencil import Stencil


@dataclass(frozen=True)
class MixedStencil:
    """``H_ii = sum_a w_a f(x + a h_i e_i) / h_i**2`` and
    ``H_ij = sum_{a,b} w_ab f(x + a h_i e_i + b h_j e_j) / (h_i h_j)``."""

    diagonal: tuple[tuple[int, float], ...]
    """``(a, w_a)``: a second-derivative stencil, the centre included."""
    mixed: tuple[tuple[int, int, float], ...]
    """``(a, b, w_ab)``, zero offsets included. A sum of products of derivative
    stencils: the weights sum to zero along every ``a`` and every ``b``."""
    absolute: bool = False
    """Contract ``|f|`` with ``|w|``: the rounding of the stencil's values."""

    @staticmethod
    def product(first: Stencil, second: Stencil) -> MixedStencil:
        """``hessfd``'s: ``second`` on the diagonal, ``first`` times itself off it."""
        w1 = [(o, first.weight(o)) for o in sorted(first.offsets) if first.weight(o)]
        diagonal = tuple((o, second.weight(o)) for o in second.offsets if second.weight(o))
        return MixedStencil(diagonal, tuple((a, b, wa * wb) for a, wa in w1 for b, wb in w1))

    @staticmethod
    def combine(
        terms: list[tuple[Fraction, Stencil, Stencil]], absolute: bool = False
    ) -> MixedStencil:
        """``sum c * product(first, second)`` over ``(c, first, second)``, in exact
        arithmetic: the weights are rounded once."""
        diagonal: dict[int, Fraction] = {}
        mixed: dict[tuple[int, int], Fraction] = {}
        for c, first, second in terms:
            for o, w in zip(second.offsets, second.weights):
                diagonal[o] = diagonal.get(o, Fraction(0)) + c * w
            for a, wa in zip(first.offsets, first.weights):
                for b, wb in zip(first.offsets, first.weights):
                    mixed[a, b] = mixed.get((a, b), Fraction(0)) + c * wa * wb

        def rounded(w: Fraction) -> float:
            return float(abs(w) if absolute else w)

        return MixedStencil(
            tuple((o, rounded(w)) for o, w in sorted(diagonal.items()) if w),
            tuple((a, b, rounded(w)) for (a, b), w in sorted(mixed.items()) if w),
            absolute,
        )


class MixedPoints(PointSet):
    """The points of the full Hessian's 2-D stencils, and their contraction.

    Rows: the centre, then the axis points for each non-zero offset, then for
    each pair ``i < j`` the products of non-zero offsets (terms with a zero
    offset reuse axis points). Only static index arithmetic is used, so the
    tables trace under ``torch.compile``.
    """

    def __init__(
        self,
        n: int,
        stencils: list[MixedStencil],
        device: torch.device,
        chunk_size: int | None,
    ) -> None:
        self.n, self.stencils = n, stencils
        self.axis = sorted(
            {a for s in stencils for a, _ in s.diagonal if a}
            | {o for s in stencils for a, b, _ in s.mixed for o in (a, b) if o}
        )
        self.products = sorted({(a, b) for s in stencils for a, b, _ in s.mixed if a and b})
        self.pairs = torch.triu_indices(n, n, 1, device=device)
        m = self.pairs.shape[1]
        index = torch.arange(n, device=device)
        zeros_n = torch.zeros(n, dtype=torch.long, device=device)
        zero = torch.zeros(1, dtype=torch.long, device=device)

        def tables(axis: list[torch.Tensor], pairs: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([zero, *axis, *pairs])

        def full(value: int, size: int) -> torch.Tensor:
            return torch.full((size,), value, dtype=torch.long, device=device)

        first_pairs = [self.pairs[0]] * len(self.products)
        self.c1 = tables([index] * len(self.axis), first_pairs)
        self.m1 = tables([full(a, n) for a in self.axis], [full(a, m) for a, _ in self.products])
        self.c2 = tables([zeros_n] * len(self.axis), [self.pairs[1]] * len(self.products))
        self.m2 = tables([zeros_n] * len(self.axis), [full(b, m) for _, b in self.products])
        total = self.c1.numel() - 1
        self.chunks = plan_chunks([total], 1, True, chunk_size) if total else [Chunk(0, 0, True)]

    def rows(self, chunk: Chunk) -> int:
        return int(chunk.with_center) + chunk.count

    def build(
        self, chunk: Chunk, primals: list[torch.Tensor], steps: list[torch.Tensor]
    ) -> Leaves:
        """The leaves at the chunk's rows, perturbed on one flat vector."""
        h = torch.cat(steps) if len(steps) > 1 else steps[0]
        start, stop = chunk.start + 1 - int(chunk.with_center), chunk.stop + 1
        flat = torch.cat([p.reshape(-1).to(h.dtype) for p in primals])
        batch = flat.expand(stop - start, self.n).clone(memory_format=torch.contiguous_format)
        base = torch.arange(stop - start, device=flat.device) * self.n
        for coord, multiple in ((self.c1, self.m1), (self.c2, self.m2)) if self.n else ():
            c, mm = coord[start:stop], multiple[start:stop]
            batch.view(-1).index_add_(0, base + c, mm.to(h.dtype) * h[c])
        leaves, first = [], 0
        for p in primals:
            part = batch[:, first : first + p.numel()]
            leaves.append(
                torch.unflatten(part, 1, p.shape).to(p.dtype)
                if p.dim()
                else part[:, 0].to(p.dtype)
            )
            first += p.numel()
        return leaves, [0] * len(leaves)

    def reduce(
        self,
        chunk: Chunk,
        values: list[torch.Tensor],
        center: list[torch.Tensor] | None,
        steps: torch.Tensor,
    ) -> Blocks:
        return [values]  # the pairs need the axis points: contracted in finish

    def finish(
        self, parts: list[Blocks], center: list[torch.Tensor] | None, steps: torch.Tensor
    ) -> Blocks:
        """Per stencil, per output leaf: the ``(n, n, *out)`` Hessian."""
        joined = super().finish(parts, center, steps)[0] if parts[0][0] else []
        if center is None:
            raise AssertionError("the Hessian needs the centre point")
        blocks: Blocks = [[] for _ in self.stencils]
        for k, f0 in enumerate(center):
            values = joined[k] if joined else f0.new_empty((0, *f0.shape))
            f = values.reshape(values.shape[0], f0.numel())
            for stencil, block in zip(self.stencils, blocks):
                block.append(self._hessian(stencil, f, f0.reshape(-1), steps, f0.shape))
        return blocks

    def _hessian(
        self,
        stencil: MixedStencil,
        f: torch.Tensor,
        f0: torch.Tensor,
        steps: torch.Tensor,
        out_shape: torch.Size,
    ) -> torch.Tensor:
        n, i, j = self.n, self.pairs[0], self.pairs[1]
        h = steps.to(f.real.dtype if f.is_complex() else f.dtype)[:, None]
        absolute = stencil.absolute
        if absolute:
            f, f0 = f.abs(), f0.abs()
        raw = {a: f[k * n : (k + 1) * n] for k, a in enumerate(self.axis)}
        # Differences from the centre: exactly zero where func ignores an input.
        axis = {a: v if absolute else v - f0 for a, v in raw.items()}
        terms = [(a, w) for a, w in stencil.diagonal if a or absolute]
        diagonal = sum(w * (axis[a] if a else f0) for a, w in terms) / (h * h)
        m = i.numel()
        start = len(self.axis) * n
        weights = {(a, b): w for a, b, w in stencil.mixed}
        mixed = torch.zeros(m, f.shape[1], dtype=f.dtype, device=f.device)
        for k, (a, b) in enumerate(self.products):
            w = weights.get((a, b))
            if not w:
                continue
            pair = f[start + k * m : start + (k + 1) * m]
            if absolute:
                mixed = mixed + w * pair
                continue
            # The weights of each offset sum to zero, so the stencil is that of the
            # second differences (f(a,b) - f(a,0)) - (f(0,b) - f0): both brackets are
            # bitwise equal where func ignores x_i, and both zero where it ignores x_j,
            # so the entry is exactly zero, as the terms with a zero offset are.
            pair = pair - raw[a][i]
            mixed = mixed + w * (pair - axis[b][j])
        if absolute:  # the terms with a zero offset: the axis points and the centre
            for a, b, w in stencil.mixed:
                if not (a and b):
                    mixed = mixed + w * (raw[a][i] if a else raw[b][j] if b else f0)
        scale = h[i] * h[j]
        mixed = mixed / (scale.abs() if absolute else scale)
        positions = torch.cat([torch.arange(n, device=f.device) * (n + 1), i * n + j, j * n + i])
        entries = torch.cat([diagonal if n else f0.new_empty(0, f.shape[1]), mixed, mixed])
        hessian = torch.zeros(n * n, f.shape[1], dtype=f.dtype, device=f.device)
        return hessian.index_copy(0, positions, entries).reshape(n, n, *out_shape)
