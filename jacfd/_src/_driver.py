"""The driver: one call's point set evaluated chunk by chunk and reduced.

Every transform runs through :func:`run_points`: steps, random state, the
perturbed leaves of each chunk, the strategy's evaluation, the checks on the
outputs, and the point set's reduction. Nothing here depends on which
derivative is taken.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map
from torch.utils.checkpoint import checkpoint

from ._buffers import kept_buffers
from ._plan import Call, Options, Plan
from ._points import Blocks, Chunk
from ._random import rng_for
from ._rule import rule_steps
from ._steps import StepSpec, exact_steps
from ._strategy import evaluate
from ._workers import evaluate_in_parallel

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


ChunkHook = Callable[[Blocks], Blocks]
"""Maps one chunk's columns to what is kept of them (e.g. ``v^T J``'s entries), so
that no more than a chunk of columns is ever held."""


def run_points(call: Call, options: Options, per_chunk: ChunkHook | None = None) -> Columns:
    """Evaluates and reduces the call's point set, redoing the steps once if the
    outputs turn out coarser than the inputs (the output dtype is only known
    after an evaluation: one wasted evaluation, only in that case)."""
    if call.modules:  # modules with buffers: put back what func changes in them
        with kept_buffers(call.modules, options.name):
            return _with_output_precision(call, options, per_chunk)
    return _with_output_precision(call, options, per_chunk)


def _with_output_precision(call: Call, options: Options, per_chunk: ChunkHook | None) -> Columns:
    remembered = call.plan.output_eps
    try:
        return _run(call, options, remembered[0], per_chunk)
    except CoarserOutput as coarser:
        remembered[0] = coarser.eps
        return _run(call, options, coarser.eps, per_chunk)


def steps_for(call: Call, options: Options, output_eps: float) -> list[torch.Tensor]:
    """Each leaf's steps for func's precision: the coarser of the input's and the
    output's eps, worsened by any jacfd inside func."""
    plan = call.plan
    if options.rule is not None:  # typical, noise or bounds: see _rule
        return rule_steps(call, options, output_eps)
    if not output_eps:  # the usual case: precisions decided with the plan
        precisions = plan.precisions
    else:
        precisions = [
            max(torch.finfo(shape_dtype).eps, output_eps) ** options.noise_exponent
            for shape_dtype in plan.dtypes
        ]
    return [
        exact_steps(leaf, spec, options.stencil, precision, options.name)
        for leaf, spec, precision in zip(call.primals, plan.step_specs, precisions)
    ]


def _run(
    call: Call, options: Options, output_eps: float, per_chunk: ChunkHook | None = None
) -> Columns:
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
    rng = rng_for(options.randomness, options.strategy.watches_rng, plan.calls, primals)
    parts: list[Blocks] = []
    center: list[torch.Tensor] | None = None
    aux: Any = None
    out_spec: TreeSpec | None = None
    real_rows: dict[int, torch.Tensor] = {}

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

    # With workers or a process group, every chunk is evaluated first, elsewhere.
    computed = evaluate_in_parallel(call, options, primals, steps, rng)
    recompute = options.chunk_size is not None and len(points.chunks) > 1 and _can_recompute()
    for index, chunk in enumerate(points.chunks):
        if computed is not None:
            outputs = computed[index]
        elif recompute:
            outputs = checkpoint(
                values, chunk, *primals, use_reentrant=False, preserve_rng_state=True
            )
        else:
            outputs = values(chunk)
        flat_out, spec = flatten_output(outputs[0] if options.has_aux else outputs)
        if out_spec is None:
            out_spec = spec
            # Outputs that need no gradient saved nothing for backward: no recomputing.
            recompute = recompute and any(value.requires_grad for value in flat_out)
            check_outputs_once(options, plan, call.primals, flat_out, output_eps)
        if points.imaginary:
            flat_out = _real_leaves(where, flat_out, real_rows)
        if chunk.with_center:
            center = [value[0] for value in flat_out]
            flat_out = [value[1:] for value in flat_out]
            if options.has_aux:
                aux = tree_map(lambda value: value[0], outputs[1])
        reduced = points.reduce(chunk, flat_out, center, flat_steps)
        parts.append(reduced if per_chunk is None else per_chunk(reduced))
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


def flatten_output(out: Any) -> tuple[list[torch.Tensor], TreeSpec]:
    """func's output leaves and tree spec; a bare tensor without a pytree walk."""
    return ([out], _LEAF) if type(out) is torch.Tensor else tree_flatten(out)


def check_outputs_once(
    options: Options,
    plan: Plan,
    primals: list[torch.Tensor],
    flat_out: list[torch.Tensor],
    output_eps: float,
) -> None:
    """:func:`check_outputs`, once per plan, output precision and output dtypes."""
    dtypes = [value.dtype for value in flat_out]
    if dtypes != plan.checked_dtypes.get(output_eps):
        check_outputs(options, primals, plan.step_specs, flat_out, output_eps)
        plan.checked_dtypes[output_eps] = dtypes


def check_outputs(
    options: Options,
    primals: list[torch.Tensor],
    step_specs: list[StepSpec],
    flat_out: list[torch.Tensor],
    output_eps: float,
) -> None:
    """Refuses real outputs of the complex step, and raises :class:`CoarserOutput`
    where func computes coarser than an input given an automatic step."""
    if options.stencil.imaginary and not any(value.is_complex() for value in flat_out):
        # Only real leaves: nothing shows that func propagates the imaginary part.
        raise TypeError(
            f"{options.name}(func, scheme='complex'): func returned only real tensors for "
            "complex input, so it is not real-analytic (abs, real, angle or a cast discard "
            f"the imaginary part). {COMPLEX_HINT}"
        )
    coarsest = max(torch.finfo(value.dtype).eps for value in flat_out)
    if coarsest > output_eps and any(
        spec is None and torch.finfo(leaf.dtype).eps < coarsest
        for leaf, spec in zip(primals, step_specs)
    ):
        raise CoarserOutput(coarsest)


def _real_leaves(
    where: str, flat_out: list[torch.Tensor], first_rows: dict[int, torch.Tensor]
) -> list[torch.Tensor]:
    """Complex-step outputs with the real leaves of a complex-aware func made complex.

    Another leaf is complex, so func propagates the imaginary part; a real leaf
    is then accepted only if it is bitwise the same at every point (compared with
    the first row of the first chunk), as a leaf that does not depend on x is:
    its derivative is exactly zero, as in ``jacfwd``. Where the values cannot be
    read (under vmap or torch.compile), a varying leaf's derivative is NaN instead.
    """
    if all(value.is_complex() for value in flat_out):
        return flat_out
    result = []
    for k, value in enumerate(flat_out):
        if value.is_complex() or value.shape[0] == 0:
            result.append(value)
            continue
        reference = first_rows.setdefault(k, value[:1])
        same = ((value == reference) | (value.isnan() & reference.isnan())).all()
        try:
            varies = not torch.compiler.is_compiling() and not bool(same)
        except RuntimeError:  # under vmap: data-dependent control flow is not allowed
            varies = False
        if varies:
            raise TypeError(
                f"{where}(func, scheme='complex'): func returned a real tensor (output "
                f"leaf {k}) that changes with the imaginary step, so func is not "
                "real-analytic there (abs, real, angle or a cast discard the imaginary "
                f"part). {COMPLEX_HINT}"
            )
        if not value.dtype.is_floating_point:
            value = value.to(torch.get_default_dtype())
        zero = torch.zeros_like(value)
        imag = torch.where(same, zero, torch.full_like(value, torch.nan))
        result.append(torch.complex(value, imag))
    return result
