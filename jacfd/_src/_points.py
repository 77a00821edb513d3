"""Point sets: where func is evaluated, and how the values become derivatives.

Every transform is one point set run by the one driver (``_driver``):

- :class:`AxisPoints`: a 1-D stencil along every coordinate,
  ``x + o h_j e_j`` (Jacobians, Hessian diagonals, error estimates);
- :class:`ColorPoints`: the same along colours, ``x + o sum_{j of c} h_j e_j``
  (sparse and per-sample Jacobians; the columns come back compressed);
- :class:`~._mixed.MixedPoints` (in ``_mixed``): the 2-D stencils of the full
  Hessian, ``x + a h_i e_i + b h_j e_j``.

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
    reach: tuple[int, int] | None = None
    """The lowest and highest multiple of a step that ``bounds`` must leave room
    for, if more than the point set's own offsets (``jacfd_adaptive``'s rounds)."""

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
            self.pattern(chunk, primals)
            moves = self._moves[chunk]
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

    def pattern(self, chunk: Chunk, primals: list[torch.Tensor]) -> torch.Tensor | None:
        """The first leaf's planned ``(rows, numel)`` offset pattern for ``chunk``
        (for leaves like ``primals``), or None for a batch built by strided adds."""
        if chunk not in self._moves:
            self._moves[chunk] = self._plan_moves(chunk, [p.numel() for p in primals])
            if not self.imaginary:
                self._plan_patterns(chunk, self._moves[chunk], primals)
        return self._patterns.get((chunk, 0))

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
