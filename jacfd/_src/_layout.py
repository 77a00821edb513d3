"""The ``torch.func`` layout: derivative columns -> jacrev's and hessian's pytrees.

``to_torch_func_layout`` arranges the ``(n, *out)`` columns of all directions
exactly as ``torch.func.jacrev`` does (views, no copies).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

ONE_TENSOR = tree_flatten((0,))[1]
"""The spec of one differentiated argument that is a bare tensor."""


def split_dim(tensor: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """Splits ``dim`` into ``shape``; a 0-dim ``shape`` removes it, and a 1-dim
    one leaves it as it is."""
    if len(shape) == 1:
        return tensor
    return torch.unflatten(tensor, dim, shape) if len(shape) else tensor.squeeze(dim)


def per_argnums(leaves: list[Any], primals_spec: TreeSpec, single_argnum: bool) -> Any:
    """One value per differentiated leaf -> the argnums level of torch.func's layout:
    a tuple over the arguments' pytrees, or the one argument's pytree for an int."""
    per_argnum = tree_unflatten(leaves, primals_spec)
    return per_argnum[0] if single_argnum else per_argnum


def to_torch_func_layout(
    columns: list[torch.Tensor],
    out_spec: TreeSpec,
    shapes: list[torch.Size],
    primals_spec: TreeSpec,
    single_argnum: bool,
) -> Any:
    """Each ``(n, *out)`` column block becomes leaves ``out.shape + in.shape``,
    nested as output pytree, then the argnums tuple (unless argnums was an
    int), then the input's pytree."""
    if single_argnum and out_spec.is_leaf() and primals_spec == ONE_TENSOR:
        # One tensor in, one out: no split and no pytree round trip.
        return split_dim(columns[0].movedim(0, -1), -1, shapes[0])
    numels = [s.numel() for s in shapes]
    per_output = []
    for block in columns:
        parts = torch.split(block.movedim(0, -1), numels, dim=-1)
        jacobians = [split_dim(part, -1, shape) for part, shape in zip(parts, shapes)]
        per_output.append(per_argnums(jacobians, primals_spec, single_argnum))
    return tree_unflatten(per_output, out_spec)


def to_hessian_layout(
    blocks: list[torch.Tensor],
    out_spec: TreeSpec,
    shapes: list[torch.Size],
    primals_spec: TreeSpec,
    single_argnum: bool,
) -> Any:
    """Each ``(n, n, *out)`` block becomes leaves ``out + in_a.shape + in_b.shape``,
    nested as ``torch.func.hessian`` (``jacfwd(jacrev(f))``) nests them: output
    pytree, then (argnums tuple, input pytree) for a, then the same for b."""
    numels = [s.numel() for s in shapes]
    per_output = []
    for block in blocks:
        moved = block.movedim((0, 1), (-2, -1))
        outer = []
        for rows, a in zip(torch.split(moved, numels, dim=-2), shapes):
            inner = [
                split_dim(split_dim(part, -1, b), -1 - len(b), a)
                for part, b in zip(torch.split(rows, numels, dim=-1), shapes)
            ]
            outer.append(per_argnums(inner, primals_spec, single_argnum))
        per_output.append(per_argnums(outer, primals_spec, single_argnum))
    return tree_unflatten(per_output, out_spec)
