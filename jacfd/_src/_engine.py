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
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map

from ._evaluate import RANDOMNESS, RandomState, Randomness, evaluate, rows_of
from ._inputs import (
    Argnums,
    check_argnums,
    check_callable,
    flatten_primals,
    normalize_argnums,
    replace_primals,
    split_output,
)
from ._layout import Contraction, contract
from ._perturb import count_calls, perturb, plan_chunks
from ._steps import NOISE_EXPONENT, Delta, check_delta, exact_steps, match_delta
from ._stencil import Stencil, resolve_stencil

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
    noise_exponent: float
    """func's values are accurate to ~eps**noise_exponent: 1, or less if func was
    itself made by jacfd."""


def check_options(
    name: str,
    func: object,
    argnums: object,
    delta: Delta,
    scheme: str,
    order: int | None,
    has_aux: object,
    chunk_size: object,
    randomness: object,
    derivative: int = 1,
) -> Options:
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
    return Options(
        name,
        argnums,  # type: ignore[arg-type]  # checked above
        delta,
        stencil,
        has_aux,
        chunk_size,
        randomness,  # type: ignore[arg-type]
        getattr(func, NOISE_EXPONENT, 1.0),
    )


@dataclass
class Call:
    """One call's differentiated leaves, and func as a function of them."""

    primals: list[torch.Tensor]
    spec: TreeSpec
    step_specs: list[Any]
    at_point: Callable[..., tuple[Any, ...]]
    """The leaves -> ``(out,)`` or ``(out, aux)``, checked."""

    @property
    def num_coordinates(self) -> int:
        return sum(leaf.numel() for leaf in self.primals)


def prepare(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], options: Options
) -> Call:
    argnums = normalize_argnums(options.name, options.argnums, len(args))
    primals, spec = flatten_primals(options.name, args, argnums)
    step_specs = match_delta(options.name, options.delta, primals, spec)

    def at_point(*leaves: torch.Tensor) -> tuple[Any, ...]:
        result = func(*replace_primals(args, argnums, leaves, spec), **kwargs)
        out, aux = split_output(options.name, result, options.has_aux)
        return (out, aux) if options.has_aux else (out,)

    return Call(primals, spec, step_specs, at_point)


@dataclass
class Columns:
    """Per contraction, per output leaf: the ``(n, *out)`` columns of all coordinates."""

    blocks: list[list[torch.Tensor]]
    out_spec: TreeSpec
    center: list[torch.Tensor] | None
    """func's output leaves at the unperturbed point, if it was evaluated."""
    aux: Any


def coordinate_columns(
    call: Call,
    options: Options,
    offsets: tuple[int, ...],
    contractions: list[Contraction],
    need_center: bool,
) -> Columns:
    """Evaluates func at ``x + o h_j e_j`` for every offset and coordinate and
    reduces each chunk with every contraction."""
    stencil, chunk_size, randomness = options.stencil, options.chunk_size, options.randomness
    need_center = need_center or (options.has_aux and not stencil.imaginary)
    chunks = plan_chunks(call.num_coordinates, len(offsets), need_center, chunk_size)
    devices = [leaf.device for leaf in call.primals]
    rng = None
    if randomness == "same" and count_calls(chunks, len(offsets), chunk_size) > 1:
        rng = RandomState(devices)
    elif randomness == "error" and chunk_size == 1 and not torch.compiler.is_compiling():
        rng = RandomState(devices)

    def precision(leaf: torch.Tensor, output_eps: float) -> float:
        """Relative accuracy of func's values near ``leaf``: the coarser of the
        input's and the output's eps, worsened by any jacfd inside func."""
        return max(torch.finfo(leaf.dtype).eps, output_eps) ** options.noise_exponent

    def run(output_eps: float) -> Columns | float:
        """The columns; or, if the outputs turn out coarser than an input whose
        step was automatic, the outputs' eps to redo the steps with."""
        steps = [
            exact_steps(leaf, spec, stencil, precision(leaf, output_eps))
            for leaf, spec in zip(call.primals, call.step_specs)
        ]
        flat_steps = torch.cat(steps) if len(steps) > 1 else steps[0]
        blocks: list[list[list[torch.Tensor]]] = []
        center: list[torch.Tensor] | None = None
        aux: Any = None
        for chunk in chunks:
            leaves, in_dims = perturb(call.primals, steps, offsets, chunk, stencil.imaginary)
            rows = chunk.rows(len(offsets))
            try:
                outputs = evaluate(
                    call.at_point, rows_of(leaves, in_dims), rows, chunk_size, randomness, rng
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
                coarsest = max(torch.finfo(value.dtype).eps for value in flat_out)
                if coarsest > output_eps and any(
                    spec is None and torch.finfo(leaf.dtype).eps < coarsest
                    for leaf, spec in zip(call.primals, call.step_specs)
                ):
                    return coarsest
            if chunk.with_center:
                center = [value[0] for value in flat_out]
                flat_out = [value[1:] for value in flat_out]
                if options.has_aux:
                    aux = tree_map(lambda value: value[0], outputs[1])
            chunk_steps = flat_steps[chunk.start : chunk.stop]
            blocks.append(
                [
                    [
                        contract(values, None if center is None else center[k], c, chunk_steps)
                        for k, values in enumerate(flat_out)
                    ]
                    for c in contractions
                ]
            )
        joined = [
            [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*per_chunk)]
            for per_chunk in zip(*blocks)
        ]
        return Columns(joined, out_spec, center, aux)

    result = run(0.0)
    if isinstance(result, float):  # func computes coarser than its inputs
        result = run(result)
    if not isinstance(result, Columns):  # the coarsest eps is now the floor
        raise AssertionError("the steps were redone twice")
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
