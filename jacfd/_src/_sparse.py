"""Structured Jacobians: compression by column colouring, and per-sample Jacobians.

Both perturb several coordinates at once, one *colour* per evaluation, and
decompress the compressed columns ``C[c] = sum_{j of colour c} h_j J[:, j]``:

- ``Sparsity``: a user's pattern, coloured once (Curtis-Powell-Reid). ``J[i, j]
  = C[color_j, i] / h_j`` on the pattern, zero elsewhere.
- ``PerSample``: a batched function whose samples do not interact. The colour of
  an input element is its feature index, the same in every sample, so the cost
  is the number of features, whatever the batch size, and ``J[b, :, f] =
  C[f][b] / h[b, f]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_unflatten

from ._coloring import Coloring
from ._layout import per_argnums, to_torch_func_layout


@dataclass(frozen=True)
class Sparsity:
    """A Jacobian pattern over all output elements x all differentiated input
    elements (each flattened leaf after leaf), coloured once."""

    coloring: Coloring

    def check(self, name: str, axis: int, size: int) -> None:
        """The pattern must span ``size`` outputs (``axis`` 0) or inputs (1)."""
        if self.coloring.shape[axis] != size:
            kind = ("output", "input")[axis]
            raise ValueError(
                f"{name}(func, sparsity): the pattern has shape {self.coloring.shape}, but "
                f"the Jacobian has {size} {kind} elements (all leaves flattened in pytree "
                f"order): the pattern's shape must be (outputs, inputs)."
            )

    def sparse(self, compressed: list[torch.Tensor], steps: torch.Tensor) -> torch.Tensor:
        """The ``(outputs, inputs)`` Jacobian as a coalesced sparse COO tensor.
        ``compressed`` holds each output leaf's ``(num_colors, *out)`` columns."""
        flat = _outputs_by_color(compressed)
        cols = self.coloring.cols.to(flat.device)
        values = self.coloring.entries(flat) / steps[cols].to(flat.dtype)
        indices = torch.stack([self.coloring.rows.to(flat.device), cols])
        return torch.sparse_coo_tensor(
            indices, values, self.coloring.shape, is_coalesced=True, check_invariants=False
        )

    def layout(
        self,
        compressed: list[torch.Tensor],
        steps: torch.Tensor,
        out_spec: TreeSpec,
        primals: list[torch.Tensor],
        primals_spec: TreeSpec,
        single_argnum: bool,
    ) -> Any:
        """The decompressed, dense Jacobian in ``torch.func`` layout."""
        flat = _outputs_by_color(compressed)
        dense = self.coloring.decompress(flat) / steps.to(flat.dtype)  # (outputs, inputs)
        columns, first = [], 0
        for c in compressed:  # each output leaf's rows, as (inputs, *out) columns
            width = c[0].numel()
            columns.append(dense[first : first + width].T.reshape(-1, *c.shape[1:]).to(c.dtype))
            first += width
        return to_torch_func_layout(columns, out_spec, primals, primals_spec, single_argnum)


def _outputs_by_color(compressed: list[torch.Tensor]) -> torch.Tensor:
    """``(outputs, num_colors)``: every output leaf's compressed columns, stacked."""
    return torch.cat([c.reshape(c.shape[0], -1) for c in compressed], dim=1).T


@dataclass(frozen=True)
class PerSample:
    """Per-sample Jacobians along ``batch_dim`` of every input and output leaf."""

    batch_dim: int

    def colors(self, name: str, primals: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Each input element's colour: its feature index, offset per leaf."""
        batch = self.batch_size(name, primals)
        colors, offset = [], 0
        for leaf in primals:
            d = self.batch_dim % leaf.dim()
            sample = leaf.shape[:d] + leaf.shape[d + 1 :]
            features = torch.arange(offset, offset + leaf.numel() // batch).reshape(sample)
            colors.append(features.unsqueeze(d).expand(leaf.shape).reshape(-1))
            offset += leaf.numel() // batch
        return torch.cat(colors), offset

    def batch_size(self, name: str, primals: list[torch.Tensor]) -> int:
        sizes = set()
        for leaf in primals:
            if not -leaf.dim() <= self.batch_dim < leaf.dim():
                raise ValueError(
                    f"{name}(func, batch_dim={self.batch_dim}): a differentiated tensor of "
                    f"shape {tuple(leaf.shape)} has no dimension {self.batch_dim}."
                )
            sizes.add(leaf.shape[self.batch_dim])
        if len(sizes) != 1:
            raise ValueError(
                f"{name}(func, batch_dim={self.batch_dim}): the differentiated tensors "
                f"have different batch sizes {sorted(sizes)} along dim {self.batch_dim}."
            )
        return sizes.pop()

    def layout(
        self,
        name: str,
        compressed: list[torch.Tensor],
        steps: torch.Tensor,
        out_spec: TreeSpec,
        primals: list[torch.Tensor],
        primals_spec: TreeSpec,
        single_argnum: bool,
    ) -> Any:
        """Each (output, input) leaf pair as ``(B, *out_sample, *in_sample)``."""
        batch = self.batch_size(name, primals)
        per_output = []
        for c in compressed:  # (features, *out)
            out_dim = self.batch_dim % (c.dim() - 1) if c.dim() > 1 else -1
            if c.dim() == 1 or c.shape[1 + out_dim] != batch:
                raise ValueError(
                    f"{name}(func, batch_dim={self.batch_dim}): func returned an output of "
                    f"shape {tuple(c.shape[1:])} without the batch of {batch} samples at "
                    f"dim {self.batch_dim}. Per-sample Jacobians need every output batched "
                    "like the inputs."
                )
            by_sample = c.movedim(1 + out_dim, 1)  # (features, B, *out_sample)
            jacobians, offset, first = [], 0, 0
            for leaf in primals:
                d = self.batch_dim % leaf.dim()
                features = leaf.numel() // batch
                h = steps[first : first + leaf.numel()].reshape(leaf.shape).movedim(d, 0)
                h = h.reshape(batch, features).t().to(c.dtype)  # (features, B)
                block = by_sample[offset : offset + features]
                block = block / h.reshape(features, batch, *([1] * (block.dim() - 2)))
                block = block.movedim(0, -1)  # (B, *out_sample, features)
                sample_shape = leaf.shape[:d] + leaf.shape[d + 1 :]
                jacobians.append(
                    torch.unflatten(block, -1, sample_shape)
                    if len(sample_shape)
                    else block.squeeze(-1)
                )
                offset += features
                first += leaf.numel()
            per_output.append(per_argnums(jacobians, primals_spec, single_argnum))
        return tree_unflatten(per_output, out_spec)
