"""Stencil points: the batched perturbations of a chunk of coordinates.

All differentiated leaves share one coordinate list (leaf after leaf, each in
row-major order). A chunk of ``count`` coordinates becomes a batch of rows,

    [x]                               if the chunk carries the centre point
    [x + o_1 h_j e_j  for j in chunk]
    ...
    [x + o_S h_j e_j  for j in chunk]

for the stencil's non-zero offsets ``o_1..o_S``. Each leaf is copied once per
row and the steps are added in place at their ``rows x numel`` positions: no
identity matrix, and nothing larger than the batch itself, is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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
    num_coordinates: int, num_offsets: int, need_center: bool, chunk_size: int | None
) -> list[Chunk]:
    """Splits the coordinates so that no chunk exceeds ``chunk_size`` rows.

    Only the first chunk carries the centre point. A chunk holds at least one
    coordinate even when its stencil has more points than ``chunk_size``; the
    evaluation then splits its rows further.
    """
    if num_coordinates == 0:
        return [Chunk(0, 0, True)]
    if chunk_size is None:
        return [Chunk(0, num_coordinates, need_center)]
    chunks = []
    start, with_center = 0, need_center
    while start < num_coordinates:
        per_chunk = max(1, (chunk_size - int(with_center)) // num_offsets)
        stop = min(start + per_chunk, num_coordinates)
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
) -> tuple[list[torch.Tensor], list[Optional[int]]]:
    """The leaves at every row of ``chunk``, with their vmap ``in_dims``.

    A leaf with no coordinate in the chunk is identical in every row, so it is
    passed unbatched (``in_dims`` None) rather than copied. With ``imaginary``
    the perturbed leaves are complex and the steps are added as ``i o h``.
    """
    rows = chunk.rows(len(offsets))
    leaves: list[torch.Tensor] = []
    in_dims: list[Optional[int]] = []
    first = 0
    for leaf, h in zip(primals, steps):
        numel = leaf.numel()
        lo, hi = max(chunk.start - first, 0), min(chunk.stop - first, numel)
        if lo >= hi:
            leaves.append(leaf)
            in_dims.append(None)
        else:
            device = leaf.device
            cols = torch.arange(lo, hi, device=device)
            row_of_col = cols + (first - chunk.start + int(chunk.with_center))
            row_shift = torch.arange(len(offsets), device=device) * chunk.count
            index = (row_of_col + row_shift[:, None]) * numel + cols
            scale = torch.tensor(offsets, dtype=leaf.dtype, device=device)
            values = scale[:, None] * h[lo:hi]
            base = leaf.reshape(1, numel)
            if imaginary:
                values = torch.complex(torch.zeros_like(values), values)
                base = torch.complex(base, torch.zeros_like(base))
            batch = base.expand(rows, numel).clone(memory_format=torch.contiguous_format)
            batch.view(-1).index_add_(0, index.reshape(-1), values.reshape(-1))
            leaves.append(batch.view(rows, *leaf.shape))
            in_dims.append(0)
        first += numel
    return leaves, in_dims
