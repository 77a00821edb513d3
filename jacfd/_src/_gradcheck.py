"""``check_grad``: hand-written gradients against finite differences.

Two stages: ``J @ u`` along random directions, then, if that does not agree,
every entry. How the tolerance is set is derived in ``docs/checking.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from ._autograd_reference import Mode, _CheckedCall
from ._engine import Options, check_options
from ._evaluate import Batched, Strategy
from ._gradcheck_report import (
    DIRECTIONS,
    DIRECTIONS_TIGHTER,
    WORST,
    GradCheckEntry,
    GradCheckError,
    GradCheckPair,
    GradCheckReport,
)
from ._inputs import Argnums, normalize_argnums
from ._stencil import Scheme, Stencil


def _automatic_step(stencil: Stencil, precision: float) -> float:
    """The stencil's error-balancing relative step for values accurate to
    ``precision`` (to be replaced by the engine's own step helper)."""
    step: float = stencil.step_constant * precision**stencil.step_exponent
    return step


ROUNDING_ULPS = 16.0
"""The default ``atol`` is ``ROUNDING_ULPS * eps * max|J|`` per input/output pair:
the rounding of autograd's own Jacobian (a sum of products with a few dozen
terms), which ``jacfd_with_error``'s estimate does not cover. It keeps entries
that are zero in exact arithmetic from failing on autograd's round-off."""


def check_grad(
    func: Callable[..., Any],
    *args: Any,
    argnums: Argnums = 0,
    kwargs: Mapping[str, Any] | None = None,
    mode: Mode = "reverse",
    scheme: Scheme = "central",
    order: int | None = None,
    safety: float = 10.0,
    rtol: float = 0.0,
    atol: float | None = None,
    strategy: Strategy | None = None,
    exhaustive: bool = False,
    raise_error: bool = False,
) -> GradCheckReport:
    """Compares autograd's Jacobian of ``func`` with finite differences.

    For a custom ``torch.autograd.Function`` (classic ``forward(ctx, ...)`` /
    ``backward(ctx, ...)`` style or with ``setup_context``), a function with a
    hand-written derivative, or any autograd-differentiable function.

    First ``J @ u`` is compared along two random directions ``u`` per input
    leaf, a few evaluations of ``func`` in all; if every ``J @ u`` agrees, that
    is the verdict. Otherwise (or with ``exhaustive=True``) every entry is
    compared, against :func:`jacfd_with_error`, which costs a few evaluations
    per input element and names the wrong entries. An entry fails when::

        |J_autograd - J_fd| > safety * (e + r) + rtol * |J_fd| + atol

    with ``e`` jacfd's per-entry error estimate and ``r`` the rounding of
    outputs that are sums of cancelling terms: the tolerance follows the dtype,
    the scheme and ``func`` at ``args``. The derivation, and what the
    directions stage guarantees, are in the documentation's "Checking
    gradients" page.

    Args:
        func: The function to check; positional ``args`` and ``kwargs`` are
            passed to it. Outputs may be a tensor or a pytree of floating-point
            tensors.
        *args: The point to check at. The differentiated ones are tensors or
            pytrees of real floating-point tensors (float64 recommended).
        argnums: Which positional arguments to differentiate, as in
            ``torch.func.jacrev``: an int or a tuple of ints.
        kwargs: Keyword arguments for ``func``, not differentiated.
        mode: ``"reverse"`` (default) checks ``backward`` (vector-Jacobian
            products); ``"forward"`` checks ``jvp`` (forward-mode AD).
        scheme: The finite-difference scheme (see :func:`jacfd`); ``"central"``
            (default) is the accurate real one, ``"complex"`` needs a
            complex-analytic ``func``.
        order: The scheme's accuracy order (see :func:`jacfd`).
        safety: The multiple of the error estimate an entry may differ by.
        rtol: Extra relative tolerance, times ``|J_fd|``.
        atol: Extra absolute tolerance; ``None``: ``16 * eps * max|J|`` per pair.
        strategy: How ``func`` is evaluated at the stencil points (see
            :func:`jacfd`). ``None`` (default): under ``torch.vmap``, or in a
            plain loop if that fails (classic autograd.Functions cannot run
            under ``vmap``). With a :class:`Batched` strategy every entry is
            compared (the directions would need func on unbatched points).
        exhaustive: Compare every entry even when ``J @ u`` agrees along the
            random directions: the report then has every entry's error.
        raise_error: Raise :class:`GradCheckError` (an ``AssertionError``, with
            the report as its message) if an entry fails, for test suites.

    Returns:
        A :class:`GradCheckReport`: ``.passed``, ``.pairs`` (per output/input
            leaf pair: names, max absolute and relative errors, failure count and
            the worst entries), and a readable ``str``.

    Raises:
        GradCheckError: With ``raise_error=True``, when an entry fails.
        TypeError, ValueError: For invalid options or arguments.

    Examples:
        >>> import torch
        >>> from jacfd import check_grad
        >>> class Square(torch.autograd.Function):
        ...     @staticmethod
        ...     def forward(ctx, x):
        ...         ctx.save_for_backward(x)
        ...         return x * x
        ...     @staticmethod
        ...     def backward(ctx, grad):
        ...         (x,) = ctx.saved_tensors
        ...         return x * grad  # bug: d(x^2)/dx = 2x
        >>> x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        >>> report = check_grad(Square.apply, x)
        >>> report.passed, report.pairs[0].failures
        (False, 3)
        >>> report.pairs[0].worst[0].input_index  # the worst entry, d out[2] / d x[2]
        (2,)
        >>> check_grad(torch.sin, x).passed
        True
    """
    name = "check_grad"
    options = check_options(
        name,
        func,
        argnums=argnums,
        delta=None,
        scheme=scheme,
        order=order,
        has_aux=False,
        chunk_size=None,
        randomness="error",
        strategy="vmap" if strategy is None else strategy,
    )
    if mode not in ("reverse", "forward"):
        raise ValueError(f"{name}(func, mode={mode!r}): mode must be 'reverse' or 'forward'.")
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, Mapping):
        raise TypeError(f"{name}(func, kwargs): expected a mapping or None, got {kwargs!r}.")
    for label, value in (("safety", safety), ("rtol", rtol), ("atol", atol)):
        if value is None and label == "atol":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name}(func, {label}={value!r}): expected a number >= 0.")
    for label, flag in (("exhaustive", exhaustive), ("raise_error", raise_error)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}(func, {label}): expected a bool, got {flag!r}.")
    if not args:
        raise TypeError(f"{name}(func, *args): pass the arguments to check func at.")
    point = _CheckedCall(name, func, args, kwargs, normalize_argnums(name, argnums, len(args)))
    # The rounding of f, after division by the step h ~ eps**(1/(p+1)).
    exponent = options.stencil.accuracy_exponent
    compare = partial(_compare, safety=safety, rtol=rtol, atol=atol)

    ad_blocks = None  # autograd's whole Jacobian, computed at most once
    if not exhaustive and not isinstance(options.strategy, Batched):
        if mode == "reverse":
            ad_blocks = point.autograd_jacobian(mode)
        tighter = partial(_compare, safety=safety / DIRECTIONS_TIGHTER, rtol=rtol, atol=atol)
        along = _along_directions(point, options, exponent, ad_blocks, tighter, scheme, strategy)
        report = GradCheckReport(along, mode, scheme, float(safety), DIRECTIONS)
        if report.passed:
            return report

    fd_blocks, err_blocks = point.finite_differences(
        point.leaves, lambda f: f, None, scheme, order, strategy
    )
    if ad_blocks is None:
        ad_blocks = point.autograd_jacobian(mode)
    point.check_blocks(ad_blocks, fd_blocks)
    # The rounding of f_i in terms of its inputs' contributions: for f_i a sum of
    # terms J_ik x_k (a matmul), it is ~ eps * sum_k |J_ik x_k|, which the
    # estimate (based on |f_i| itself) misses when the terms cancel. Divided by the
    # step h_k ~ eps**(1/(p+1)) * max(1, |x_k|): eps**(p/(p+1)) * sum_k |J_ik|.
    rows = point.rows([block.abs() for block in fd_blocks])
    pairs = []
    for (o, i), ad, fd, err in zip(point.pair_indices(), ad_blocks, fd_blocks, err_blocks):
        in_dim = point.leaves[i].dim()
        rounding = _eps(fd) ** exponent * rows[o].reshape(rows[o].shape + (1,) * in_dim)
        pairs.append(compare(point.out_names[o], point.in_names[i], in_dim, rounding, ad, fd, err))
    report = GradCheckReport(tuple(pairs), mode, scheme, float(safety))
    if raise_error and not report.passed:
        raise GradCheckError(report)
    return report


def _along_directions(
    point: _CheckedCall,
    options: Options,
    exponent: float,
    ad_blocks: list[torch.Tensor] | None,
    compare: Callable[..., GradCheckPair],
    scheme: Scheme,
    strategy: Strategy | None,
) -> tuple[GradCheckPair, ...]:
    """Compares ``J @ u`` along :data:`DIRECTIONS` random directions ``u`` per input leaf.

    One finite-difference column per direction instead of one per element: the
    derivative of ``s -> f(x + U s)`` at ``s = 0``. Its step ``h`` is a power of
    two and each ``u`` is rounded so that ``x + h u`` is exact: the distance
    travelled is exactly ``h u`` (and, but at a rare binade boundary, ``c h u``
    for the stencil's other offsets ``c``). Every component of ``u`` is at least
    ``max(1, |x_k|)`` in size, with a random sign and size, so a wrong entry in
    any column moves ``J @ u`` by at least that entry's error, and two wrong
    entries cancel only by coincidence.
    """
    stencil = options.stencil
    precision = max(_eps(leaf) for leaf in point.leaves) ** options.noise_exponent
    step = 2.0 ** math.floor(math.log2(_automatic_step(stencil, precision)))
    generator = torch.Generator().manual_seed(0)  # reproducible verdicts
    directions = []
    for leaf in point.leaves:
        shape = (DIRECTIONS, *leaf.shape)
        sign = torch.randint(0, 2, shape, generator=generator).to(leaf.dtype) * 2 - 1
        size = 1 + torch.rand(shape, generator=generator, dtype=leaf.dtype)
        u = (sign * size).to(leaf.device) * leaf.abs().clamp_min(1)
        if not stencil.imaginary:
            u = ((leaf + step * u) - leaf) / step
        directions.append(u)

    def along(f: Callable[..., Any]) -> Callable[..., Any]:
        def moved(*coefficients: torch.Tensor) -> Any:
            # At a stencil point s has one non-zero, c h, so U s is exactly c h u.
            return f(
                *[
                    x + torch.tensordot(s, u, dims=1)
                    for x, s, u in zip(point.leaves, coefficients, directions)
                ]
            )

        return moved

    origin = [torch.zeros(DIRECTIONS, dtype=u.dtype, device=u.device) for u in directions]
    fd_blocks, err_blocks = point.finite_differences(
        origin, along, step, scheme, stencil.accuracy, strategy
    )
    if ad_blocks is None:  # forward mode: one Jacobian-vector product per direction
        ad_blocks = point.forward_products(directions)
        point.check_blocks(ad_blocks, fd_blocks)
        # Only J @ u is known: |J @ u| stands in for |J| @ |u|. It is smaller when
        # terms cancel, which can only send a correct gradient on to every entry.
        magnitudes = [block.abs().mean(-1, keepdim=True) for block in ad_blocks]
    else:
        point.check_blocks(ad_blocks, fd_blocks)
        ad_blocks, magnitudes = _times_directions(point, ad_blocks, directions)
    # The rounding of f_i, as in the entry-wise check: eps**(p/(p+1)) * sum_k |J_ik| |u_k|.
    rows = point.rows(magnitudes, in_dim=1)
    pairs = []
    for (o, i), ad, fd, err in zip(point.pair_indices(), ad_blocks, fd_blocks, err_blocks):
        rounding = _eps(fd) ** exponent * rows[o].unsqueeze(-1)
        pairs.append(compare(point.out_names[o], point.in_names[i], 1, rounding, ad, fd, err))
    return tuple(pairs)


def _times_directions(
    point: _CheckedCall, blocks: list[torch.Tensor], directions: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``J @ u`` per block, ``out.shape + (directions,)``, and the mean
    ``|J| @ |u|`` over the directions, ``out.shape + (1,)``."""
    products, magnitudes = [], []
    for (_, i), block in zip(point.pair_indices(), blocks):
        u = directions[i].reshape(DIRECTIONS, -1).T.to(block.dtype)
        flat = block.reshape(*block.shape[: block.dim() - point.leaves[i].dim()], -1)
        products.append(flat @ u)
        magnitudes.append((flat.abs() @ u.abs()).mean(-1, keepdim=True))
    return products, magnitudes


def _eps(tensor: torch.Tensor) -> float:
    return torch.finfo(tensor.dtype).eps


def _compare(
    out_name: str,
    in_name: str,
    in_dim: int,
    rounding: torch.Tensor,
    ad: torch.Tensor,
    fd: torch.Tensor,
    err: torch.Tensor,
    *,
    safety: float,
    rtol: float,
    atol: float | None,
) -> GradCheckPair:
    """One pair's verdict: ``ad`` and ``fd`` are ``out.shape + in.shape`` (or
    ``out.shape + (directions,)``, ``in_dim = 1``); ``rounding`` broadcasts to them."""
    shape = tuple(fd.shape)
    # The coarser of the two dtypes sets the round-off floor.
    eps = max(torch.finfo(ad.dtype).eps, torch.finfo(fd.dtype).eps)
    ad = ad.reshape(shape).to(torch.float64)
    fd = fd.to(torch.float64)
    err = err.to(torch.float64)
    scale = max(ad.abs().max().item(), fd.abs().max().item()) if fd.numel() else 0.0
    floor = ROUNDING_ULPS * eps * scale if atol is None else atol
    tolerance = safety * (err + rounding) + rtol * fd.abs() + floor
    difference = (ad - fd).abs()
    magnitude = torch.maximum(ad.abs(), fd.abs())
    relative = torch.where(magnitude > 0, difference / magnitude, torch.zeros_like(difference))
    failing = ~(difference <= tolerance)  # NaN fails
    ratio = difference / tolerance.clamp_min(torch.finfo(torch.float64).tiny)
    ratio = torch.nan_to_num(ratio, nan=math.inf)
    worst = []
    if fd.numel():
        top = torch.topk(ratio.reshape(-1), min(WORST, fd.numel())).indices
        out_dim = fd.dim() - in_dim
        flat = torch.stack([ad.reshape(-1), fd.reshape(-1), tolerance.reshape(-1)])[:, top]
        for flat_index, (a, f, t) in zip(top.tolist(), flat.T.tolist()):
            index: list[int] = []
            for size in reversed(shape):
                flat_index, remainder = divmod(flat_index, size)
                index.insert(0, remainder)
            worst.append(GradCheckEntry(tuple(index[:out_dim]), tuple(index[out_dim:]), a, f, t))
    return GradCheckPair(
        out_name,
        in_name,
        shape,
        float(torch.nan_to_num(difference, nan=math.inf).max()) if fd.numel() else 0.0,
        float(torch.nan_to_num(relative, nan=math.inf).max()) if fd.numel() else 0.0,
        int(failing.sum()),
        tuple(worst),
    )
