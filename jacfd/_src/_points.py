"""Point sets: where func is evaluated, and how the values become derivatives.

Every transform is one point set run by the one driver (``_driver``):

- :class:`AxisPoints`: a 1-D stencil along every coordinate,
  ``x + o h_j e_j`` (Jacobians, Hessian diagonals, error estimates);
- :class:`ColorPoints`: the same along colours, ``x + o sum_{j of c} h_j e_j``
  (sparse and per-sample Jacobians; the columns come back compressed);
- :class:`MixedPoints`: the 2-D stencils of the full Hessian,
  ``x + a h_i e_i + b h_j e_j``.

A point set is planned once per call signature. ``build`` perturbs a chunk of
its rows (each leaf copied once per row, steps added along diagonal views or
by static index arithmetic: no identity matrix, and shapes trace under
``torch.compile``); ``reduce`` turns a chunk's values into columns, and
``finish`` joins the chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._contract import Contraction, contract
from ._stencil import Stencil

Leaves = tuple[list[torch.Tensor], list[int | None]]
Blocks = list[list[torch.Tensor]]
"""Per contraction, per output leaf: ``(directions, *out)`` columns."""


@dataclass(frozen=True)
class Chunk:
    """Directions ``start:stop`` and whether the batch also carries the centre
    point (as its first row)."""

    start: int
    stop: int
    with_center: bool

    @property
    def count(self) -> int:
        return self.stop - self.start


def plan_chunks(
    sizes: list[int], per_direction: int, with_center: bool, chunk_size: int | None
) -> list[Chunk]:
    """Splits the directions so that no chunk exceeds ``chunk_size`` rows.

    No chunk spans two leaves (``sizes``): each call then batches only the leaf
    it perturbs and passes the others unbatched. Only the first chunk carries
    the centre. A chunk holds at least one direction; the evaluation splits
    its rows further if it has more than ``chunk_size``.
    """
    if sum(sizes) == 0:
        return [Chunk(0, 0, True)]
    chunks, start = [], 0
    for size in sizes:
        end = start + size
        while start < end:
            stop = end
            if chunk_size is not None:
                stop = min(start + max(1, (chunk_size - int(with_center)) // per_direction), end)
            chunks.append(Chunk(start, stop, with_center))
            start, with_center = stop, False
    return chunks


class PointSet:
    """The interface of a set of stencil points (see the module docstring)."""

    chunks: list[Chunk]
    imaginary: bool = False
    shares_leaves: bool = False
    """Whether some chunk passes an unperturbed differentiated leaf as it is."""

    def rows(self, chunk: Chunk) -> int:
        raise NotImplementedError

    def build(
        self, chunk: Chunk, primals: list[torch.Tensor], steps: list[torch.Tensor]
    ) -> Leaves:
        raise NotImplementedError

    def reduce(
        self,
        chunk: Chunk,
        values: list[torch.Tensor],
        center: list[torch.Tensor] | None,
        steps: torch.Tensor,
    ) -> Blocks:
        raise NotImplementedError

    def finish(
        self, parts: list[Blocks], center: list[torch.Tensor] | None, steps: torch.Tensor
    ) -> Blocks:
        """Joins the chunks' columns."""
        if len(parts) == 1:
            return parts[0]
        return [
            [torch.cat(p) if len(p) > 1 else p[0] for p in zip(*per_chunk)]
            for per_chunk in zip(*parts)
        ]


SMALL_BATCH = 4096
"""Batches up to this many elements are built from a planned pattern of offsets."""


class AxisPoints(PointSet):
    """``x + o h_j e_j`` for the stencil's offsets and every coordinate ``j``."""

    shares_leaves = True
    """A chunk passes the leaves it does not perturb as they are (not copied)."""

    def __init__(
        self,
        sizes: list[int],
        offsets: tuple[int, ...],
        contractions: list[Contraction],
        with_center: bool,
        chunk_size: int | None,
    ) -> None:
        self.offsets, self.contractions = offsets, contractions
        self.imaginary = contractions[0].imaginary
        self.chunks = plan_chunks(sizes, len(offsets), with_center, chunk_size)
        self._moves: dict[Chunk, list[tuple[int, int, int, list[tuple[int, int, int]]] | None]]
        self._moves = {}
        self._patterns: dict[tuple[Chunk, int], torch.Tensor] = {}

    def rows(self, chunk: Chunk) -> int:
        return int(chunk.with_center) + len(self.offsets) * chunk.count

    def build(
        self, chunk: Chunk, primals: list[torch.Tensor], steps: list[torch.Tensor]
    ) -> Leaves:
        """A leaf with no coordinate in the chunk is identical in every row, so it
        is passed unbatched (``in_dims`` None) rather than copied."""
        moves = self._moves.get(chunk)
        if moves is None:
            moves = self._moves[chunk] = self._plan_moves(chunk, [p.numel() for p in primals])
            if not self.imaginary:
                self._plan_patterns(chunk, moves, primals)
        rows = self.rows(chunk)
        leaves: list[torch.Tensor] = []
        in_dims: list[int | None] = []
        for index, (leaf, h, move) in enumerate(zip(primals, steps, moves)):
            if move is None:
                # The complex step makes every differentiated leaf complex.
                leaves.append(
                    torch.complex(leaf, torch.zeros_like(leaf)) if self.imaginary else leaf
                )
                in_dims.append(None)
                continue
            numel, lo, hi, diagonals = move
            base = leaf.reshape(1, numel)
            pattern = self._patterns.get((chunk, index))
            if pattern is not None and pattern.dtype == h.dtype and pattern.device == h.device:
                # Small batches: x + (offset pattern) * h in one kernel, the same values
                # as the copy and the strided adds below.
                batch = torch.addcmul(base, pattern, h)
                leaves.append(batch.view(rows, *leaf.shape) if leaf.dim() != 1 else batch)
                in_dims.append(0)
                continue
            if self.imaginary:
                base = torch.complex(base, torch.zeros_like(base))
            batch = base.expand(rows, numel).clone(memory_format=torch.contiguous_format)
            flat = batch.view(-1)
            step = h[lo:hi] if hi - lo < numel else h
            for start, stop, offset in diagonals:
                diagonal = flat[start : stop : numel + 1]
                (diagonal.imag if self.imaginary else diagonal).add_(
                    step * offset if offset != 1 else step
                )
            leaves.append(batch.view(rows, *leaf.shape) if leaf.dim() != 1 else batch)
            in_dims.append(0)
        return leaves, in_dims

    def _plan_patterns(
        self,
        chunk: Chunk,
        moves: list[tuple[int, int, int, list[tuple[int, int, int]]] | None],
        primals: list[torch.Tensor],
    ) -> None:
        """For batches of at most ``SMALL_BATCH`` elements, the dense ``(rows, numel)``
        pattern of offsets, so that ``build`` is one ``addcmul``: a few kernels fewer
        on the tiny calls where their dispatch is most of the cost."""
        rows = self.rows(chunk)
        for index, (leaf, move) in enumerate(zip(primals, moves)):
            if move is None or rows * move[0] > SMALL_BATCH:
                continue
            numel, _, _, diagonals = move
            pattern = torch.zeros(rows * numel, dtype=leaf.dtype, device=leaf.device)
            for start, stop, offset in diagonals:
                pattern[start : stop : numel + 1] = offset
            self._patterns[(chunk, index)] = pattern.view(rows, numel)

    def _plan_moves(
        self, chunk: Chunk, numels: list[int]
    ) -> list[tuple[int, int, int, list[tuple[int, int, int]]] | None]:
        """Per leaf: None if the chunk has none of its coordinates, else its size,
        the chunk's coordinates ``lo:hi`` in it, and for each offset the strided
        slice of the flat batch that is the diagonal of that offset's block of rows
        (row of the offset's first direction, column lo)."""
        moves: list[tuple[int, int, int, list[tuple[int, int, int]]] | None] = []
        first = 0
        for numel in numels:
            lo, hi = max(chunk.start - first, 0), min(chunk.stop - first, numel)
            if lo >= hi:
                moves.append(None)
            else:
                row = first + lo - chunk.start + int(chunk.with_center)
                diagonals = []
                for k, offset in enumerate(self.offsets):
                    top = (row + k * chunk.count) * numel + lo
                    diagonals.append((top, top + (hi - lo) * (numel + 1), offset))
                moves.append((numel, lo, hi, diagonals))
            first += numel
        return moves

    def direction_steps(self, chunk: Chunk, steps: torch.Tensor) -> torch.Tensor | None:
        whole = chunk.start == 0 and chunk.stop == steps.shape[0]
        return steps if whole else steps[chunk.start : chunk.stop]  # (a slice is a kernel)

    def reduce(
        self,
        chunk: Chunk,
        values: list[torch.Tensor],
        center: list[torch.Tensor] | None,
        steps: torch.Tensor,
    ) -> Blocks:
        h = self.direction_steps(chunk, steps)
        return [
            [
                contract(
                    v, None if center is None else center[k], c, h, chunk.count, len(self.offsets)
                )
                for k, v in enumerate(values)
            ]
            for c in self.contractions
        ]


class ColorPoints(AxisPoints):
    """``x + o sum_{j of colour c} h_j e_j``: one direction per colour.

    Columns whose colour is outside the chunk are routed to one extra row that
    is dropped, so every shape is static (no masks) and the function traces.
    """

    def __init__(
        self,
        colors: torch.Tensor,
        num_colors: int,
        offsets: tuple[int, ...],
        contractions: list[Contraction],
        with_center: bool,
        chunk_size: int | None,
    ) -> None:
        super().__init__([num_colors], offsets, contractions, with_center, chunk_size)
        self.colors = colors

    def build(
        self, chunk: Chunk, primals: list[torch.Tensor], steps: list[torch.Tensor]
    ) -> Leaves:
        rows = self.rows(chunk)
        leaves: list[torch.Tensor] = []
        first = 0
        for leaf, h in zip(primals, steps):
            numel = leaf.numel()
            local = self.colors[first : first + numel].to(leaf.device) - chunk.start
            first += numel
            inside = (local >= 0) & (local < chunk.count)
            column = torch.arange(numel, device=leaf.device)
            base, step = leaf.reshape(1, numel), h
            if self.imaginary:
                base = torch.complex(base, torch.zeros_like(base))
                step = torch.complex(torch.zeros_like(h), h)
            batch = base.expand(rows + 1, numel).clone(memory_format=torch.contiguous_format)
            for k, offset in enumerate(self.offsets):
                row = torch.where(inside, local + (int(chunk.with_center) + k * chunk.count), rows)
                batch.view(-1).index_add_(0, row * numel + column, step * offset)
            leaves.append(batch[:rows].view(rows, *leaf.shape))
        return leaves, [0] * len(leaves)

    shares_leaves = False  # every leaf is batched

    def direction_steps(self, chunk: Chunk, steps: torch.Tensor) -> torch.Tensor | None:
        return None  # a colour's columns have different steps: divided on decompression


class MixedPoints(PointSet):
    """The points of the full Hessian's 2-D stencils, and their contraction.

    With the first- and second-derivative stencils ``s1``, ``s2`` of the same
    scheme and order: ``H_ii = sum_a s2_a f(x + a h_i e_i) / h_i**2`` and
    ``H_ij = sum_{a,b} s1_a s1_b f(x + a h_i e_i + b h_j e_j) / (h_i h_j)``, a
    product stencil with the same order of accuracy. Rows: the centre, then the
    axis points for each offset, then for each pair ``i < j`` the products of
    non-zero offsets (terms with a zero offset reuse axis points). Only static
    index arithmetic is used, so the tables trace under ``torch.compile``.
    """

    def __init__(
        self, n: int, first: Stencil, second: Stencil, device: torch.device, chunk_size: int | None
    ) -> None:
        self.n = n
        w1 = {o: first.weight(o) for o in first.offsets if first.weight(o)}
        self.w2 = {o: second.weight(o) for o in second.offsets if second.weight(o)}
        self.w1 = w1
        self.axis = sorted({o for o in (*w1, *self.w2) if o})
        self.products = [(a, b) for a in sorted(w1) if a for b in sorted(w1) if b]
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
        joined = super().finish(parts, center, steps)[0] if parts[0][0] else []
        if center is None:
            raise AssertionError("the Hessian needs the centre point")
        blocks = []
        for k, f0 in enumerate(center):
            values = joined[k] if joined else f0.new_empty((0, *f0.shape))
            blocks.append(
                self._hessian(
                    values.reshape(values.shape[0], f0.numel()), f0.reshape(-1), steps, f0.shape
                )
            )
        return [blocks]

    def _hessian(
        self, f: torch.Tensor, f0: torch.Tensor, steps: torch.Tensor, out_shape: torch.Size
    ) -> torch.Tensor:
        n, i, j = self.n, self.pairs[0], self.pairs[1]
        h = steps.to(f.real.dtype if f.is_complex() else f.dtype)[:, None]
        # Differences from the centre: exactly zero where func ignores an input.
        axis = {a: f[k * n : (k + 1) * n] - f0 for k, a in enumerate(self.axis)}
        diagonal = sum(w * axis[a] for a, w in self.w2.items() if a) / (h * h)
        m = i.numel()
        start = len(self.axis) * n
        raw = {a: f[k * n : (k + 1) * n] for k, a in enumerate(self.axis)}
        mixed = torch.zeros(m, f.shape[1], dtype=f.dtype, device=f.device)
        for k, (a, b) in enumerate(self.products):
            # The weights of each offset sum to zero, so the product stencil is that of
            # the second differences (f(a,b) - f(a,0)) - (f(0,b) - f0): both brackets are
            # bitwise equal where func ignores x_i, and both zero where it ignores x_j,
            # so the entry is exactly zero, as the terms with a zero offset are.
            pair = f[start + k * m : start + (k + 1) * m] - raw[a][i]
            mixed = mixed + self.w1[a] * self.w1[b] * (pair - axis[b][j])
        mixed = mixed / (h[i] * h[j])
        positions = torch.cat([torch.arange(n, device=f.device) * (n + 1), i * n + j, j * n + i])
        entries = torch.cat([diagonal if n else f0.new_empty(0, f.shape[1]), mixed, mixed])
        hessian = torch.zeros(n * n, f.shape[1], dtype=f.dtype, device=f.device)
        return hessian.index_copy(0, positions, entries).reshape(n, n, *out_shape)
