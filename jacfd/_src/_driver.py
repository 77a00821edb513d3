"""The driver: one call's point set evaluated chunk by chunk and reduced.

Every transform runs through :func:`run_points`: steps, random state, the
perturbed leaves of each chunk, the strategy's evaluation, the checks on the
outputs, and the point set's reduction. Nothing here depends on which
derivative is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map
from torch.utils.checkpoint import checkpoint

from ._plan import Call, Options
from ._points import Blocks, Chunk
from ._random import rng_for
from ._steps import exact_steps
from ._strategy import evaluate

_LEAF = tree_flatten(torch.empty(0))[1]

COMPLEX_HINT = (
    "The complex step evaluates func at x + ih, so func must accept complex tensors "
    "and be real-analytic: no relu, abs, max, comparisons or float-only ops, and "
    "modules converted with .to(torch.complex128). Use scheme='central' otherwise."
)


class CoarserOutput(Exception):  # noqa: N818 (a signal, not an error)
    """func returned values coarser than an input it was given a step for
    (e.g. float32 arithmetic on float64 inputs): the steps must be redone."""

    def __init__(self, eps: float) -> None:
        super().__init__(eps)
        self.eps = eps


@dataclass
class Columns:
    blocks: Blocks
    """Per contraction, per output leaf: the columns of all directions."""
    out_spec: TreeSpec
    center: list[torch.Tensor] | None
    """func's output leaves at the unperturbed point, if it was evaluated."""
    aux: Any
    steps: torch.Tensor
    """The flat steps of all coordinates."""


def run_points(call: Call, options: Options) -> Columns:
    """Evaluates and reduces the call's point set, redoing the steps once if the
    outputs turn out coarser than the inputs (the output dtype is only known
    after an evaluation: one wasted evaluation, only in that case)."""
    try:
        return _run(call, options, 0.0)
    except CoarserOutput as coarser:
        return _run(call, options, coarser.eps)


def steps_for(call: Call, options: Options, output_eps: float) -> list[torch.Tensor]:
    """Each leaf's steps for func's precision: the coarser of the input's and the
    output's eps, worsened by any jacfd inside func."""
    plan = call.plan
    if not output_eps:  # the usual case: precisions decided with the plan
        precisions = plan.precisions
    else:
        precisions = [
            max(torch.finfo(shape_dtype).eps, output_eps) ** options.noise_exponent
            for shape_dtype in plan.dtypes
        ]
    return [
        exact_steps(leaf, spec, options.stencil, precision)
        for leaf, spec, precision in zip(call.primals, plan.step_specs, precisions)
    ]


def _run(call: Call, options: Options, output_eps: float) -> Columns:
    plan, points, where = call.plan, call.plan.points, options.name
    steps = steps_for(call, options, output_eps)
    flat_steps = torch.cat(steps) if len(steps) > 1 else steps[0]
    primals = call.primals
    guarded = plan.shares_leaves and not torch.compiler.is_compiling()
    if guarded:
        # Leaves outside a chunk are passed as they are: a copy keeps the caller's
        # tensors safe from a func that writes into its arguments.
        primals = [p.clone() for p in primals]
        versions = [p._version for p in primals]
    devices = [leaf.device for leaf in primals]
    rng = rng_for(options.randomness, options.strategy.watches_rng, plan.calls, devices)
    parts: list[Blocks] = []
    center: list[torch.Tensor] | None = None
    aux: Any = None
    out_spec: TreeSpec | None = None

    def values(chunk: Chunk, *_: torch.Tensor) -> Any:
        """func's outputs at the chunk's points."""
        leaves, in_dims = points.build(chunk, primals, steps)
        try:
            return evaluate(
                options.strategy,
                call.at_point,
                leaves,
                in_dims,
                points.rows(chunk),
                options.chunk_size,
                rng,
                options.randomness,
                where,
            )
        except (RuntimeError, NotImplementedError) as error:
            if not points.imaginary:
                raise
            cause = error.__cause__ if error.__cause__ is not None else error
            raise TypeError(
                f"{where}(func, scheme='complex'): func failed on complex input: {cause}\n"
                f"{COMPLEX_HINT}"
            ) from cause

    recompute = options.chunk_size is not None and len(points.chunks) > 1 and _can_recompute()
    for chunk in points.chunks:
        if recompute:
            outputs = checkpoint(
                values, chunk, *primals, use_reentrant=False, preserve_rng_state=True
            )
        else:
            outputs = values(chunk)
        out = outputs[0] if options.has_aux else outputs
        if type(out) is torch.Tensor:
            flat_out, spec = [out], _LEAF
        else:
            flat_out, spec = tree_flatten(out)
        if out_spec is None:
            out_spec = spec
            # Outputs that need no gradient saved nothing for backward: no recomputing.
            recompute = recompute and any(value.requires_grad for value in flat_out)
            dtypes = [value.dtype for value in flat_out]
            if dtypes != plan.checked_dtypes.get(output_eps):
                _check_outputs(call, options, flat_out, output_eps)
                plan.checked_dtypes[output_eps] = dtypes
        if chunk.with_center:
            center = [value[0] for value in flat_out]
            flat_out = [value[1:] for value in flat_out]
            if options.has_aux:
                aux = tree_map(lambda value: value[0], outputs[1])
        parts.append(points.reduce(chunk, flat_out, center, flat_steps))
    if guarded and [p._version for p in primals] != versions:
        raise ValueError(
            f"{where}(func): func wrote in place into a differentiated argument, so the "
            "stencil points after that write were wrong (your tensors were not changed: "
            "jacfd passed a copy). Write into a copy inside func (x = x.clone()), or use "
            "out-of-place ops."
        )
    if out_spec is None:
        raise AssertionError("no chunk was evaluated")
    blocks = points.finish(parts, center, flat_steps)
    if options.has_aux and points.imaginary:
        # The complex points carry a complex aux; take it from the real point.
        aux = call.at_point(*call.primals)[1]
    return Columns(blocks, out_spec, center, aux, flat_steps)


def _can_recompute() -> bool:
    """Whether the chunks should be evaluated under activation checkpointing.

    In grad mode, a module's parameters require grad, so every chunk's
    activations would stay in the autograd graph until backward and
    ``chunk_size`` would bound nothing. Checkpointing keeps only each chunk's
    outputs and evaluates the chunk again in backward (with the same random
    numbers). Not under ``torch.compile`` (no graph break for it), nor inside
    a ``torch.func`` transform: ``grad`` forbids the saved-tensor hooks, and the
    recomputation would run outside ``vmap``'s batching.
    """
    return (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and torch._C._functorch.maybe_current_level() is None
        and torch._C._autograd._saved_tensors_hooks_get_disabled_error_message() is None
    )


def _check_outputs(
    call: Call, options: Options, flat_out: list[torch.Tensor], output_eps: float
) -> None:
    if options.stencil.imaginary and not all(value.is_complex() for value in flat_out):
        raise TypeError(
            f"{options.name}(func, scheme='complex'): func returned a real tensor for "
            "complex input, so it is not real-analytic (abs, real, angle or a cast discard "
            f"the imaginary part). {COMPLEX_HINT}"
        )
    coarsest = max(torch.finfo(value.dtype).eps for value in flat_out)
    if coarsest > output_eps and any(
        spec is None and torch.finfo(leaf.dtype).eps < coarsest
        for leaf, spec in zip(call.primals, call.plan.step_specs)
    ):
        raise CoarserOutput(coarsest)
