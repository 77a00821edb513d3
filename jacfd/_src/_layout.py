"""Contraction with the stencil weights, and the ``torch.func`` layout.

``contract`` turns the outputs at a chunk's stencil points into that chunk's
Jacobian columns; ``to_torch_func_layout`` arranges the columns of all chunks
exactly as ``torch.func.jacfwd`` does (views, no copies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_unflatten

from ._stencil import Stencil


@dataclass(frozen=True)
class Contraction:
    """A stencil's weights laid over the offsets actually evaluated.

    Built once per transform from exact weights, so a call only does float
    arithmetic. Several contractions may share one evaluation (e.g. the steps
    h and 2h of an error estimate).
    """

    weights: tuple[float, ...]
    """One weight per evaluated offset, in evaluation order (zero if unused)."""
    center_weight: float
    derivative: int
    imaginary: bool
    absolute: bool = False
    """Contract ``|values|``: with ``|weights|`` this bounds the rounding error."""
    magnitude: float = 0.0
    """The weights' common magnitude if they differ only in sign (forward,
    backward and central differences), else 0."""

    @staticmethod
    def of(stencil: Stencil, offsets: tuple[int, ...], absolute: bool = False) -> Contraction:
        if absolute:
            stencil = stencil.absolute()
        weights = tuple(stencil.weight(o) for o in offsets)
        center = stencil.weight(0)
        magnitudes = {abs(w) for w in (*weights, center) if w}
        return Contraction(
            weights,
            center,
            stencil.derivative,
            stencil.imaginary,
            absolute,
            magnitudes.pop() if len(magnitudes) == 1 else 0.0,
        )


def contract(
    values: torch.Tensor,
    center: torch.Tensor | None,
    contraction: Contraction,
    steps: torch.Tensor | None,
    count: int,
) -> torch.Tensor:
    """``sum_k w_k f(x + o_k h_j e_j) / h_j**q`` for each direction ``j`` of a chunk.

    ``values`` holds one output leaf at the shifted points, offset-major:
    shape ``(S * count, *out)``. ``center`` is ``f(x)``, needed when the stencil
    weighs it. With ``steps`` None (coloured directions, whose columns have
    different steps) nothing is divided. Returns shape ``(count, *out)``.
    """
    by_offset = torch.unflatten(values, 0, (len(contraction.weights), count))
    terms = [(by_offset[k], w) for k, w in enumerate(contraction.weights) if w]
    if contraction.center_weight:
        if center is None:
            raise AssertionError("the centre point was not evaluated")
        terms.append((center, contraction.center_weight))
    if contraction.imaginary:
        terms = [(value.imag, w) for value, w in terms]
    if contraction.absolute:
        terms = [(value.abs(), w) for value, w in terms]
    real_dtype = terms[0][0].real.dtype if terms[0][0].is_complex() else terms[0][0].dtype
    if steps is None:
        h = torch.ones((), dtype=real_dtype, device=terms[0][0].device)
    else:
        h = steps.to(real_dtype).reshape(-1, *([1] * (terms[0][0].dim() - 1)))
        h = h**contraction.derivative if contraction.derivative > 1 else h
    if contraction.magnitude:
        # The weights differ only in sign: sum the values with signs and divide once
        # by h / |w|, a power-of-two scaling for central differences, so the result
        # rounds exactly as (f(x+h) - f(x-h)) / 2h. In place: ``total`` is fresh.
        first = terms[0][1]
        scale = h / contraction.magnitude if contraction.magnitude != 1 else h
        scale = scale if first > 0 else -scale
        if len(terms) == 1:  # the complex step: Im f(x + ih) / h
            return terms[0][0] / scale
        total = torch.add(terms[0][0], terms[1][0], alpha=terms[1][1] / first)
        for value, weight in terms[2:]:
            total.add_(value, alpha=weight / first)
        return total.div_(scale)
    total = terms[0][0] * terms[0][1]
    for value, weight in terms[1:]:
        total.add_(value, alpha=weight)
    return total.div_(h)


def _unflatten(tensor: torch.Tensor, dim: int, shape: torch.Size) -> torch.Tensor:
    """Splits ``dim`` into ``shape``; a 0-dim ``shape`` removes it."""
    return torch.unflatten(tensor, dim, shape) if len(shape) else tensor.squeeze(dim)


def per_argnums(leaves: list[Any], primals_spec: TreeSpec, single_argnum: bool) -> Any:
    """One value per differentiated leaf -> the argnums level of torch.func's layout:
    a tuple over the arguments' pytrees, or the one argument's pytree for an int."""
    per_argnum = tree_unflatten(leaves, primals_spec)
    return per_argnum[0] if single_argnum else per_argnum


def to_torch_func_layout(
    columns: list[torch.Tensor],
    out_spec: TreeSpec,
    primals: list[torch.Tensor],
    primals_spec: TreeSpec,
    single_argnum: bool,
) -> Any:
    """Each ``(n, *out)`` column block becomes leaves ``out.shape + in.shape``,
    nested as output pytree, then the argnums tuple (unless argnums was an
    int), then the input's pytree."""
    numels = [p.numel() for p in primals]
    per_output = []
    for block in columns:
        parts = torch.split(block.movedim(0, -1), numels, dim=-1)
        jacobians = [_unflatten(part, -1, p.shape) for part, p in zip(parts, primals)]
        per_output.append(per_argnums(jacobians, primals_spec, single_argnum))
    return tree_unflatten(per_output, out_spec)


def to_hessian_layout(
    blocks: list[torch.Tensor],
    out_spec: TreeSpec,
    primals: list[torch.Tensor],
    primals_spec: TreeSpec,
    single_argnum: bool,
) -> Any:
    """Each ``(n, n, *out)`` block becomes leaves ``out + in_a.shape + in_b.shape``,
    nested as ``torch.func.hessian`` (``jacfwd(jacrev(f))``) nests them: output
    pytree, then (argnums tuple, input pytree) for a, then the same for b."""
    numels = [p.numel() for p in primals]
    per_output = []
    for block in blocks:
        moved = block.movedim((0, 1), (-2, -1))
        outer = []
        for rows, a in zip(torch.split(moved, numels, dim=-2), primals):
            inner = [
                _unflatten(_unflatten(part, -1, b.shape), -1 - b.dim(), a.shape)
                for part, b in zip(torch.split(rows, numels, dim=-1), primals)
            ]
            outer.append(per_argnums(inner, primals_spec, single_argnum))
        per_output.append(per_argnums(outer, primals_spec, single_argnum))
    return tree_unflatten(per_output, out_spec)
