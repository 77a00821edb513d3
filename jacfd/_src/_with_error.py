"""``jacfd_with_error``: a Richardson-extrapolated Jacobian with a per-entry error estimate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, overload

import torch

from ._bounds import OneSided
from ._contract import Contraction
from ._driver import run_points
from ._inputs import Argnums, P, wraps
from ._layout import to_torch_func_layout
from ._plan import Options, Planner, check_options
from ._random import Randomness
from ._stencil import Scheme, richardson
from ._steps import Delta
from ._strategy import StrategyOption as Strategy
from ._structure import Dense
from ._workers import Workers

ROUNDING_SAFETY = 4.0
"""Rounding error of one evaluation of f, in units of eps * |f|: a few ulps for
the element-wise and matmul-based functions of the error-estimate tests."""


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
    and a rounding bound ``4 eps sum_k |w_k| |f(x_k)| / h``. Where every
    difference is exactly zero (an output that does not depend on an input),
    the Jacobian entry is exactly zero; its error keeps the rounding bound, as
    a derivative below it would leave every value unchanged too.

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

    @wraps(func)
    def jacobian_with_error(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        call = planner.prepare(args, kwargs)
        columns = run_points(call, options)
        if one_sided is not None:
            columns = one_sided.merge(call, columns, args, kwargs)
        _, spread_blocks, magnitude_blocks = columns.blocks
        # The rounding of one evaluation, relative: eps of the coarser of input and output.
        input_eps = torch.cat(
            [
                torch.full((leaf.numel(),), torch.finfo(leaf.dtype).eps, dtype=torch.float64)
                for leaf in call.primals
            ]
        )
        error_blocks = []
        for spread_block, magnitude in zip(spread_blocks, magnitude_blocks):
            eps = input_eps.clamp_min(torch.finfo(magnitude.dtype).eps)
            if call.noise is not None:  # func's own noise, given or estimated
                eps = eps.clamp_min(call.noise)
            eps = (eps**options.noise_exponent).to(magnitude.device, magnitude.dtype)
            scale = eps.reshape(-1, *([1] * (magnitude.dim() - 1)))
            # (abs: a step turned towards the room by bounds is negative)
            error_blocks.append(spread_block.abs() + ROUNDING_SAFETY * scale * magnitude.abs())
        jac = dense.assemble(options, call, columns, 0)
        plan = call.plan
        error = to_torch_func_layout(
            error_blocks, columns.out_spec, plan.shapes, plan.spec, options.single_argnum
        )
        return (jac, error, columns.aux) if has_aux else (jac, error)

    return jacobian_with_error
