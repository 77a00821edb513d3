"""The pipeline every transform shares.

``check_options`` validates a transform's options once, when it is built.
``prepare`` turns one call's arguments into flat primals and a function of
them. ``coordinate_columns`` evaluates a one-dimensional stencil along every
coordinate, chunk by chunk, and reduces each chunk with one or more
contractions: the Jacobian, the Hessian diagonal and error estimates all come
from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_map_only

from ._evaluate import (
    RANDOMNESS,
    Batched,
    Merged,
    Randomness,
    RandomState,
    Strategy,
    evaluate,
    resolve_strategy,
    rows_of,
)
from ._inputs import (
    Argnums,
    bare_tensors,
    check_argnums,
    check_callable,
    flatten_primals,
    normalize_argnums,
    replace_primals,
    split_output,
)
from ._layout import Contraction, contract
from ._perturb import count_calls, perturb, perturb_colors, plan_chunks
from ._stencil import Stencil, resolve_stencil
from ._steps import NOISE_EXPONENT, Delta, StepSpec, check_delta, exact_steps, match_delta

_T = TypeVar("_T")

COMPLEX_HINT = (
    "The complex step evaluates func at x + ih, so func must accept complex tensors "
    "and be real-analytic: no relu, abs, max, comparisons or float-only ops, and "
    "modules converted with .to(torch.complex128). Use scheme='central' otherwise."
)


@dataclass(frozen=True)
class Options:
    """A transform's validated options."""

    name: str
    argnums: Argnums
    delta: Delta
    stencil: Stencil
    """The stencil whose step rule applies (extra contractions may use others)."""
    has_aux: bool
    chunk_size: int | None
    randomness: Randomness
    strategy: Literal["vmap", "loop"] | Batched | Merged
    noise_exponent: float
    """func's values are accurate to ~eps**noise_exponent: 1, or less if func was
    itself made by jacfd."""


def check_options(
    name: str,
    func: Callable[..., Any],
    argnums: Argnums,
    delta: Delta,
    scheme: str,
    order: int | None,
    has_aux: bool,
    chunk_size: int | None,
    randomness: Randomness,
    strategy: Strategy = "vmap",
    derivative: int = 1,
) -> Options:
    """Validates the options at run time too: callers need not be type-checked."""
    check_callable(name, func)
    check_argnums(name, argnums)
    stencil = resolve_stencil(name, scheme, order, derivative)
    delta = check_delta(name, delta)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(
                f"{name}(func, chunk_size): chunk_size must be None or a positive int, "
                f"got {type(chunk_size).__name__}."
            )
        if chunk_size <= 0:
            raise ValueError(
                f"{name}(func, chunk_size={chunk_size}): chunk_size must be positive; use "
                "chunk_size=None for one vmap call, or chunk_size=1 for a plain loop "
                "without vmap."
            )
    if randomness not in RANDOMNESS:
        raise ValueError(
            f"{name}(func, randomness={randomness!r}): unknown randomness; choose one of "
            f"{RANDOMNESS} (as in torch.func.vmap)."
        )
    if not isinstance(has_aux, bool):
        raise TypeError(f"{name}(func, has_aux): has_aux must be a bool, got {has_aux!r}.")
    resolved = resolve_strategy(name, strategy, str(randomness))
    return Options(
        name,
        argnums,
        delta,
        stencil,
        has_aux,
        chunk_size,
        randomness,
        resolved,
        getattr(func, NOISE_EXPONENT, 1.0),
    )


@dataclass
class Call:
    """One call's differentiated leaves, and func as a function of them."""

    primals: list[torch.Tensor]
    spec: TreeSpec
    step_specs: list[StepSpec]
    at_point: Callable[..., tuple[Any, ...]]
    """The leaves -> ``(out,)`` or ``(out, aux)``, checked; the keyword
    ``others`` maps the tensors of the non-differentiated arguments."""

    @property
    def num_coordinates(self) -> int:
        return sum(leaf.numel() for leaf in self.primals)


def prepare(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], options: Options
) -> Call:
    argnums = normalize_argnums(options.name, options.argnums, len(args))
    primals, spec = flatten_primals(options.name, args, argnums)
    step_specs = match_delta(options.name, options.delta, primals, spec)

    if isinstance(options.strategy, Batched):
        for leaf in primals:
            options.strategy.check(options.name, leaf)
    bare = bare_tensors(args, argnums)

    def at_point(
        *leaves: torch.Tensor, others: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[Any, ...]:
        call_args, call_kwargs = args, kwargs
        if others is not None:
            call_args = tuple(
                arg if i in argnums else tree_map_only(torch.Tensor, others, arg)
                for i, arg in enumerate(args)
            )
            call_kwargs = tree_map_only(torch.Tensor, others, kwargs)
        if bare:  # the common case: no pytree round trip for each point
            new_args = list(call_args)
            for argnum, leaf in zip(argnums, leaves):
                new_args[argnum] = leaf
            result = func(*new_args, **call_kwargs)
        else:
            result = func(*replace_primals(call_args, argnums, leaves, spec), **call_kwargs)
        out, aux = split_output(options.name, result, options.has_aux)
        return (out, aux) if options.has_aux else (out,)

    return Call(primals, spec, step_specs, at_point)


@dataclass
class Columns:
    """Per contraction, per output leaf: the ``(n, *out)`` columns of all coordinates."""

    blocks: list[list[torch.Tensor]]
    """With coloured directions: ``(num_colors, *out)`` compressed columns, not
    divided by the steps."""
    out_spec: TreeSpec
    center: list[torch.Tensor] | None
    """func's output leaves at the unperturbed point, if it was evaluated."""
    aux: Any
    steps: torch.Tensor
    """The flat steps of all coordinates."""


def make_rng(options: Options, call: Call, calls: int) -> RandomState | None:
    """The generator state to replay (common random numbers over several calls)
    or to watch (a loop under ``randomness="error"``), if any."""
    devices = [leaf.device for leaf in call.primals]
    if options.randomness == "same" and calls > 1:
        return RandomState(devices)
    without_vmap = options.chunk_size == 1 or options.strategy != "vmap"
    if options.randomness == "error" and without_vmap:
        # Only vmap detects random ops by itself; loops and real batches are watched.
        return None if torch.compiler.is_compiling() else RandomState(devices)
    return None


def steps_for(call: Call, options: Options, output_eps: float) -> list[torch.Tensor]:
    """Each leaf's steps for func's precision: the coarser of the input's and the
    output's eps, worsened by any jacfd inside func."""
    return [
        exact_steps(
            leaf,
            spec,
            options.stencil,
            max(torch.finfo(leaf.dtype).eps, output_eps) ** options.noise_exponent,
        )
        for leaf, spec in zip(call.primals, call.step_specs)
    ]


def coarser_output(call: Call, flat_out: list[torch.Tensor], output_eps: float) -> float | None:
    """The outputs' eps if it exceeds that of an input whose step was automatic
    (e.g. float32 arithmetic on float64 inputs): the steps must then be redone."""
    coarsest = max(torch.finfo(value.dtype).eps for value in flat_out)
    if coarsest > output_eps and any(
        spec is None and torch.finfo(leaf.dtype).eps < coarsest
        for leaf, spec in zip(call.primals, call.step_specs)
    ):
        return coarsest
    return None


def with_output_precision(run: Callable[[float], _T | float]) -> _T:
    """``run(output_eps)``; again with the outputs' eps if it asks for it. The
    output dtype is only known after an evaluation, so this costs one wasted
    evaluation, and only when func computes coarser than its inputs."""
    result = run(0.0)
    if isinstance(result, float):
        result = run(result)
    if isinstance(result, float):  # impossible: the floor is now the coarsest eps
        raise AssertionError("the steps were redone twice")
    return result


def coordinate_columns(
    call: Call,
    options: Options,
    offsets: tuple[int, ...],
    contractions: list[Contraction],
    need_center: bool,
    colors: torch.Tensor | None = None,
    num_colors: int = 0,
) -> Columns:
    """Evaluates func at ``x + o h_j e_j`` for every offset and coordinate and
    reduces each chunk with every contraction. With ``colors`` (one per
    coordinate), the directions are the colours instead: ``sum_{j of colour c}
    h_j e_j``, and the columns come back compressed."""
    stencil, chunk_size, randomness = options.stencil, options.chunk_size, options.randomness
    need_center = need_center or (options.has_aux and not stencil.imaginary)
    # Coordinates are chunked leaf by leaf; colours may span leaves.
    sizes = [leaf.numel() for leaf in call.primals] if colors is None else [num_colors]
    chunks = plan_chunks(sizes, len(offsets), need_center, chunk_size)
    rng = make_rng(options, call, count_calls(chunks, len(offsets), chunk_size))

    def run(output_eps: float) -> Columns | float:
        steps = steps_for(call, options, output_eps)
        flat_steps = torch.cat(steps) if len(steps) > 1 else steps[0]
        blocks: list[list[list[torch.Tensor]]] = []
        center: list[torch.Tensor] | None = None
        aux: Any = None
        for chunk in chunks:
            if colors is None:
                leaves, in_dims = perturb(call.primals, steps, offsets, chunk, stencil.imaginary)
            else:
                leaves, in_dims = perturb_colors(
                    call.primals, steps, offsets, chunk, colors, stencil.imaginary
                )
            rows = chunk.rows(len(offsets))
            try:
                outputs = evaluate(
                    call.at_point,
                    rows_of(leaves, in_dims),
                    rows,
                    chunk_size,
                    options.strategy,
                    randomness,
                    rng,
                    options.name,
                )
            except (RuntimeError, NotImplementedError) as error:
                if not stencil.imaginary:
                    raise
                cause = error.__cause__ if error.__cause__ is not None else error
                raise TypeError(
                    f"{options.name}(func, scheme='complex'): func failed on complex "
                    f"input: {cause}\n{COMPLEX_HINT}"
                ) from cause
            flat_out, out_spec = tree_flatten(outputs[0])
            if not blocks:
                check_complex_output(options.name, stencil, flat_out)
                coarser = coarser_output(call, flat_out, output_eps)
                if coarser is not None:
                    return coarser
            if chunk.with_center:
                center = [value[0] for value in flat_out]
                flat_out = [value[1:] for value in flat_out]
                if options.has_aux:
                    aux = tree_map(lambda value: value[0], outputs[1])
            chunk_steps = None if colors is not None else flat_steps[chunk.start : chunk.stop]
            blocks.append(
                [
                    [
                        contract(
                            values,
                            None if center is None else center[k],
                            c,
                            chunk_steps,
                            chunk.count,
                        )
                        for k, values in enumerate(flat_out)
                    ]
                    for c in contractions
                ]
            )
        joined = [
            [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*per_chunk)]
            for per_chunk in zip(*blocks)
        ]
        return Columns(joined, out_spec, center, aux, flat_steps)

    result = with_output_precision(run)
    if options.has_aux and stencil.imaginary:
        # The complex points carry a complex aux; take it from the real point.
        result.aux = call.at_point(*call.primals)[1]
    return result


def check_complex_output(name: str, stencil: Stencil, flat_out: list[torch.Tensor]) -> None:
    if stencil.imaginary and not all(value.is_complex() for value in flat_out):
        raise TypeError(
            f"{name}(func, scheme='complex'): func returned a real tensor for complex "
            "input, so it is not real-analytic (abs, real, angle or a cast discard the "
            f"imaginary part). {COMPLEX_HINT}"
        )
