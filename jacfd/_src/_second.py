"""Second derivatives from second-difference stencils: ``hessfd`` (the full
Hessian), ``hessdiagfd`` (its diagonal) and ``laplacianfd`` (its trace).

The diagonal needs only the 1-D stencils along each coordinate, ``2n + 1``
evaluations, which is what physics-informed losses need. The full Hessian also
needs the mixed points ``x ± h_i e_i ± h_j e_j``: about ``2 n**2`` evaluations
(``n**2 / 2`` one-sided).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_unflatten

from ._bounds import OneSided
from ._contract import Contraction
from ._driver import run_points
from ._express import Express, Finish
from ._inputs import Argnums, P, wraps
from ._layout import to_hessian_layout
from ._mixed import MixedPoints, MixedStencil
from ._plan import Options, Planner, PointsFactory, check_options
from ._random import Randomness
from ._stencil import Scheme, Stencil, get_stencil
from ._steps import Delta, mark_noise
from ._strategy import StrategyOption as Strategy
from ._structure import Dense
from ._workers import Workers


def hessdiagfd(
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
) -> Callable[P, Any]:
    """The Hessian's diagonal ``d²f/dx_i²`` for every input element, in O(n) evaluations.

    Second differences ``(f(x+h e_i) - 2 f(x) + f(x-h e_i)) / h**2`` (or higher
    orders) along every coordinate, all in one vmap call: ``2n + 1`` evaluations
    for central differences, instead of the ``n**2`` entries of a full Hessian.

    Args:
        func: As in :func:`jacfd`.
        argnums: As in :func:`jacfd`.
        delta: The step. ``None`` (default) picks ``eps**(1/(p+2)) * max(1, |x|)``
            per element for a scheme of order ``p`` (``eps**(1/4)`` for central
            differences); a float, tensor or pytree as in :func:`jacfd`.
        scheme: ``"central"`` (default), ``"forward"`` or ``"backward"``.
        order: The power of h in the truncation error: 2 (default), 4, 6, 8 for
            central; 1 (default) to 4 for one-sided schemes.
        has_aux: As in :func:`jacfd`.
        chunk_size: As in :func:`jacfd`.
        randomness: As in :func:`jacfd`.
        strategy: As in :func:`jacfd`.
        workers: As in :func:`jacfd`.
        process_group: As in :func:`jacfd`.
        typical: As in :func:`jacfd`.
        noise: As in :func:`jacfd`.
        bounds: As in :func:`jacfd`; near a bound a central stencil is replaced
            by a one-sided second-difference stencil of the same order (at most 4).

    Returns:
        A function returning the second derivatives in :func:`jacfd`'s layout
            (each leaf ``out_leaf.shape + in_leaf.shape``), and ``aux`` if ``has_aux``.

    Examples:
        >>> import torch
        >>> from jacfd import hessdiagfd
        >>> x = torch.tensor([0.5, 1.0], dtype=torch.float64)
        >>> d = hessdiagfd(lambda x: (x**3).sum())(x)
        >>> torch.allclose(d, 6 * x)
        True
    """
    options = check_options(
        "hessdiagfd",
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
    return _diagonal_transform(func, options, None)


def laplacianfd(
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
) -> Callable[P, Any]:
    """The Laplacian ``sum_i d²f/dx_i²`` over every differentiated input element.

    The trace of the Hessian from the same ``2n + 1`` evaluations as
    :func:`hessdiagfd`, taking the same arguments; for a vector-valued ``func``,
    the Laplacian of each output element. Compose with ``torch.func.vmap`` to
    evaluate it at a batch of collocation points.

    Returns:
        A function returning a pytree like ``func``'s output (each leaf of its
            output's shape), and ``aux`` if ``has_aux``.

    Examples:
        >>> import torch
        >>> from jacfd import laplacianfd
        >>> points = torch.rand(8, 2, dtype=torch.float64)
        >>> u = lambda p: p[0] ** 2 + 3 * p[1] ** 2
        >>> lap = torch.func.vmap(laplacianfd(u))(points)
        >>> torch.allclose(lap, torch.full((8,), 8.0, dtype=torch.float64))
        True
    """
    options = check_options(
        "laplacianfd",
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
    return _diagonal_transform(func, options, _sums)


def _sums(columns: list[torch.Tensor], out_spec: TreeSpec) -> Any:
    """The Laplacian: each output leaf's second derivatives summed over directions."""
    return tree_unflatten([block.sum(0) for block in columns], out_spec)


def _diagonal_transform(
    func: Callable[..., Any], options: Options, finish: Finish | None
) -> Callable[..., Any]:
    """``finish`` makes the result from the columns of either path (None: jacrev's
    layout, as ``Dense`` assembles it)."""
    stencil = options.stencil

    def build(options: Options) -> Planner:
        offsets = options.stencil.shifted_offsets
        contraction = Contraction.of(options.stencil, offsets)
        with_center = contraction.needs_center or options.has_aux
        return Planner(
            func,
            options,
            lambda primals: Dense().points(options, primals, offsets, [contraction], with_center),
            Express.factory(func, options, finish),
        )

    planner = build(options)
    one_sided = OneSided.of(options, build)

    @wraps(func)
    def transformed(*args: Any, **kwargs: Any) -> Any:
        result = planner.express(args, kwargs)
        if result is not None:
            return result
        call = planner.prepare(args, kwargs)
        columns = run_points(call, options)
        if one_sided is not None:
            columns = one_sided.merge(call, columns, args, kwargs)
        if finish is None:
            result = Dense().assemble(options, call, columns)
        else:
            result = finish(columns.blocks[0], columns.out_spec)
        return (result, columns.aux) if options.has_aux else result

    mark_noise(transformed, options.noise_exponent * stencil.accuracy_exponent)
    return transformed


def hessfd(
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
) -> Callable[P, Any]:
    """The Hessian of ``func`` from second-difference stencils, laid out like
    ``torch.func.hessian``.

    Central differences (default, error O(h**2)) use ``f(x)``, ``f(x ± h_i e_i)``
    and ``f(x ± h_i e_i ± h_j e_j)`` for i < j: ``2 n**2 + 1`` evaluations.
    Forward (backward) differences use ``f(x)``, ``f(x + h_i e_i)`` and
    ``f(x + h_i e_i + h_j e_j)`` for i <= j: ``(n + 1)(n + 2) / 2`` evaluations,
    error O(h). With ``order=p`` the mixed entries use the product of two
    first-derivative stencils of order ``p`` and the diagonal the
    second-derivative stencil of order ``p`` (about ``p**2 n**2 / 2`` points for
    central differences). All points go to ``func`` in one vmap call, or in
    calls of at most ``chunk_size`` points: for large ``n``, set ``chunk_size``
    to bound memory, since every point copies all ``n`` inputs.

    Args:
        func: As in :func:`jacfd`.
        argnums: As in :func:`jacfd`.
        delta: The step. ``None`` (default) picks ``eps**(1/4) * max(1, |x|)``
            for central and ``eps**(1/3) * max(1, |x|)`` for one-sided schemes;
            a float, tensor or pytree as in :func:`jacfd`.
        scheme: ``"central"`` (default), ``"forward"`` or ``"backward"``.
        order: The power of h in the truncation error: 2 (default), 4, 6, 8 for
            central; 1 (default) to 4 for one-sided schemes. The automatic
            step is ``eps**(1/(p+2)) * max(1, |x|)`` times the stencil's constant.
        has_aux: As in :func:`jacfd`.
        chunk_size: As in :func:`jacfd`.
        randomness: As in :func:`jacfd`.
        strategy: As in :func:`jacfd`.
        workers: As in :func:`jacfd`.
        process_group: As in :func:`jacfd`.
        typical: As in :func:`jacfd`.
        noise: As in :func:`jacfd`.
        bounds: As in :func:`jacfd`; near a bound a central stencil is replaced
            by a one-sided second-difference stencil of the same order (at most 4).

    Returns:
        A function returning the Hessian: each leaf has shape
            ``out.shape + in_a.shape + in_b.shape``, nested as output pytree,
            argnums tuple, input pytree, argnums tuple, input pytree (the levels of
            argnums only when it is a tuple), exactly as ``torch.func.hessian``.

    Examples:
        >>> import torch
        >>> from jacfd import hessfd
        >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
        >>> f = lambda x: x[0] ** 2 * x[1]
        >>> torch.allclose(hessfd(f)(x), torch.func.hessian(f)(x))
        True
    """
    options = check_options(
        "hessfd",
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
    second = options.stencil

    def build(options: Options) -> Planner:
        second = options.stencil
        stencil = MixedStencil.product(first_stencil(second), second)
        return Planner(func, options, mixed_points(options, [stencil]))

    planner = build(options)
    one_sided = OneSided.of(options, build)

    @wraps(func)
    def hessian(*args: Any, **kwargs: Any) -> Any:
        call = planner.prepare(args, kwargs)
        columns = run_points(call, options)
        if one_sided is not None:
            columns = one_sided.merge(call, columns, args, kwargs, mixed=True)
        plan = call.plan
        result = to_hessian_layout(
            columns.blocks[0], columns.out_spec, plan.shapes, plan.spec, options.single_argnum
        )
        return (result, columns.aux) if has_aux else result

    mark_noise(hessian, options.noise_exponent * second.accuracy_exponent)
    return hessian


def first_stencil(second: Stencil) -> Stencil:
    """The first-derivative stencil of the mixed entries: of the same order, and
    central, forward or backward as the second-derivative stencil ``second`` is."""
    offsets = second.offsets
    sided = "central" if min(offsets) < 0 < max(offsets) else "forward"
    if min(offsets) < 0 and max(offsets) <= 0:
        sided = "backward"
    return get_stencil(sided, second.accuracy, 1)


def mixed_points(options: Options, stencils: list[MixedStencil]) -> PointsFactory:
    """The point set of the full Hessian's ``stencils``, for a :class:`Planner`."""

    def points(primals: list[Any]) -> tuple[MixedPoints, None]:
        n = sum(leaf.numel() for leaf in primals)
        device = primals[0].device
        return MixedPoints(n, stencils, device, options.chunk_size), None

    return points
