"""Jacobian structures: dense, coloured sparse, and per-sample.

A structure decides, once per call signature, which directions are perturbed
(:meth:`Structure.points`), and lays the resulting columns out
(:meth:`Structure.assemble`). The structured ones perturb several
coordinates at once, one *colour* per evaluation, and decompress
``C[c] = sum_{j of colour c} h_j J[:, j]``:

- :class:`Sparse`: a user's pattern, coloured once (Curtis-Powell-Reid):
  ``J[i, j] = C[color_j, i] / h_j`` on the pattern, zero elsewhere.
- :class:`PerSample`: a batched function whose samples do not interact. An input
  element's colour is its feature index, the same in every sample, so the cost
  is the number of features, whatever the batch size: ``J[b, :, f] = C[f][b] / h[b, f]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.utils._pytree import tree_unflatten

from ._coloring import Coloring
from ._contract import Contraction
from ._driver import Columns
from ._layout import per_argnums, to_torch_func_layout
from ._plan import Call, Options
from ._points import AxisPoints, ColorPoints, PointSet
from ._strategy import Batched, FoldedBatch, Strategy


class Structure:
    """Which directions are perturbed, and how their columns are laid out."""

    def points(
        self,
        options: Options,
        primals: list[torch.Tensor],
        offsets: tuple[int, ...],
        contractions: list[Contraction],
        with_center: bool,
    ) -> tuple[PointSet, Any]:
        raise NotImplementedError

    def assemble(self, options: Options, call: Call, columns: Columns, block: int = 0) -> Any:
        raise NotImplementedError

    def strategy(self, strategy: Strategy) -> Strategy:
        """The strategy that evaluates this structure's points."""
        return strategy


class Dense(Structure):
    """Every coordinate is a direction; the columns need no decompression."""

    def points(
        self,
        options: Options,
        primals: list[torch.Tensor],
        offsets: tuple[int, ...],
        contractions: list[Contraction],
        with_center: bool,
    ) -> tuple[PointSet, Any]:
        sizes = [leaf.numel() for leaf in primals]
        points = AxisPoints(sizes, offsets, contractions, with_center, options.chunk_size)
        return points, None

    def assemble(self, options: Options, call: Call, columns: Columns, block: int = 0) -> Any:
        plan = call.plan
        return to_torch_func_layout(
            columns.blocks[block], columns.out_spec, plan.shapes, plan.spec, options.single_argnum
        )


@dataclass(frozen=True)
class Sparse(Structure):
    """A Jacobian pattern over all output elements x all differentiated input
    elements (each flattened leaf after leaf), coloured once."""

    coloring: Coloring
    sparse_output: bool = False

    def _check(self, where: str, axis: int, size: int) -> None:
        """The pattern must span ``size`` outputs (``axis`` 0) or inputs (1)."""
        if self.coloring.shape[axis] != size:
            kind = ("output", "input")[axis]
            raise ValueError(
                f"{where}(func, sparsity): the pattern has shape {self.coloring.shape}, but "
                f"the Jacobian has {size} {kind} elements (all leaves flattened in pytree "
                f"order): the pattern's shape must be (outputs, inputs)."
            )

    def points(
        self,
        options: Options,
        primals: list[torch.Tensor],
        offsets: tuple[int, ...],
        contractions: list[Contraction],
        with_center: bool,
    ) -> tuple[PointSet, Any]:
        self._check(options.name, 1, sum(leaf.numel() for leaf in primals))
        points = ColorPoints(
            self.coloring.colors,
            self.coloring.num_colors,
            offsets,
            contractions,
            with_center,
            options.chunk_size,
        )
        return points, None

    def assemble(self, options: Options, call: Call, columns: Columns, block: int = 0) -> Any:
        compressed = columns.blocks[block]
        self._check(options.name, 0, sum(c.shape[1:].numel() for c in compressed))
        flat = torch.cat([c.reshape(c.shape[0], c.shape[1:].numel()) for c in compressed], dim=1).T
        steps = columns.steps.to(flat.dtype)
        if self.sparse_output:
            if _under_vmap():
                raise ValueError(
                    f"{options.name}(func, sparsity, sparse_output=True): torch.func.vmap "
                    "cannot batch sparse tensors. Under vmap, use sparse_output=False (the "
                    "dense Jacobian, decompressed from the same few evaluations)."
                )
            cols = self.coloring.cols.to(flat.device)
            values = self.coloring.entries(flat) / steps[cols]
            indices = torch.stack([self.coloring.rows.to(flat.device), cols])
            return torch.sparse_coo_tensor(
                indices, values, self.coloring.shape, is_coalesced=True, check_invariants=False
            )
        dense = self.coloring.decompress(flat) / steps  # (outputs, inputs)
        blocks, first, inputs = [], 0, dense.shape[1]
        for c in compressed:  # each output leaf's rows, as (inputs, *out) columns
            width = c.shape[1:].numel()
            blocks.append(dense[first : first + width].T.reshape(inputs, *c.shape[1:]).to(c.dtype))
            first += width
        plan = call.plan
        return to_torch_func_layout(
            blocks, columns.out_spec, plan.shapes, plan.spec, options.single_argnum
        )


def _under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active around this call."""
    return any(
        interpreter.key() == TransformType.Vmap
        for interpreter in retrieve_all_functorch_interpreters()
    )


@dataclass(frozen=True)
class PerSample(Structure):
    """Per-sample Jacobians along ``batch_dim`` of every input and output leaf."""

    batch_dim: int

    def points(
        self,
        options: Options,
        primals: list[torch.Tensor],
        offsets: tuple[int, ...],
        contractions: list[Contraction],
        with_center: bool,
    ) -> tuple[PointSet, Any]:
        """Each input element's colour is its feature index, offset per leaf."""
        batch = self._batch_size(options.name, primals)
        colors, offset = [], 0
        for leaf in primals:
            d = self.batch_dim % leaf.dim()
            sample = leaf.shape[:d] + leaf.shape[d + 1 :]
            features = sample.numel()  # (not numel // batch: there may be no sample)
            index = torch.arange(offset, offset + features, device=leaf.device).reshape(sample)
            colors.append(index.unsqueeze(d).expand(leaf.shape).reshape(-1))
            offset += features
        points = ColorPoints(
            torch.cat(colors), offset, offsets, contractions, with_center, options.chunk_size
        )
        return points, batch

    def strategy(self, strategy: Strategy) -> Strategy:
        """A real batch folds the points into func's own batch axis, not a new one."""
        if isinstance(strategy, Batched):
            return FoldedBatch(self.batch_dim, strategy.others)
        return strategy

    def _batch_size(self, where: str, primals: list[torch.Tensor]) -> int:
        sizes = set()
        for leaf in primals:
            if not -leaf.dim() <= self.batch_dim < leaf.dim():
                raise ValueError(
                    f"{where}(func, batch_dim={self.batch_dim}): a differentiated tensor of "
                    f"shape {tuple(leaf.shape)} has no dimension {self.batch_dim}."
                )
            sizes.add(leaf.shape[self.batch_dim])
        if len(sizes) != 1:
            raise ValueError(
                f"{where}(func, batch_dim={self.batch_dim}): the differentiated tensors "
                f"have different batch sizes {sorted(sizes)} along dim {self.batch_dim}."
            )
        return sizes.pop()

    def assemble(self, options: Options, call: Call, columns: Columns, block: int = 0) -> Any:
        """Each (output, input) leaf pair as ``(B, *out_sample, *in_sample)``."""
        where, batch, steps = options.name, call.plan.extra, columns.steps
        per_output = []
        for c in columns.blocks[block]:  # (features, *out)
            out_dim = self.batch_dim % (c.dim() - 1) if c.dim() > 1 else -1
            if c.dim() == 1 or c.shape[1 + out_dim] != batch:
                raise ValueError(
                    f"{where}(func, batch_dim={self.batch_dim}): func returned an output of "
                    f"shape {tuple(c.shape[1:])} without the batch of {batch} samples at "
                    f"dim {self.batch_dim}. Per-sample Jacobians need every output batched "
                    "like the inputs."
                )
            by_sample = c.movedim(1 + out_dim, 1)  # (features, B, *out_sample)
            jacobians, offset, first = [], 0, 0
            for shape in call.plan.shapes:
                d = self.batch_dim % len(shape)
                features = (shape[:d] + shape[d + 1 :]).numel()
                h = steps[first : first + shape.numel()].reshape(shape).movedim(d, 0)
                h = h.reshape(batch, features).t().to(c.dtype)  # (features, B)
                part = by_sample[offset : offset + features]
                part = part / h.reshape(features, batch, *([1] * (part.dim() - 2)))
                part = part.movedim(0, -1)  # (B, *out_sample, features)
                sample_shape = shape[:d] + shape[d + 1 :]
                jacobians.append(
                    torch.unflatten(part, -1, sample_shape)
                    if len(sample_shape)
                    else part.squeeze(-1)
                )
                offset += features
                first += shape.numel()
            per_output.append(per_argnums(jacobians, call.plan.spec, options.single_argnum))
        return tree_unflatten(per_output, columns.out_spec)
