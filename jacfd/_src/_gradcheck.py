"""``check_grad``: hand-written gradients against finite differences.

Two stages: ``J @ u`` along random directions, then, if that does not agree,
every entry. How the tolerance is set is derived in ``docs/checking.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch.utils._pytree import tree_map

from ._autograd_reference import Mode, _AutogradUnavailableError, _CheckedCall, _FuncFailedError
from ._gradcheck_options import _check_arguments, _out_of_inference, _steps
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
from ._plan import Options, check_options
from ._stencil import Scheme
from ._steps import Delta
from ._strategy import Batched
from ._strategy import StrategyOption as Strategy
from ._workers import Workers

RESOLVED = 0.5
"""The directions stage decides only where every tolerance is at most this
fraction of the larger value compared (or the values are equal): then a value
that passes has the sign of the other and is within a factor of 3 of it. A
larger tolerance could pass ``J @ u`` with the wrong sign, so the entry-wise
check decides instead (see docs/checking.md)."""

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
    delta: Delta = None,
    safety: float = 10.0,
    rtol: float = 0.0,
    atol: float | None = None,
    strategy: Strategy | None = None,
    workers: Workers = None,
    process_group: Any = None,
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
        delta: The finite-difference step, as in :func:`jacfd`: ``None``
            (automatic, about ``eps**(1/3) * max(1, |x|)`` for central
            differences), a positive float, or a tensor or pytree of steps
            matching the differentiated arguments. Smaller than the distance to
            a kink of func, or larger for a noisy func. Both stages use it.
        safety: The multiple of the error estimate an entry may differ by.
        rtol: Extra relative tolerance, times ``|J_fd|``.
        atol: Extra absolute tolerance; ``None``: ``16 * eps * max|J|`` per pair.
        strategy: How ``func`` is evaluated at the stencil points (see
            :func:`jacfd`). ``None`` (default): under ``torch.vmap``, or in a
            plain loop if that fails (classic autograd.Functions cannot run
            under ``vmap``). With a :class:`Batched` strategy every entry is
            compared (the directions would need func on unbatched points).
        workers: Where the finite differences are evaluated: worker processes or
            a map-like callable, as in :func:`jacfd` (autograd's side runs here).
        process_group: A ``torch.distributed`` group sharing the finite
            differences, as in :func:`jacfd`.
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
        delta=delta,
        scheme=scheme,
        order=order,
        has_aux=False,
        chunk_size=None,
        randomness="error",
        strategy="vmap" if strategy is None else strategy,
        workers=workers,
        process_group=process_group,
    )
    kwargs = _check_arguments(
        func, args, kwargs, mode, safety, rtol, atol, exhaustive, raise_error
    )
    # Autograd cannot run on inference tensors, nor inside inference mode: leave
    # it, and copy the tensors made in it (copies made outside it are ordinary).
    with torch.inference_mode(False):
        args, kwargs = tree_map(_out_of_inference, (args, kwargs))
        call = _CheckedCall(name, func, args, kwargs, normalize_argnums(name, argnums, len(args)))
        call.workers, call.process_group = options.workers, options.process_group
        steps = _steps(call, delta, args)
        try:
            report = _check(
                call, options, scheme, steps, mode, strategy, exhaustive, safety, rtol, atol
            )
        except _AutogradUnavailableError as failure:
            raise _autograd_error(name, mode, failure) from failure.__cause__
        except _FuncFailedError as failure:
            raise _func_error(name, failure) from failure.error
    if raise_error and not report.passed:
        raise GradCheckError(report)
    return report


def _check(
    call: _CheckedCall,
    options: Options,
    scheme: Scheme,
    steps: Any,
    mode: Mode,
    strategy: Strategy | None,
    exhaustive: bool,
    safety: float,
    rtol: float,
    atol: float | None,
) -> GradCheckReport:
    """The two stages: ``J @ u`` along random directions, then, unless that
    decided a pass, every entry."""
    ad_blocks = None  # autograd's whole Jacobian, computed at most once
    if not exhaustive and not isinstance(options.strategy, Batched):
        if mode == "reverse":
            ad_blocks = call.autograd_jacobian(mode)
        tighter = partial(_compare, safety=safety / DIRECTIONS_TIGHTER, rtol=rtol, atol=atol)
        try:
            along, conclusive = _along_directions(
                call, options, scheme, steps, ad_blocks, tighter, strategy
            )
        except _FuncFailedError:  # func refused a point along a direction: every entry decides
            along, conclusive = (), False
        report = GradCheckReport(along, mode, scheme, float(safety), DIRECTIONS)
        if conclusive and report.passed:
            return report

    fd_blocks, err_blocks = call.finite_differences(
        call.leaves, lambda f: f, steps, scheme, options.stencil.accuracy, strategy
    )
    if ad_blocks is None:
        ad_blocks = call.autograd_jacobian(mode)
    call.check_blocks(len(ad_blocks), len(fd_blocks))
    # The rounding of f_i in terms of its inputs' contributions (docs/checking.md).
    rows = call.rows([block.abs() for block in fd_blocks])
    exponent = options.stencil.accuracy_exponent
    pairs = []
    for (o, i), ad, fd, err in zip(call.pair_indices(), ad_blocks, fd_blocks, err_blocks):
        in_dim = call.leaves[i].dim()
        rounding = _eps(fd) ** exponent * rows[o].reshape(rows[o].shape + (1,) * in_dim)
        pair, _ = _compare(
            call.out_names[o], call.in_names[i], in_dim, rounding, ad, fd, err,
            safety=safety, rtol=rtol, atol=atol,
        )  # fmt: skip
        pairs.append(pair)
    return GradCheckReport(tuple(pairs), mode, scheme, float(safety))


def _along_directions(
    call: _CheckedCall,
    options: Options,
    scheme: Scheme,
    steps: Any,
    ad_blocks: list[torch.Tensor] | None,
    compare: Callable[..., tuple[GradCheckPair, bool]],
    strategy: Strategy | None,
) -> tuple[tuple[GradCheckPair, ...], bool]:
    """Compares ``J @ u`` along :data:`DIRECTIONS` random directions ``u``, every
    differentiated input moving at once (as in ``torch.func.jvp``).

    One finite-difference column per direction instead of one per element: the
    derivative of ``s -> f(x + s u)`` at ``s = 0``. Its step ``h`` is a power of
    two and each ``u`` is rounded so that ``x + h u`` is exact. Every component
    of ``u`` is at least ``max(1, |x_k|)`` in size, with a random sign and size,
    so a wrong entry in any column moves ``J @ u`` by at least that entry's
    error, and two wrong entries cancel only by coincidence.

    Returns the pairs (one per output leaf) and whether they are conclusive:
    not when a tolerance is large next to the values compared (see
    :data:`RESOLVED`), where ``J @ u`` could pass with the wrong sign.
    """
    stencil = options.stencil
    precision = max(_eps(leaf) for leaf in call.leaves) ** options.noise_exponent
    generator = torch.Generator().manual_seed(0)  # reproducible verdicts
    raw = []
    for leaf in call.leaves:
        shape = (DIRECTIONS, *leaf.shape)
        sign = torch.randint(0, 2, shape, generator=generator).to(leaf.dtype) * 2 - 1
        size = 1 + torch.rand(shape, generator=generator, dtype=leaf.dtype)
        raw.append((sign * size).to(leaf.device) * leaf.abs().clamp_min(1))
    relative = stencil.relative_step(precision)
    if steps is not None:  # the largest h that moves no element further than its step
        limits = [
            float((torch.as_tensor(d).to(u) / u.abs()).min())
            for d, u in zip(steps, raw)
            if u.numel()
        ]
        relative = min(limits, default=relative)
    step = 2.0 ** math.floor(math.log2(relative))
    directions = [
        u if stencil.imaginary else ((x + step * u) - x) / step for x, u in zip(call.leaves, raw)
    ]

    def along(f: Callable[..., Any]) -> Callable[..., Any]:
        return _Moved(f, call.leaves, directions)

    origin = torch.zeros(DIRECTIONS, dtype=directions[0].dtype, device=directions[0].device)
    fd_blocks, err_blocks = call.finite_differences(
        [origin], along, step, scheme, stencil.accuracy, strategy
    )
    if ad_blocks is None:  # forward mode: one Jacobian-vector product per direction
        ad_blocks = call.forward_products(directions)
        # Only J @ u is known: |J @ u| stands in for |J| @ |u|. It is smaller when
        # terms cancel, which can only send a correct gradient on to every entry.
        magnitudes = [block.abs().mean(-1, keepdim=True) for block in ad_blocks]
    else:
        ad_blocks, magnitudes = _times_directions(call, ad_blocks, directions)
    call.check_blocks(len(ad_blocks), len(fd_blocks))
    label = call.in_names[0] if len(call.in_names) == 1 else "all inputs"
    pairs, conclusive = [], True
    for o, (ad, fd, err) in enumerate(zip(ad_blocks, fd_blocks, err_blocks)):
        # The rounding of f_o, as in the entry-wise check: eps**(p/(p+1)) * sum_k |J_ok| |u_k|.
        rounding = _eps(fd) ** stencil.accuracy_exponent * magnitudes[o].to(torch.float64)
        pair, resolved = compare(call.out_names[o], label, 1, rounding, ad, fd, err)
        pairs.append(pair)
        conclusive &= resolved
    return tuple(pairs), conclusive


@dataclass
class _Moved:  # (not frozen: mark_noise sets an attribute)
    """``s -> f(x + s @ U)``: a class, not a closure, so that worker processes can be
    sent it."""

    f: Callable[..., Any]
    leaves: list[torch.Tensor]
    directions: list[torch.Tensor]

    def __call__(self, s: torch.Tensor) -> Any:
        # At a stencil point s has one non-zero, c h, so x + s @ U is exactly x + c h u.
        points = [
            x + torch.tensordot(s, u.to(s.dtype), dims=1)
            for x, u in zip(self.leaves, self.directions)
        ]
        return self.f(*points)


def _times_directions(
    call: _CheckedCall, blocks: list[torch.Tensor], directions: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``J @ u`` per output leaf, ``out.shape + (directions,)``, summed over the
    inputs, and the mean ``|J| @ |u|`` over the directions, ``out.shape + (1,)``."""
    n_in = len(call.leaves)
    products, magnitudes = [], []
    for o in range(len(call.out_names)):
        terms, sizes = [], []
        for i in range(n_in):
            block, u = blocks[o * n_in + i], directions[i]
            u = u.reshape(DIRECTIONS, u.numel() // DIRECTIONS).T.to(block.dtype)
            out_shape = block.shape[: block.dim() - call.leaves[i].dim()]
            flat = block.reshape(*out_shape, u.shape[0])  # not -1: blocks may be empty
            terms.append(flat @ u)
            sizes.append((flat.abs() @ u.abs()).mean(-1, keepdim=True))
        products.append(torch.stack(terms).sum(0))
        magnitudes.append(torch.stack(sizes).sum(0))
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
) -> tuple[GradCheckPair, bool]:
    """One pair's verdict: ``ad`` and ``fd`` are ``out.shape + in.shape`` (or
    ``out.shape + (directions,)``, ``in_dim = 1``); ``rounding`` broadcasts to them.

    Also whether every entry is resolved: equal, or with a tolerance at most
    :data:`RESOLVED` times the larger of the two values.
    """
    shape = tuple(fd.shape)
    # The coarser of the two dtypes sets the round-off floor.
    eps = max(torch.finfo(ad.dtype).eps, _eps(fd))
    ad = ad.reshape(shape).to(torch.float64)
    fd = fd.to(torch.float64)
    err = err.to(torch.float64)
    scale = max(ad.abs().max().item(), fd.abs().max().item()) if fd.numel() else 0.0
    floor = ROUNDING_ULPS * eps * scale if atol is None else atol
    tolerance = safety * (err + rounding) + rtol * fd.abs() + floor
    difference = (ad - fd).abs()
    magnitude = torch.maximum(ad.abs(), fd.abs())
    # Below its tolerance a value is rounding noise (or an exact zero): no
    # relative error to speak of. A NaN tolerance (the finite difference's error
    # is unknown: its step reaches beyond func's Taylor region) fails.
    above = (magnitude > tolerance) | (tolerance.isnan() & (magnitude > 0))
    relative = torch.where(above, difference / magnitude, 0.0)
    resolved = bool(((tolerance <= RESOLVED * magnitude) | (difference == 0)).all())
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
    pair = GradCheckPair(
        out_name,
        in_name,
        shape,
        float(torch.nan_to_num(difference, nan=math.inf).max()) if fd.numel() else 0.0,
        float(torch.nan_to_num(relative, nan=math.inf).max()) if fd.numel() else 0.0,
        int(failing.sum()),
        tuple(worst),
    )
    return pair, resolved


def _autograd_error(name: str, mode: str, failure: _AutogradUnavailableError) -> RuntimeError:
    cause = failure.__cause__
    kind = NotImplementedError if isinstance(cause, NotImplementedError) else RuntimeError
    needs = "backward" if mode == "reverse" else "jvp (forward-mode AD)"
    return kind(
        f"{name}(func): autograd could not {failure} func: {cause}\n"
        "check_grad compares autograd's derivatives with finite differences, so func must be "
        "differentiable by autograd: no numpy or .item() on the differentiated inputs, no "
        f"in-place writes into them (clone them first), and a {needs} in every custom "
        "autograd.Function."
    )


def _func_error(name: str, failure: _FuncFailedError) -> Exception:
    error = failure.error
    kind = next((k for k in (ValueError, TypeError) if isinstance(error, k)), RuntimeError)
    return kind(
        f"{name}(func): func raised {type(error).__name__} at a perturbed point "
        f"({failure.where}): {error}\n"
        "check_grad evaluates func within a few steps of args (the step: delta=, automatic "
        "by default). Make func accept points that close to args, pass a smaller delta=, "
        "or check at another point."
    )
