"""``jacfd``: finite-difference Jacobians in ``torch.func`` layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from ._bounds import OneSided
from ._coloring import color_columns
from ._contract import Contraction
from ._driver import run_points
from ._express import Express
from ._inputs import Argnums, P, wraps
from ._plan import Options, Planner, check_options
from ._random import Randomness
from ._stencil import Scheme
from ._steps import Delta, mark_noise
from ._strategy import Batched
from ._strategy import StrategyOption as Strategy
from ._structure import Dense, PerSample, Sparse, Structure
from ._workers import Workers


def jacfd(
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
    sparsity: Any = None,
    sparse_output: bool = False,
    batch_dim: int | None = None,
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> Callable[P, Any]:
    """Jacobian of ``func`` by finite differences, laid out like ``torch.func.jacrev``.

    Every coordinate of the differentiated arguments is perturbed by a small step
    and ``func`` is evaluated at all the resulting stencil points in one
    ``torch.vmap`` call (or in chunks, or in a plain loop). The differences,
    weighted by the stencil and divided by the steps, are the Jacobian's columns.

    Args:
        func: A function of one or more arguments, returning a tensor or a pytree
            of tensors (and an auxiliary pytree if ``has_aux``). It need not be
            differentiable by autograd.
        argnums: Which positional argument(s) to differentiate: an int or a tuple
            of ints; negative values count from the end. Each may be a tensor or
            a pytree of tensors with a real floating dtype.
        delta: The step. ``None`` (default) picks, per element,
            ``c * eps**(1/(p+1)) * max(1, |x|)`` for a scheme of order ``p``:
            about ``1.4 eps**(1/2)`` for ``"forward"``, ``0.8 eps**(1/3)`` for
            ``"central"``, and ``eps`` itself for ``"complex"`` (``c`` balances
            the stencil's rounding and truncation constants). ``eps`` is the input dtype's, or
            the output's if func returns a less precise dtype. A positive float
            is an absolute step for every element. A tensor (broadcastable to the
            one differentiated tensor) or a pytree of tensors and floats matching
            the differentiated arguments gives per-element steps. Real steps are
            rounded so that ``x + h`` is exactly representable.
        scheme: ``"central"`` (default), ``"forward"``, ``"backward"``, or
            ``"complex"``: the complex step ``Im f(x + ih) / h``, exact to
            rounding for real-analytic ``func`` that accepts complex tensors.
            jacfd rejects functions that fail on complex input or return only
            real tensors for it, but cannot see a non-analytic op whose result
            stays complex (``x.abs() * x``, ``torch.logsumexp``): check such a
            function once against ``"central"``. When another output leaf is
            complex, a real output leaf that is the same at every point is taken
            as independent of the input (derivative 0, as in ``jacfwd``); a real
            leaf that changes is refused. A real leaf that discards the imaginary
            part (``x.abs()``, ``x.real``) does not change at a step of ``eps``,
            so it too gets 0: make such leaves complex-aware, or use ``"central"``.
        order: The power of ``h`` in the truncation error: 2 (default), 4, 6 or 8
            for ``"central"`` (3, 5, 7 or 9 points); 1 (default) to 4 for
            ``"forward"``/``"backward"``. Higher orders cost more evaluations
            per coordinate and take larger steps, for errors near
            ``eps**(p/(p+1))``.
        has_aux: ``func`` returns ``(output, aux)``; the result is then
            ``(jacobian, aux)`` with ``aux`` taken at the unperturbed inputs.
        chunk_size: ``None`` evaluates every stencil point in one vmap call. A
            positive int bounds the points per call, and so the memory, in grad
            mode too: each chunk keeps only its outputs for backward, which
            evaluates the chunk again (not inside ``torch.func`` transforms nor
            under ``torch.compile``, which keep every chunk's activations). ``1``
            evaluates the points one by one without vmap (as ``strategy="loop"``),
            so ``func`` may call ``.item()``, numpy, or branch on tensor values.
        randomness: As in ``torch.func.vmap``: ``"error"`` (default) forbids
            random operations in ``func``; ``"same"`` gives every stencil point
            the same random numbers (common random numbers), the setting that
            makes finite differences of, e.g., dropout meaningful; ``"different"``
            is accepted for parity with vmap, but the differences of independent
            draws are noise of order ``1/h``.
        strategy: How ``func`` meets the stencil points. ``"vmap"`` (default):
            under ``torch.vmap``. ``"loop"``: one ordinary call per point (with
            ``chunk_size`` points built at a time), for numpy, simulators,
            ``.item()`` and anything vmap cannot trace. ``"batched"`` or a
            :class:`Batched`: ``func`` receives the points as a real batch along
            a dimension you choose, for models that only work on batches.
        sparsity: The Jacobian's non-zero pattern, a boolean tensor (dense, or
            sparse COO/CSR) of shape ``(outputs, inputs)`` with all output and
            all differentiated input elements flattened leaf after leaf (for
            one tensor in and out: ``(out.numel(), in.numel())``). Its columns
            are coloured once, here, so that columns sharing no row are
            perturbed together: one evaluation per colour and stencil point
            instead of per input element. See :func:`banded_pattern` and
            :func:`check_sparsity`.
        sparse_output: With ``sparsity``, return the Jacobian as one sparse COO
            tensor of shape ``(outputs, inputs)`` instead of dense leaves.
        batch_dim: Per-sample Jacobians of a function whose samples do not
            interact (``func(X)[b]`` depends on ``X[b]`` only), with the batch
            along ``batch_dim`` of every differentiated input and every output.
            The same feature of every sample is perturbed at once, so the cost
            is that of the per-sample input size, whatever the batch size. The
            result leaves have shape ``(B, *out_sample, *in_sample)``. With
            ``strategy="batched"`` the stencil points are folded into the
            function's own batch axis.
        workers: Where the stencil points are evaluated, as in scipy's
            ``approx_derivative``: ``None`` (default) in this process; an int
            ``n``, by ``n`` processes (``-1``: one per core): this one and
            ``n - 1`` worker processes made for this call and joined before it
            returns (``func`` and its arguments must be picklable: no lambda or
            closure); or any map-like callable, called
            as ``workers(fn, tasks)``, e.g. a long-lived ``Pool(4).map`` or
            ``ThreadPoolExecutor(4).map``. Each task is a chunk of
            ``chunk_size`` points (default: about four tasks per worker),
            evaluated by ``strategy`` in the worker; the result is bitwise that
            of ``workers=None`` with the same ``chunk_size`` (with an int, every
            process evaluates with one torch thread: where func's values depend
            on the thread count, that of one thread). Results carry no autograd
            graph through ``func``. See :doc:`parallel`.
        process_group: A ``torch.distributed`` process group (e.g.
            ``torch.distributed.group.WORLD``) to share the points among: every
            rank calls with the same arguments, evaluates its share of the
            chunks on its own device, and returns the whole Jacobian (the
            values are all-gathered). ``None`` (default): this process only.
        typical: The size of an input that is typical for func: the automatic
            step is then ``c * eps**(1/(p+1)) * max(|x|, typical)`` instead of
            ``max(|x|, 1)`` (Dennis and Schnabel's ``typx``). A positive float, a
            tensor broadcastable to the differentiated tensor, or a pytree
            matching the differentiated arguments. Give it for inputs whose
            natural size is far below 1 (rate constants of 1e-5, lengths in
            km), e.g. ``typical=x.abs().clamp_min(1e-12)`` for a relative step.
        noise: How accurate func's values are. ``None`` (default): to the
            output dtype's eps. A float: their relative noise (e.g. an ODE
            solver's ``rtol``, or ``6e-8`` for float32 arithmetic behind
            float64 casts); the steps balance truncation against
            ``max(eps, noise)``. ``"estimate"``: measured at every call from 9
            extra evaluations along a seeded random direction (Moré and Wild's
            ECnoise; see :func:`estimate_noise`, which returns the level used).
        bounds: ``(lower, upper)``: func is never evaluated outside them. Each
            a float (``-math.inf``/``math.inf`` for none), a tensor broadcastable
            to the differentiated tensor, or a pytree matching the
            differentiated arguments. Near a bound a one-sided stencil steps
            towards the room; a central one is replaced, for those coordinates,
            by a one-sided stencil of the same order (at most 4; one extra pass
            of evaluations when some coordinate needs it); a step shrinks where
            the room is shorter than the stencil. A point outside the bounds is
            refused.

    Returns:
        A function taking the same arguments as ``func`` and returning its
            Jacobian: each leaf has shape ``out_leaf.shape + in_leaf.shape`` and the
            dtype of ``out_leaf`` (its real dtype for ``"complex"``); the nesting is
            the output pytree, then the argnums tuple (if argnums is a tuple), then
            the input pytree.

    Examples:
        >>> import torch
        >>> from jacfd import jacfd
        >>> x = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
        >>> J = jacfd(torch.sin)(x)
        >>> torch.allclose(J, torch.diag(torch.cos(x)))
        True
        >>> jacfd(lambda x, y: x * y, argnums=(0, 1))(x, x)[1].shape
        torch.Size([3, 3])
        >>> J = jacfd(torch.exp, scheme="complex")(x)
        >>> bool((J - torch.diag(torch.exp(x))).abs().max() < 1e-15)
        True
    """
    options = check_options(
        "jacfd",
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
    structure = _structure(sparsity, sparse_output, batch_dim, strategy)
    options = dataclasses.replace(options, strategy=structure.strategy(options.strategy))
    return _transform(func, options, structure)


def _transform(func: Callable[P, Any], options: Any, structure: Structure) -> Callable[P, Any]:
    stencil = options.stencil

    def build(options: Options) -> Planner:
        offsets = options.stencil.shifted_offsets
        contraction = Contraction.of(options.stencil, offsets)
        with_center = contraction.needs_center or (
            options.has_aux and not options.stencil.imaginary
        )
        return Planner(
            func,
            options,
            lambda primals: structure.points(
                options, primals, offsets, [contraction], with_center
            ),
            Express.factory(func, options) if isinstance(structure, Dense) else None,
        )

    planner = build(options)
    # Colours mix coordinates: only a dense Jacobian takes columns from a one-sided pass.
    one_sided = OneSided.of(options, build) if isinstance(structure, Dense) else None

    @wraps(func)
    def jacobian(*args: Any, **kwargs: Any) -> Any:
        result = planner.express(args, kwargs)
        if result is not None:
            return result
        call = planner.prepare(args, kwargs)
        columns = run_points(call, options)
        if one_sided is not None:
            columns = one_sided.merge(call, columns, args, kwargs)
        jac = structure.assemble(options, call, columns)
        return (jac, columns.aux) if options.has_aux else jac

    # Values of this function are accurate to ~eps**(p/(p+q)) of func's own: a
    # jacfd around it reads this to size its step for that noise, not for eps.
    mark_noise(jacobian, options.noise_exponent * stencil.accuracy_exponent)
    return jacobian


def _structure(
    sparsity: Any, sparse_output: object, batch_dim: object, strategy: object
) -> Structure:
    """Validates the structure options, and colours a sparsity pattern once."""
    if not isinstance(sparse_output, bool):
        raise TypeError(f"jacfd(func, sparse_output): expected a bool, got {sparse_output!r}.")
    if sparse_output and sparsity is None:
        raise ValueError(
            "jacfd(func, sparse_output=True): a sparse output needs a sparsity pattern; "
            "pass sparsity=..."
        )
    if batch_dim is not None:
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int):
            raise TypeError(f"jacfd(func, batch_dim): expected an int or None, got {batch_dim!r}.")
        if sparsity is not None:
            raise ValueError(
                "jacfd(func, sparsity, batch_dim): choose one; batch_dim already "
                "implies the block-diagonal pattern of independent samples."
            )
        if isinstance(strategy, Batched):
            raise ValueError(
                "jacfd(func, batch_dim, strategy=Batched(...)): with batch_dim the points "
                "are folded into func's own batch axis; pass strategy='batched'."
            )
        return PerSample(batch_dim)
    if sparsity is None:
        return Dense()
    if isinstance(sparsity, torch.Tensor) and torch._C._functorch.is_batchedtensor(sparsity):
        raise ValueError(
            "jacfd(func, sparsity): the pattern differs across a torch.func.vmap batch "
            "(it was computed from a vmapped tensor); one pattern must serve every sample. "
            "Build it outside vmap, e.g. from the union of the samples' patterns."
        )
    # Colouring is plain index arithmetic on the pattern, with no derivative; under
    # torch.func.grad or vmap (a transform built inside them) the sparse CSR
    # products it uses have no functorch support, so it runs outside them.
    with torch._C._DisableFuncTorch():
        coloring = color_columns(sparsity)
    return Sparse(coloring, sparse_output)
