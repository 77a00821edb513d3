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
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._engine import (
    Call,
    Options,
    check_options,
    coarser_output,
    coordinate_columns,
    make_rng,
    prepare,
    steps_for,
    with_output_precision,
)
from ._evaluate import Randomness, Strategy, evaluate
from ._inputs import Argnums, P, wraps
from ._layout import Contraction, to_hessian_layout, to_torch_func_layout
from ._stencil import Scheme
from ._steps import NOISE_EXPONENT, Delta


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
        argnums,
        delta,
        scheme,
        order,
        has_aux,
        chunk_size,
        randomness,
        strategy,
        2,
    )
    single = isinstance(argnums, int)
    return _diagonal_transform(
        func,
        options,
        lambda call, columns: to_torch_func_layout(
            columns.blocks[0], columns.out_spec, call.primals, call.spec, single
        ),
    )


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
        argnums,
        delta,
        scheme,
        order,
        has_aux,
        chunk_size,
        randomness,
        strategy,
        2,
    )
    return _diagonal_transform(
        func,
        options,
        lambda call, columns: tree_unflatten(
            [block.sum(0) for block in columns.blocks[0]], columns.out_spec
        ),
    )


def _diagonal_transform(
    func: Callable[..., Any], options: Options, finish: Callable[[Call, Any], Any]
) -> Callable[..., Any]:
    stencil = options.stencil
    offsets = stencil.shifted_offsets
    contraction = Contraction.of(stencil, offsets)

    @wraps(func)
    def transformed(*args: Any, **kwargs: Any) -> Any:
        call = prepare(func, args, kwargs, options)
        columns = coordinate_columns(
            call, options, offsets, [contraction], need_center=bool(stencil.center_weight)
        )
        result = finish(call, columns)
        return (result, columns.aux) if options.has_aux else result

    setattr(transformed, NOISE_EXPONENT, options.noise_exponent * stencil.accuracy_exponent)
    return transformed


def hessfd(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
) -> Callable[P, Any]:
    """The Hessian of ``func`` from second-difference stencils, laid out like
    ``torch.func.hessian``.

    Central differences (default, error O(h**2)) use ``f(x)``, ``f(x ± h_i e_i)``
    and ``f(x ± h_i e_i ± h_j e_j)`` for i < j: ``2 n**2 + 1`` evaluations.
    Forward (backward) differences use ``f(x)``, ``f(x + h_i e_i)`` and
    ``f(x + h_i e_i + h_j e_j)`` for i <= j: ``(n + 1)(n + 2) / 2`` evaluations,
    error O(h). All points go to ``func`` in one vmap call, or in calls of at
    most ``chunk_size`` points: for large ``n``, set ``chunk_size`` to bound
    memory, since every point copies all ``n`` inputs.

    Args:
        func: As in :func:`jacfd`.
        argnums: As in :func:`jacfd`.
        delta: The step. ``None`` (default) picks ``eps**(1/4) * max(1, |x|)``
            for central and ``eps**(1/3) * max(1, |x|)`` for one-sided schemes;
            a float, tensor or pytree as in :func:`jacfd`.
        scheme: ``"central"`` (default), ``"forward"`` or ``"backward"``.
        has_aux: As in :func:`jacfd`.
        chunk_size: As in :func:`jacfd`.
        randomness: As in :func:`jacfd`.
        strategy: As in :func:`jacfd`.

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
        "hessfd", func, argnums, delta, scheme, None, has_aux, chunk_size, randomness, strategy, 2
    )
    single = isinstance(argnums, int)

    @wraps(func)
    def hessian(*args: Any, **kwargs: Any) -> Any:
        call = prepare(func, args, kwargs, options)
        n = call.num_coordinates
        plan = _MixedPoints(n, scheme, call.primals[0].device)
        rng = make_rng(options, call, -(-plan.rows // (options.chunk_size or plan.rows)))

        def run(output_eps: float) -> tuple[list[torch.Tensor], Any, Any] | float:
            steps = steps_for(call, options, output_eps)
            h = torch.cat(steps) if len(steps) > 1 else steps[0]
            outputs = evaluate(
                call.at_point,
                lambda start, stop: plan.build(call.primals, h, start, stop),
                plan.rows,
                options.chunk_size,
                options.strategy,
                options.randomness,
                rng,
                options.name,
            )
            flat_out, out_spec = tree_flatten(outputs[0])
            coarser = coarser_output(call, flat_out, output_eps)
            if coarser is not None:
                return coarser
            aux = tree_map(lambda value: value[0], outputs[1]) if options.has_aux else None
            return [plan.reduce(values, h) for values in flat_out], out_spec, aux

        blocks, out_spec, aux = with_output_precision(run)
        result = to_hessian_layout(blocks, out_spec, call.primals, call.spec, single)
        return (result, aux) if has_aux else result

    setattr(hessian, NOISE_EXPONENT, options.noise_exponent * options.stencil.accuracy_exponent)
    return hessian


class _MixedPoints:
    """The points of the 2-D stencils, each ``x + m1 h_c1 e_c1 + m2 h_c2 e_c2``.

    Rows, for central differences: the centre; ``+h_i e_i``; ``-h_i e_i``; then
    for each pair i < j the four sign patterns (++, +-, -+, --). For one-sided
    differences with sign s: the centre; ``s h_i e_i``; then for each pair
    i <= j, ``s (h_i e_i + h_j e_j)``. Only static index arithmetic is used, so
    the tables trace under ``torch.compile``.
    """

    def __init__(self, n: int, scheme: str, device: torch.device) -> None:
        self.n, self.central = n, scheme == "central"
        index = torch.arange(n, device=device)
        zero = torch.zeros(1, dtype=torch.long, device=device)
        ones = torch.ones(n, dtype=torch.long, device=device)
        if self.central:
            self.pairs = torch.triu_indices(n, n, 1, device=device)
            m = self.pairs.shape[1]
            sign1 = torch.tensor([1, 1, -1, -1], device=device).repeat(m)
            sign2 = torch.tensor([1, -1, 1, -1], device=device).repeat(m)
            self.c1 = torch.cat([zero, index, index, self.pairs[0].repeat_interleave(4)])
            self.m1 = torch.cat([zero, ones, -ones, sign1])
            self.c2 = torch.cat([zero, 0 * index, 0 * index, self.pairs[1].repeat_interleave(4)])
            self.m2 = torch.cat([zero, 0 * ones, 0 * ones, sign2])
        else:
            sign = 1 if scheme == "forward" else -1
            self.pairs = torch.triu_indices(n, n, 0, device=device)
            both = sign * torch.ones(self.pairs.shape[1], dtype=torch.long, device=device)
            self.c1 = torch.cat([zero, index, self.pairs[0]])
            self.m1 = torch.cat([zero, sign * ones, both])
            self.c2 = torch.cat([zero, 0 * index, self.pairs[1]])
            self.m2 = torch.cat([zero, 0 * ones, both])
        self.rows = self.c1.numel()

    def build(
        self, primals: list[torch.Tensor], h: torch.Tensor, start: int, stop: int
    ) -> tuple[list[torch.Tensor], list[int | None]]:
        """The leaves at rows ``start:stop``, perturbed on one flat vector."""
        dtype = h.dtype
        flat = torch.cat([p.reshape(-1).to(dtype) for p in primals])
        batch = flat.expand(stop - start, self.n).clone(memory_format=torch.contiguous_format)
        base = torch.arange(stop - start, device=flat.device) * self.n
        for coord, multiple in ((self.c1, self.m1), (self.c2, self.m2)):
            c, m = coord[start:stop], multiple[start:stop]
            batch.view(-1).index_add_(0, base + c, m.to(dtype) * h[c])
        leaves, first = [], 0
        for p in primals:
            part = batch[:, first : first + p.numel()]
            leaves.append(
                torch.unflatten(part, 1, p.shape).to(p.dtype)
                if p.dim()
                else part[:, 0].to(p.dtype)
            )
            first += p.numel()
        return leaves, [0] * len(leaves)

    def reduce(self, values: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``(rows, *out)`` values -> the ``(n, n, *out)`` Hessian blocks."""
        n, out_shape = self.n, values.shape[1:]
        f = values.reshape(self.rows, -1)
        h = h.to(f.real.dtype if f.is_complex() else f.dtype)[:, None]
        center, i, j = f[0], self.pairs[0], self.pairs[1]
        index = torch.arange(n, device=f.device)
        if self.central:
            plus, minus = f[1 : 1 + n], f[1 + n : 1 + 2 * n]
            diagonal = ((plus - center) + (minus - center)) / (h * h)
            quad = torch.unflatten(f[1 + 2 * n :], 0, (-1, 4))
            mixed = ((quad[:, 0] - quad[:, 1]) - (quad[:, 2] - quad[:, 3])) / (4 * h[i] * h[j])
            positions = torch.cat([index * (n + 1), i * n + j, j * n + i])
            entries = torch.cat([diagonal, mixed, mixed])
        else:
            single, pair = f[1 : 1 + n], f[1 + n :]
            upper = ((pair - single[i]) - (single[j] - center)) / (h[i] * h[j])
            # The pairs i < j, located in the row-major i <= j order without masks.
            below, above = torch.triu_indices(n, n, 1, device=f.device)
            strict = below * n - below * (below - 1) // 2 + (above - below)
            positions = torch.cat([i * n + j, above * n + below])
            entries = torch.cat([upper, upper[strict]])
        hessian = torch.zeros(n * n, f.shape[1], dtype=f.dtype, device=f.device)
        return hessian.index_copy(0, positions, entries).reshape(n, n, *out_shape)
