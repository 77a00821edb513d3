"""``hessfd_with_error``: second derivatives (the Hessian, its diagonal or the
Laplacian) Richardson-extrapolated from the steps ``h`` and ``2h``, with a
per-entry error estimate, as :func:`jacfd_with_error` does for Jacobians.

One point set holds the stencil's points at ``h`` and at ``2h`` (for the full
Hessian, the union of the two product stencils: :class:`MixedPoints`; for the
diagonal and the Laplacian, :class:`AxisPoints`), evaluated in one run; three
contractions of those values give the extrapolated derivatives, the spread
``(D_h - D_2h) / (2**p - 1)`` and the rounding bound ``sum |w_k| |f(x_k)|``.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from typing import Any, Literal, overload

import torch
from torch.utils._pytree import tree_unflatten

from ._bounds import OneSided
from ._contract import Contraction
from ._driver import Columns, run_points
from ._inputs import Argnums, P, wraps
from ._layout import to_hessian_layout
from ._mixed import MixedStencil
from ._plan import Call, Options, Planner, check_options
from ._random import Randomness
from ._second import first_stencil, mixed_points
from ._stencil import Scheme, Stencil, richardson
from ._steps import Delta
from ._strategy import StrategyOption as Strategy
from ._structure import Dense
from ._with_error import ROUNDING_SAFETY
from ._workers import Workers

Part = Literal["full", "diagonal", "laplacian"]
PARTS = ("full", "diagonal", "laplacian")
SAFETY = 2.0
"""Factor on the spread ``|H_h - H_2h| / (2**p - 1)``: one sample of the rounding
where rounding dominates, so a margin over it."""


@overload
def hessfd_with_error(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    part: Part = "full",
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
def hessfd_with_error(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    part: Part = "full",
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
def hessfd_with_error(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    part: Part = "full",
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


def hessfd_with_error(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    part: Part = "full",
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
    """Second derivatives with a per-entry error estimate.

    ``part`` selects what :func:`hessfd` (``"full"``), :func:`hessdiagfd`
    (``"diagonal"``) or :func:`laplacianfd` (``"laplacian"``) compute. ``func`` is
    evaluated once, at the stencil's points for the steps ``h`` and ``2h``
    (central order 2: ``4 n**2 + 1`` points for the full Hessian, ``4 n + 1``
    for the diagonal or the Laplacian). The two estimates combine to
    ``(2**p H_h - H_2h) / (2**p - 1)``, which cancels the leading error term.
    The estimate is ``2 |H_h - H_2h| / (2**p - 1)`` plus a rounding bound
    ``4 eps sum_k |w_k| |f(x_k)| / (h_i h_j)`` over the extrapolated stencil's
    weights (with ``noise``, ``max(eps, noise)``).

    Takes the same arguments as :func:`hessfd`, and ``part``. With ``bounds``,
    the points at ``2h`` stay inside the bounds too: coordinates without room
    for the central points at ``2h`` get the one-sided stencil (of the same
    order, at most 4) at ``h`` and ``2h``, in a second run.

    Args:
        func: As in :func:`hessfd`.
        argnums: As in :func:`hessfd`.
        delta: The step ``h``, as in :func:`hessfd` (the second run is at ``2h``).
        scheme: ``"central"`` (default), ``"forward"`` or ``"backward"``.
        order: As in :func:`hessfd`.
        part: ``"full"`` (default), ``"diagonal"`` or ``"laplacian"``.
        has_aux: As in :func:`jacfd`.
        chunk_size: As in :func:`hessfd`.
        randomness: As in :func:`jacfd`.
        strategy: As in :func:`jacfd`.
        workers: As in :func:`jacfd`.
        process_group: As in :func:`jacfd`.
        typical: As in :func:`jacfd`.
        noise: As in :func:`jacfd`; also the rounding bound's relative accuracy.
        bounds: As in :func:`hessfd`.

    Returns:
        A function returning ``(value, error)``, or ``(value, error, aux)`` with
            ``has_aux``: both in the layout of the chosen transform, ``error >= 0``.

    Examples:
        >>> import torch
        >>> from jacfd import hessfd_with_error
        >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
        >>> f = lambda x: torch.sin(x[0]) * torch.exp(x[1])
        >>> H, err = hessfd_with_error(f)(x)
        >>> bool(((H - torch.func.hessian(f)(x)).abs() <= err).all())
        True
    """
    name = "hessfd_with_error"
    if part not in PARTS:
        raise ValueError(
            f"{name}(func, part={part!r}): part must be 'full', 'diagonal' or 'laplacian'."
        )
    options = check_options(
        name,
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
        derivative=2,
        typical=typical,
        noise=noise,
        bounds=bounds,
    )
    full = part == "full"

    def build(options: Options) -> Planner:
        second = options.stencil
        if full:
            return Planner(func, options, mixed_points(options, _mixed_stencils(second)))
        extrapolated, spread = richardson(second)
        offsets = tuple(o for o in extrapolated.offsets if o != 0)
        contractions = [
            Contraction.of(extrapolated, offsets),
            Contraction.of(spread, offsets),
            Contraction.of(extrapolated, offsets, absolute=True),
        ]
        with_center = any(c.needs_center for c in contractions) or options.has_aux
        return Planner(
            func,
            options,
            lambda primals: Dense().points(options, primals, offsets, contractions, with_center),
        )

    planner = build(options)
    one_sided = OneSided.of(options, build)

    @wraps(func)
    def with_error(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        call = planner.prepare(args, kwargs)
        columns = run_points(call, options)
        if one_sided is not None:
            columns = one_sided.merge(call, columns, args, kwargs, mixed=full)
        values, spreads, magnitudes = columns.blocks
        eps = _precision(call, options)
        errors = []
        for spread, magnitude in zip(spreads, magnitudes):
            e = eps.clamp_min(torch.finfo(magnitude.dtype).eps) ** options.noise_exponent
            e = e.to(magnitude.device, magnitude.dtype)
            if full:  # the coarser of the pair's two coordinates
                e = torch.maximum(e[:, None], e[None, :])
            e = e.reshape(*e.shape, *([1] * (magnitude.dim() - e.dim())))
            rounding = ROUNDING_SAFETY * e * magnitude
            if part == "laplacian":
                errors.append(SAFETY * spread.sum(0).abs() + rounding.sum(0))
            else:
                errors.append(SAFETY * spread.abs() + rounding)
        if part == "laplacian":
            values = [v.sum(0) for v in values]
        value = _layout(part, options, call, columns, values)
        error = _layout(part, options, call, columns, errors)
        return (value, error, columns.aux) if has_aux else (value, error)

    return with_error


def _mixed_stencils(second: Stencil) -> list[MixedStencil]:
    """The full Hessian's contractions of the points at ``h`` and ``2h``: the
    extrapolation, the spread and the extrapolation's absolute weights."""
    first = first_stencil(second)
    power = Fraction(2**second.accuracy)
    gain = 1 / (power - 1)
    fine = (first, second)
    coarse = (first.scaled(2), second.scaled(2))
    extrapolated = [(power * gain, *fine), (-gain, *coarse)]
    spread = [(gain, *fine), (-gain, *coarse)]
    return [
        MixedStencil.combine(extrapolated),
        MixedStencil.combine(spread),
        MixedStencil.combine(extrapolated, absolute=True),
    ]


def _precision(call: Call, options: Options) -> torch.Tensor:
    """Per coordinate, the relative rounding of one value of func: its input's eps,
    or the output's if coarser, or func's noise if larger (float64)."""
    eps = torch.cat(
        [
            torch.full((leaf.numel(),), torch.finfo(leaf.dtype).eps, dtype=torch.float64)
            for leaf in call.primals
        ]
    ).clamp_min(call.plan.output_eps[0])
    noise = call.noise  # given, or estimated (a 0-dim tensor per sample under vmap)
    if noise is None:
        return eps
    if isinstance(noise, torch.Tensor):
        return torch.maximum(eps, noise.to(torch.float64))
    return eps.clamp_min(noise)


def _layout(
    part: str, options: Options, call: Call, columns: Columns, blocks: list[torch.Tensor]
) -> Any:
    plan = call.plan
    if part == "full":
        return to_hessian_layout(
            blocks, columns.out_spec, plan.shapes, plan.spec, options.single_argnum
        )
    if part == "laplacian":
        return tree_unflatten(blocks, columns.out_spec)
    return Dense().assemble(options, call, _with_blocks(columns, blocks))


def _with_blocks(columns: Columns, blocks: list[torch.Tensor]) -> Columns:
    return Columns([blocks], columns.out_spec, columns.center, columns.aux, columns.steps)
