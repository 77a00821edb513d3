"""``jacfd_with_error``: a Richardson-extrapolated Jacobian with a per-entry error estimate."""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any, Literal, overload

import torch

from ._bounds import OneSided
from ._contract import Contraction
from ._driver import run_points
from ._inputs import Argnums, P, wraps
from ._layout import to_torch_func_layout
from ._plan import Options, Planner, check_options
from ._random import Randomness
from ._stencil import Scheme, Stencil, richardson
from ._steps import Delta
from ._strategy import StrategyOption as Strategy
from ._structure import Dense
from ._workers import Workers

ROUNDING_SAFETY = 4.0
"""Rounding error of one evaluation of f, in units of eps * |f|: a few ulps for
the element-wise and matmul-based functions of the error-estimate tests."""

TERM_SAFETY = 2.0
"""The same for the rounding of each output's largest term ``max_j |x_j J_ij|``."""

NOISE_SAFETY = 3.0
"""On f's rounding measured by the 4th differences (central schemes): their median
over the columns, over ``sqrt(70)`` (the root of the sum of their weights' squares).
2 and 3 were the smallest that bound >= 99.5% of every function's entries in
``docs/scripts/error_bounds_report.py`` and every entry of the NIST problems."""

TAYLOR_RATIO = 0.1
"""A central column is outside the region where func is close to its Taylor
polynomial when both its odd and its even differences fail to decay by this ratio
(about ``(h / r)**2`` inside it, for a distance ``r`` to the nearest singularity)."""


def _difference(weights: tuple[int, ...]) -> Stencil:
    """The difference ``sum w_k f(x + k h)`` over the offsets ``-m..m``, divided by h
    once (not h**k): it is only compared with other differences of its column."""
    half = len(weights) // 2
    offsets = tuple(range(-half, half + 1))
    return Stencil(offsets, tuple(Fraction(w) for w in weights), 1, 1)


SECOND_DIFFERENCE = _difference((1, -2, 1))
FOURTH_DIFFERENCE = _difference((1, -4, 6, -4, 1))


@overload
def jacfd_with_error(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    has_aux: Literal[False] = False,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
    workers: Workers = None,
    process_group: Any = None,
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> Callable[P, tuple[Any, Any]]: ...


@overload
def jacfd_with_error(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    has_aux: Literal[True],
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
    workers: Workers = None,
    process_group: Any = None,
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> Callable[P, tuple[Any, Any, Any]]: ...


@overload
def jacfd_with_error(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    has_aux: bool = False,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
    workers: Workers = None,
    process_group: Any = None,
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> Callable[P, tuple[Any, ...]]: ...


def jacfd_with_error(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    has_aux: bool = False,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
    workers: Workers = None,
    process_group: Any = None,
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> Callable[P, tuple[Any, ...]]:
    """A Richardson-extrapolated Jacobian, with a per-entry estimate of its error.

    ``func`` is evaluated once, at the stencil points for the steps ``h`` and
    ``2h``. The two estimates ``D_h`` and ``D_2h`` (error ``c h**p``) combine to
    ``(2**p D_h - D_2h) / (2**p - 1)``, which cancels the leading error term.
    The error estimate adds the spread ``|D_h - D_2h| / (2**p - 1)`` (the
    truncation error of ``D_h``, an upper bound for the extrapolated result's)
    and a rounding bound ``4 eps max(sum_k |w_k| |f(x_k)|, M_i sum_k |w_k|) / h``,
    where ``M_i = max_j |x_j J_ij|`` is the size of the largest term of output i
    that an input moves: its rounding stays in ``f_i`` where ``f_i`` itself
    cancels (a residual ``model - y``). Where every difference is exactly zero (an
    output that does not depend on an input), the Jacobian entry is exactly
    zero; its error keeps the rounding bound, as a derivative below it would
    leave every value unchanged too.

    Central schemes also evaluate ``f(x)`` (one evaluation more) and check each
    column: where neither its odd differences (``D_h - D_2h`` against ``D_h``)
    nor its even ones (the 4th against the 2nd) decay, the step reaches beyond
    the region where func is close to its Taylor polynomial (an input of tiny
    magnitude, ``b7 x**3`` with b7 = 1e-7 and a step of 6e-6), nothing measured
    at these steps says how wrong the column is, and its error is ``inf``: pass
    ``typical=`` (the inputs' sizes) or use :func:`jacfd_adaptive`.

    Takes the same arguments as :func:`jacfd` (without ``sparsity`` and
    ``batch_dim``); with ``noise``, the rounding bound uses ``max(eps, noise)``.
    The step rule is that of
    ``scheme`` and ``order``, and costs twice its evaluations. At that step
    rounding and truncation errors are balanced, so the extrapolation removes
    only half of the error: the point of this transform is the estimate. With a
    larger ``delta`` the extrapolation gains its full order (e.g. ``h**4`` from
    central differences) and the estimate stays an upper bound.

    Returns:
        A function returning ``(jacobian, error)``, or ``(jacobian, error, aux)``
            with ``has_aux``: two pytrees in :func:`jacfd`'s layout, ``error`` >= 0.

    Examples:
        >>> import torch
        >>> from jacfd import jacfd_with_error
        >>> x = torch.tensor([0.5, 1.0], dtype=torch.float64)
        >>> J, err = jacfd_with_error(torch.sin)(x)
        >>> bool(((J - torch.diag(torch.cos(x))).abs() <= err).all())
        True
    """
    options = check_options(
        "jacfd_with_error",
        func,
        argnums=argnums,
        delta=delta,
        scheme=scheme,
        order=order,
        has_aux=has_aux,
        chunk_size=chunk_size,
        randomness=randomness,
        strategy=strategy,
        workers=workers,
        process_group=process_group,
        typical=typical,
        noise=noise,
        bounds=bounds,
    )
    dense = Dense()

    def build(options: Options) -> Planner:
        extrapolated, spread = richardson(options.stencil)
        offsets = tuple(o for o in extrapolated.offsets if o != 0)
        contractions = [
            Contraction.of(extrapolated, offsets),
            Contraction.of(spread, offsets),
            Contraction.of(extrapolated, offsets, absolute=True),
        ]
        if _checks_taylor(options.stencil):
            contractions += [
                Contraction.of(SECOND_DIFFERENCE, offsets),
                Contraction.of(FOURTH_DIFFERENCE, offsets),
            ]
        with_center = any(c.needs_center for c in contractions) or (
            has_aux and not options.stencil.imaginary
        )
        return Planner(
            func,
            options,
            lambda primals: dense.points(options, primals, offsets, contractions, with_center),
        )

    planner = build(options)
    one_sided = OneSided.of(options, build)
    stencil = options.stencil
    extrapolated, _ = richardson(stencil)
    weight_sum = float(sum(abs(w) for w in extrapolated.weights))
    gain = 2**stencil.accuracy - 1  # D_h - D_2h = gain * spread

    @wraps(func)
    def jacobian_with_error(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        call = planner.prepare(args, kwargs)
        columns = run_points(call, options)
        differences = columns.blocks[3:]  # the central pass's, before any merge
        if one_sided is not None:
            columns = one_sided.merge(call, columns, args, kwargs)
        jac_blocks, spread_blocks, magnitude_blocks = columns.blocks[:3]
        # The rounding of one evaluation, relative: eps of the coarser of input and output.
        input_eps = torch.cat(
            [
                torch.full((leaf.numel(),), torch.finfo(leaf.dtype).eps, dtype=torch.float64)
                for leaf in call.primals
            ]
        )
        x = torch.cat([leaf.detach().reshape(-1) for leaf in call.primals])
        error_blocks, rounding_blocks = [], []
        for k, (jac, spread_block, magnitude) in enumerate(
            zip(jac_blocks, spread_blocks, magnitude_blocks)
        ):
            eps = input_eps.clamp_min(torch.finfo(magnitude.dtype).eps)
            if call.noise is not None:  # func's own noise, given or estimated
                eps = eps.clamp_min(call.noise)
            eps = (eps**options.noise_exponent).to(magnitude.device, magnitude.dtype)
            shape = (-1, *([1] * (magnitude.dim() - 1)))
            # (abs: a step turned towards the room by bounds is negative)
            rounding = ROUNDING_SAFETY * eps.reshape(shape) * magnitude.abs()
            if not stencil.imaginary and jac.numel():  # (no subtraction, no cancellation)
                fourth = differences[1][k] if differences else None
                rounding = _cancelled_rounding(
                    rounding, jac, x, columns.steps, eps, fourth, weight_sum, call.misfit
                )
            rounding_blocks.append(rounding)
            error_blocks.append(spread_block.abs() + rounding)
        if differences and jac_blocks:
            beyond = _beyond_taylor(
                jac_blocks, spread_blocks, rounding_blocks, differences, gain, call.misfit
            )
            error_blocks = [
                torch.where(beyond.reshape(-1, *([1] * (e.dim() - 1))), math.inf, e)
                for e in error_blocks
            ]
        jac = dense.assemble(options, call, columns, 0)
        plan = call.plan
        error = to_torch_func_layout(
            error_blocks, columns.out_spec, plan.shapes, plan.spec, options.single_argnum
        )
        return (jac, error, columns.aux) if has_aux else (jac, error)

    return jacobian_with_error


def _cancelled_rounding(
    rounding: torch.Tensor,
    jac: torch.Tensor,
    x: torch.Tensor,
    steps: torch.Tensor,
    eps: torch.Tensor,
    fourth: torch.Tensor | None,
    weight_sum: float,
    misfit: torch.Tensor | None,
) -> torch.Tensor:
    """The rounding bound of one output leaf's columns where f's value cancels.

    ``eps |f|`` misses the rounding of the terms that cancel in f (a residual
    ``model - y``). Output i has a term at least ``M_i = max_j |x_j J_ij|`` in size
    (exactly that for a term linear in x_j), whose rounding survives; and the
    4th differences (central schemes: ``fourth``, divided by h) are rounding
    where the steps are in the Taylor region: their median over the columns,
    less prone than one entry's to a rounding that happens to follow a line.
    """
    shape = (-1, *([1] * (jac.dim() - 1)))
    h = steps.to(jac).abs().reshape(shape)  # (a step turned by bounds is negative)
    # A column that is not finite (func NaN at one point) leaves the others alone.
    terms = (x.to(jac).reshape(shape) * jac).abs().nan_to_num(0.0, 0.0, 0.0).amax(0)
    rounding = torch.maximum(rounding, TERM_SAFETY * eps.reshape(shape) * weight_sum * terms / h)
    if fourth is not None:
        fourth = fourth * h
        if misfit is not None:  # one-sided columns: their central points were not used
            fourth = torch.where(misfit.to(fourth.device).reshape(shape), math.nan, fourth)
        noise = torch.nanmedian(fourth.abs(), 0).values.nan_to_num(0.0, 0.0, 0.0)
        rounding = rounding + NOISE_SAFETY * weight_sum * noise / (math.sqrt(70) * h)
    return rounding


def _checks_taylor(stencil: Stencil) -> bool:
    """Central stencils (offsets -1..1 at h, -2..2 at 2h) have the points of the check."""
    return not stencil.imaginary and min(stencil.offsets) == -max(stencil.offsets)


def _beyond_taylor(
    jac_blocks: list[torch.Tensor],
    spread_blocks: list[torch.Tensor],
    rounding_blocks: list[torch.Tensor],
    differences: list[list[torch.Tensor]],
    gain: int,
    misfit: torch.Tensor | None,
) -> torch.Tensor:
    """Per column: True where neither the odd nor the even differences decay.

    Inside the Taylor region of a function curved on the scale r, ``|D_h - D_2h|``
    is ``~(h/r)**2 |D_h|`` and the 4th difference ``~(h/r)**2`` times the 2nd; beyond
    it (a pole or a bend within the stencil) they are alike. One ratio alone also
    fails where a derivative vanishes (``x**3`` or a minimum at x), both only when
    the step is too large. Each compares maxima over the column's outputs, less
    the rounding, so that an output independent of the input counts for nothing.
    """
    odd, odd_scale, even, even_scale = [], [], [], []
    for jac, spread, rounding, second, fourth in zip(
        jac_blocks, spread_blocks, rounding_blocks, *differences
    ):
        if not jac.numel():
            continue
        odd.append(_column_max(gain * spread.abs() - rounding))
        odd_scale.append(_column_max((jac - spread).abs()))  # D_h
        even.append(_column_max(fourth.abs() - 3 * rounding))
        even_scale.append(_column_max(second.abs()))

    if not odd:
        return torch.zeros(jac_blocks[0].shape[0], dtype=torch.bool, device=jac_blocks[0].device)

    def most(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(values).amax(0) if len(values) > 1 else values[0]

    beyond = (most(odd) > TAYLOR_RATIO * most(odd_scale)) & (
        most(even) > TAYLOR_RATIO * most(even_scale)
    )
    if misfit is not None:  # those columns are one-sided: no central differences
        beyond = beyond & ~misfit.to(beyond.device)
    return beyond


def _column_max(block: torch.Tensor) -> torch.Tensor:
    """The largest value of each column (dim 0) over its outputs, in float64."""
    return block.reshape(block.shape[0], -1).amax(1).double()
