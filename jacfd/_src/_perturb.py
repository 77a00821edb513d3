"""Stencil points: the batched perturbations of a chunk of coordinates.

All differentiated leaves share one coordinate list (leaf after leaf, each in
row-major order). A chunk of ``count`` coordinates becomes a batch of rows,

    [x]                               if the chunk carries the centre point
    [x + o_1 h_j e_j  for j in chunk]
    ...
    [x + o_S h_j e_j  for j in chunk]

for the stencil's non-zero offsets ``o_1..o_S``. Each leaf is copied once per
row and the steps are added in place along a diagonal view of each offset's
block of rows: no identity matrix, no index tensors, and nothing larger than
the batch itself, is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Chunk:
    """Coordinates ``start:stop`` of the flat coordinate list, and whether the
    batch also carries the unperturbed centre point (as its first row)."""

    start: int
    stop: int
    with_center: bool

    @property
    def count(self) -> int:
        return self.stop - self.start

    def rows(self, num_offsets: int) -> int:
        return int(self.with_center) + num_offsets * self.count


def plan_chunks(
    sizes: list[int], num_offsets: int, need_center: bool, chunk_size: int | None
) -> list[Chunk]:
    """Splits the directions so that no chunk exceeds ``chunk_size`` rows.

    ``sizes`` are the numbers of directions of each differentiated leaf, and no
    chunk spans two leaves: each call then batches only the leaf it perturbs
    and passes the others unbatched, which saves copying every leaf for every
    point (a parameter dict's other weights stay plain matrices). Only the
    first chunk carries the centre point. A chunk holds at least one direction
    even when its stencil has more points than ``chunk_size``; the evaluation
    then splits its rows further.
    """
    if sum(sizes) == 0:
        return [Chunk(0, 0, True)]
    chunks = []
    start, with_center = 0, need_center
    for size in sizes:
        end = start + size
        while start < end:
            if chunk_size is None:
                stop = end
            else:
                stop = min(start + max(1, (chunk_size - int(with_center)) // num_offsets), end)
            chunks.append(Chunk(start, stop, with_center))
            start, with_center = stop, False
    return chunks


def count_calls(chunks: list[Chunk], num_offsets: int, chunk_size: int | None) -> int:
    """How many calls of ``func`` evaluating ``chunks`` takes."""
    if chunk_size is None:
        return len(chunks)
    return sum(-(-chunk.rows(num_offsets) // chunk_size) for chunk in chunks)


def perturb(
    primals: list[torch.Tensor],
    steps: list[torch.Tensor],
    offsets: tuple[int, ...],
    chunk: Chunk,
    imaginary: bool = False,
) -> tuple[list[torch.Tensor], list[int | None]]:
    """The leaves at every row of ``chunk``, with their vmap ``in_dims``.

    A leaf with no coordinate in the chunk is identical in every row, so it is
    passed unbatched (``in_dims`` None) rather than copied. With ``imaginary``
    the perturbed leaves are complex and the steps are added as ``i o h``.
    """
    rows = chunk.rows(len(offsets))
    leaves: list[torch.Tensor] = []
    in_dims: list[int | None] = []
    first = 0
    for leaf, h in zip(primals, steps):
        numel = leaf.numel()
        lo, hi = max(chunk.start - first, 0), min(chunk.stop - first, numel)
        if lo >= hi:  # in complex mode every differentiated leaf is complex
            leaves.append(torch.complex(leaf, torch.zeros_like(leaf)) if imaginary else leaf)
            in_dims.append(None)
        else:
            base = leaf.reshape(1, numel)
            if imaginary:
                base = torch.complex(base, torch.zeros_like(base))
            batch = base.expand(rows, numel).clone(memory_format=torch.contiguous_format)
            # The chunk's coordinates lo..hi of this leaf sit on a diagonal of each
            # offset's block of rows: add the steps along that diagonal view.
            row = first + lo - chunk.start + int(chunk.with_center)
            for k, offset in enumerate(offsets):
                top = row + k * chunk.count
                step = h[lo:hi] * offset if offset != 1 else h[lo:hi]
                diagonal = batch[top : top + hi - lo, lo:hi].diagonal()
                if imaginary:
                    diagonal.imag.add_(step)
                else:
                    diagonal.add_(step)
            leaves.append(batch.view(rows, *leaf.shape))
            in_dims.append(0)
        first += numel
    return leaves, in_dims


def perturb_colors(
    primals: list[torch.Tensor],
    steps: list[torch.Tensor],
    offsets: tuple[int, ...],
    chunk: Chunk,
    colors: torch.Tensor,
    imaginary: bool = False,
) -> tuple[list[torch.Tensor], list[int | None]]:
    """The leaves at every row of a chunk of *colours*: row ``(o, c)`` is
    ``x + o * sum_{j of colour c} h_j e_j``.

    Columns whose colour is outside the chunk are routed to one extra row that
    is dropped, so every shape is static (no masks) and the function traces.
    """
    rows = chunk.rows(len(offsets))
    leaves: list[torch.Tensor] = []
    first = 0
    for leaf, h in zip(primals, steps):
        numel = leaf.numel()
        local = colors[first : first + numel].to(leaf.device) - chunk.start
        inside = (local >= 0) & (local < chunk.count)
        column = torch.arange(numel, device=leaf.device)
        base = leaf.reshape(1, numel)
        step = h
        if imaginary:
            base = torch.complex(base, torch.zeros_like(base))
            step = torch.complex(torch.zeros_like(h), h)
        batch = base.expand(rows + 1, numel).clone(memory_format=torch.contiguous_format)
        for k, offset in enumerate(offsets):
            row = torch.where(inside, local + (int(chunk.with_center) + k * chunk.count), rows)
            batch.view(-1).index_add_(0, row * numel + column, step * offset)
        leaves.append(batch[:rows].view(rows, *leaf.shape))
        first += numel
    return leaves, [0] * len(leaves)
