"""``check_grad``: hand-written gradients against finite differences, entry by entry."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_unflatten

from ._engine import check_options
from ._evaluate import Strategy
from ._inputs import Argnums, normalize_argnums
from ._jacfd import jacfd_with_error
from ._stencil import Scheme

Mode = Literal["reverse", "forward"]

SAFETY = 10.0
"""Default multiple of ``jacfd_with_error``'s per-entry estimate that an entry may
differ by. The estimate bounds the true finite-difference error on >= 99.8% of
entries in jacfd's accuracy tests and is typically 40-50x pessimistic, so a
correct gradient exceeds ``10 * estimate`` essentially never, while a planted bug
(a wrong sign, a missing factor, a transposed index) changes an entry by a
multiple of its own size, which is ``1 / eps**(2/3)`` times the estimate for
central differences (about 1e10 in float64, 1e4 in float32)."""

ROUNDING_ULPS = 16.0
"""The default ``atol`` is ``ROUNDING_ULPS * eps * max|J|`` per input/output pair:
the rounding of autograd's own Jacobian (a sum of products with a few dozen
terms), which ``jacfd_with_error``'s estimate does not cover. It keeps entries
that are zero in exact arithmetic from failing on autograd's round-off."""

WORST = 5
"""Entries kept per pair in the report: the largest ratios of error to tolerance."""


class GradCheckError(AssertionError):
    """Raised by ``check_grad(..., raise_error=True)`` when an entry fails.

    An ``AssertionError``, so test runners report it as a failed assertion; the
    message is the report's table and :attr:`report` the report itself.
    """

    def __init__(self, report: GradCheckReport) -> None:
        super().__init__(str(report))
        self.report = report


@dataclass(frozen=True)
class GradCheckEntry:
    """One Jacobian entry: ``d output[output_index] / d input[input_index]``."""

    output_index: tuple[int, ...]
    input_index: tuple[int, ...]
    autograd: float
    finite_difference: float
    tolerance: float

    @property
    def error(self) -> float:
        return abs(self.autograd - self.finite_difference)

    @property
    def failed(self) -> bool:
        return not self.error <= self.tolerance

    @property
    def ratio(self) -> float:
        """``error / tolerance``: above 1 fails."""
        return self.error / self.tolerance if self.tolerance > 0 else math.inf * (self.error > 0)


@dataclass(frozen=True)
class GradCheckPair:
    """The comparison for one output leaf and one differentiated input leaf.

    ``output`` and ``input`` name the leaves by pytree key path: ``out`` for a
    tensor result, ``out[1]`` or ``out['loss']`` inside a pytree; ``args[0]`` for
    a differentiated tensor argument, ``args[0]['weight']`` inside one.
    ``max_rel_error`` divides by ``max(|autograd|, |finite difference|)`` per
    entry (0 where both are 0). ``worst`` holds the entries with the largest
    error-to-tolerance ratios, worst first.
    """

    output: str
    input: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    failures: int
    worst: tuple[GradCheckEntry, ...]

    @property
    def passed(self) -> bool:
        return self.failures == 0


@dataclass(frozen=True)
class GradCheckReport:
    """The result of :func:`check_grad`: one :class:`GradCheckPair` per
    output/input leaf pair, in ``torch.func.jacrev``'s order (output-major).

    ``str(report)`` is a table of the pairs followed by the worst entries of the
    failing pairs (or of the pair closest to failing, if every entry passed).
    """

    pairs: tuple[GradCheckPair, ...]
    mode: str
    scheme: str
    safety: float

    @property
    def passed(self) -> bool:
        """True when every entry of every pair is within its tolerance."""
        return all(pair.passed for pair in self.pairs)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        failures = sum(pair.failures for pair in self.pairs)
        lines = [
            (
                f"check_grad {verdict}: {failures} failing entries (autograd "
                f"mode={self.mode!r} vs jacfd scheme={self.scheme!r}, safety={self.safety:g})"
            ),
            "",
            (
                f"{'output':<16} {'input':<20} {'shape':<14} {'max abs err':>12} "
                f"{'max rel err':>12} {'failing':>10}"
            ),
        ]
        for pair in self.pairs:
            total = math.prod(pair.shape)
            lines.append(
                f"{pair.output:<16} {pair.input:<20} {pair.shape!s:<14} "
                f"{pair.max_abs_error:>12.3e} {pair.max_rel_error:>12.3e} "
                f"{f'{pair.failures}/{total}':>10}"
            )
        shown = [pair for pair in self.pairs if not pair.passed]
        if not shown and self.pairs:  # the pair closest to failing
            shown = [max(self.pairs, key=lambda p: p.worst[0].ratio if p.worst else 0.0)]
        for pair in shown:
            if not pair.worst:
                continue
            lines += [
                "",
                f"worst entries of d {pair.output} / d {pair.input}:",
                (
                    f"  {'output index':<16} {'input index':<16} {'autograd':>14} "
                    f"{'finite diff':>14} {'|difference|':>12} {'tolerance':>10}"
                ),
            ]
            for e in pair.worst:
                mark = "  FAIL" if e.failed else ""
                lines.append(
                    f"  {e.output_index!s:<16} {e.input_index!s:<16} {e.autograd:>14.6e} "
                    f"{e.finite_difference:>14.6e} {e.error:>12.3e} {e.tolerance:>10.3e}{mark}"
                )
        return "\n".join(lines)


def check_grad(
    func: Callable[..., Any],
    *args: Any,
    argnums: Argnums = 0,
    kwargs: Mapping[str, Any] | None = None,
    mode: Mode = "reverse",
    scheme: Scheme = "central",
    order: int | None = None,
    safety: float = SAFETY,
    rtol: float = 0.0,
    atol: float | None = None,
    strategy: Strategy | None = None,
    raise_error: bool = False,
) -> GradCheckReport:
    """Compares autograd's Jacobian of ``func`` with finite differences, entry by entry.

    For a custom ``torch.autograd.Function`` (classic ``forward(ctx, ...)`` /
    ``backward(ctx, ...)`` style or with ``setup_context``), a function with a
    hand-written derivative, or any autograd-differentiable function. The whole
    Jacobian is computed twice: by autograd (vectorised reverse or forward mode
    through ``torch.autograd.functional.jacobian``, which unlike ``torch.func``
    accepts classic autograd.Functions) and by :func:`jacfd_with_error`, which
    also returns a per-entry error estimate ``e``. An entry fails when::

        |J_autograd - J_fd| > safety * (e + r) + rtol * |J_fd| + atol

    The tolerance therefore follows the dtype, the scheme, the step and the size
    of ``func`` and its derivatives at ``args``, entry by entry: no hand-tuned
    ``atol=1e-5, rtol=1e-3`` that is too loose for small entries and too strict
    for float32. ``e`` bounds the true error on >= 99.8% of entries in jacfd's
    tests and is typically 40-50x pessimistic, so ``safety=10`` leaves a margin
    of several hundred on a typical entry; a wrong backward changes entries by
    a multiple of their size, about ``eps**(-2/3)`` times ``e`` for central
    differences (1e10 in float64, 1e4 in float32). ``r_ij = eps**(p/(p+1)) *
    sum_k |J_fd[i, k]|`` (over all differentiated elements ``k``, ``p`` the
    scheme's order) is the rounding of ``f_i`` when it is a sum of cancelling
    terms (a matmul), which ``e``, built from ``|f_i|``, misses. The default ``atol`` is
    ``16 * eps * max|J|`` per pair, the round-off of autograd's own result.

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
            under ``vmap``).
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
        >>> check_grad(torch.sin, x).passed
        True
    """
    name = "check_grad"
    check_options(
        name,
        func,
        argnums,
        None,
        scheme,
        order,
        False,
        None,
        "error",
        "vmap" if strategy is None else strategy,
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
    if not isinstance(raise_error, bool):
        raise TypeError(f"{name}(func, raise_error): expected a bool, got {raise_error!r}.")
    if not args:
        raise TypeError(f"{name}(func, *args): pass the arguments to check func at.")
    positions = normalize_argnums(name, argnums, len(args))

    # Input leaves, named by their key path.
    in_names: list[str] = []
    in_leaves: list[torch.Tensor] = []
    in_specs = []
    for position in positions:
        with_path, spec = tree_flatten_with_path(args[position])
        in_specs.append(spec)
        for path, leaf in with_path:
            if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                raise TypeError(
                    f"{name}(func, *args): argument {position} must be a tensor or a pytree of "
                    f"real floating-point tensors; found {type(leaf).__name__} at "
                    f"args[{position}]{keystr(path)}."
                )
            in_names.append(f"args[{position}]{keystr(path)}")
            in_leaves.append(leaf.detach())

    fd_jac, fd_err = _finite_differences(func, args, kwargs, positions, scheme, order, strategy)
    out_names, ad_blocks = _autograd(func, args, kwargs, positions, in_leaves, in_specs, mode)
    fd_leaves = tree_flatten(fd_jac)[0]
    err_leaves = tree_flatten(fd_err)[0]
    if len(fd_leaves) != len(ad_blocks):
        raise ValueError(
            f"{name}(func): autograd and finite differences disagree on the output structure "
            f"({len(ad_blocks)} vs {len(fd_leaves)} Jacobian blocks)."
        )

    # The rounding of f_i in terms of its inputs' contributions: for f_i a sum of
    # terms J_ij x_j (a matmul), its rounding is ~ eps * sum_j |J_ij x_j|, which the
    # estimate (based on |f_i| itself) misses when the terms cancel. Divided by the
    # step h_j ~ eps**(1/(p+1)) * max(1, |x_j|): eps**(p/(p+1)) * sum_j |J_ij|.
    n_in = len(in_leaves)
    exponent = 1.0 if scheme == "complex" else _order(scheme, order) / (_order(scheme, order) + 1)
    row_floors = []
    for o in range(len(fd_leaves) // max(n_in, 1)):
        row = torch.zeros(
            fd_leaves[o * n_in].shape[: fd_leaves[o * n_in].dim() - in_leaves[0].dim()],
            dtype=torch.float64,
        )
        for i in range(len(in_leaves)):
            block = fd_leaves[o * n_in + i].to(torch.float64).abs()
            row = row + block.reshape(*row.shape, -1).sum(-1)
        eps = torch.finfo(fd_leaves[o * n_in].dtype).eps
        row_floors.append(eps**exponent * row)

    pairs = []
    for k, ad in enumerate(ad_blocks):
        out_name = out_names[k // len(in_leaves)]
        in_leaf = in_leaves[k % len(in_leaves)]
        pairs.append(
            _compare(
                out_name,
                in_names[k % len(in_leaves)],
                in_leaf.dim(),
                row_floors[k // len(in_leaves)],
                ad,
                fd_leaves[k],
                err_leaves[k],
                safety,
                rtol,
                atol,
            )
        )
    report = GradCheckReport(tuple(pairs), mode, scheme, float(safety))
    if raise_error and not report.passed:
        raise GradCheckError(report)
    return report


def _finite_differences(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    positions: tuple[int, ...],
    scheme: Scheme,
    order: int | None,
    strategy: Strategy | None,
) -> tuple[Any, Any]:
    """``jacfd_with_error`` with a tuple argnums (so the layout is always
    output pytree, then argnums, then input pytree); without a ``strategy``,
    vmap first and a plain loop if func cannot run under vmap."""
    detached = tuple(_detach(a) if i in positions else a for i, a in enumerate(args))

    def run(f: Callable[..., Any], chosen: Strategy) -> tuple[Any, Any]:
        result: tuple[Any, Any] = jacfd_with_error(
            f, positions, scheme=scheme, order=order, strategy=chosen
        )(*detached, **kwargs)
        return result

    with torch.no_grad():
        if strategy is not None:
            return run(func, strategy)
        for candidate in (_forward_of(func), func):
            if candidate is None:
                continue
            try:
                return run(candidate, "vmap")
            except RuntimeError as error:
                if "vmap" not in str(error):
                    raise
        return run(func, "loop")


class _Context:
    """A stand-in for ``ctx`` in a classic ``Function.forward(ctx, ...)`` run
    outside autograd: attributes can be set, the bookkeeping calls do nothing."""

    needs_input_grad: tuple[bool, ...] = ()
    materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors: Any) -> None:
        pass

    def mark_dirty(self, *tensors: Any) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def _forward_of(func: Callable[..., Any]) -> Callable[..., Any] | None:
    """For ``func = SomeFunction.apply``: its ``forward``, callable under vmap.

    ``Function.apply`` refuses functorch transforms unless the class has
    ``setup_context`` and a vmap rule, which classic-style Functions lack. Only
    the values matter for finite differences, so ``forward`` is called directly,
    with a dummy ``ctx`` in the classic style.
    """
    owner = getattr(func, "__self__", None)
    if (
        getattr(func, "__name__", None) != "apply"
        or not isinstance(owner, type)
        or not issubclass(owner, torch.autograd.Function)
    ):
        return None
    forward = owner.forward
    if owner.setup_context is not torch.autograd.Function.setup_context:
        return forward
    return lambda *args, **kwargs: forward(_Context(), *args, **kwargs)


def _detach(tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten(
        [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec
    )


def _autograd(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    positions: tuple[int, ...],
    in_leaves: list[torch.Tensor],
    in_specs: list[Any],
    mode: Mode,
) -> tuple[list[str], list[torch.Tensor]]:
    """Autograd's Jacobian blocks, output leaf major, each ``out.shape + in.shape``.

    ``torch.autograd.functional.jacobian`` on a flat wrapper: vectorised with
    ``vmap`` over the backward (or forward-mode) pass, which works for classic
    autograd.Functions too since ``func`` itself runs outside vmap; falls back
    to one backward pass per output element if the backward cannot be vmapped.
    """
    out_names: list[str] = []
    counts = [spec.num_leaves for spec in in_specs]

    def flat(*leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        full = list(args)
        start = 0
        for position, spec, count in zip(positions, in_specs, counts):
            full[position] = tree_unflatten(list(leaves[start : start + count]), spec)
            start += count
        with_path, _ = tree_flatten_with_path(func(*full, **kwargs))
        if not out_names:
            out_names.extend(f"out{keystr(path)}" for path, _ in with_path)
        outs = []
        for path, out in with_path:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise TypeError(
                    f"check_grad(func): func must return a tensor or a pytree of floating-point "
                    f"tensors; found {type(out).__name__} at out{keystr(path)}."
                )
            outs.append(out)
        return tuple(outs)

    inputs = tuple(in_leaves)
    if mode == "forward":
        try:
            jac = _jacobian(flat, inputs, vectorize=True, strategy="forward-mode")
        except RuntimeError as error:
            if "vmap" not in str(error) and "functorch" not in str(error):
                raise
            jac = _forward_loop(flat, inputs)
    else:
        try:
            jac = _jacobian(flat, inputs, vectorize=True)
        except RuntimeError as error:
            if (
                "vmap" not in str(error)
                and "functorch" not in str(error)
                and "batch" not in str(error)
            ):
                raise
            jac = _jacobian(flat, inputs, vectorize=False)
    return out_names, [block.detach() for row in jac for block in row]


def _jacobian(
    flat: Callable[..., tuple[torch.Tensor, ...]],
    inputs: tuple[torch.Tensor, ...],
    vectorize: bool,
    strategy: str = "reverse-mode",
) -> tuple[tuple[torch.Tensor, ...], ...]:
    jac: tuple[tuple[torch.Tensor, ...], ...] = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]
        flat, inputs, vectorize=vectorize, strategy=strategy
    )
    return jac


def _forward_loop(
    flat: Callable[..., tuple[torch.Tensor, ...]], inputs: tuple[torch.Tensor, ...]
) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Forward-mode Jacobian, one dual-number pass per input element."""
    columns: list[list[list[torch.Tensor]]] = []  # [input][element][output]
    for i, leaf in enumerate(inputs):
        per_element = []
        for j in range(leaf.numel()):
            tangent = torch.zeros_like(leaf).reshape(-1)
            tangent[j] = 1
            with fwAD.dual_level():
                duals = [
                    fwAD.make_dual(  # type: ignore[no-untyped-call]
                        x, tangent.reshape(x.shape)
                    )
                    if k == i
                    else x
                    for k, x in enumerate(inputs)
                ]
                outs = flat(*duals)
                per_element.append(
                    [
                        torch.zeros_like(out)
                        if (
                            t := fwAD.unpack_dual(out).tangent  # type: ignore[no-untyped-call]
                        )
                        is None
                        else t.clone()
                        for out in outs
                    ]
                )
        columns.append(per_element)
    n_out = len(columns[0][0]) if columns and columns[0] else 0
    return tuple(
        tuple(
            torch.stack([col[o] for col in columns[i]], dim=-1).reshape(
                *columns[i][0][o].shape, *inputs[i].shape
            )
            for i in range(len(inputs))
        )
        for o in range(n_out)
    )


def _order(scheme: str, order: int | None) -> int:
    if order is not None:
        return order
    return 2 if scheme == "central" else 1


def _compare(
    out_name: str,
    in_name: str,
    in_dim: int,
    row_floor: torch.Tensor,
    ad: torch.Tensor,
    fd: torch.Tensor,
    err: torch.Tensor,
    safety: float,
    rtol: float,
    atol: float | None,
) -> GradCheckPair:
    shape = tuple(fd.shape)
    # The coarser of the two dtypes sets the round-off floor.
    eps = max(torch.finfo(ad.dtype).eps, torch.finfo(fd.dtype).eps)
    ad = ad.reshape(shape).to(torch.float64)
    fd = fd.to(torch.float64)
    err = err.to(torch.float64)
    scale = max(ad.abs().max().item(), fd.abs().max().item()) if fd.numel() else 0.0
    floor = ROUNDING_ULPS * eps * scale if atol is None else atol
    rounding = row_floor.reshape(*row_floor.shape, *([1] * in_dim))
    tolerance = safety * (err + rounding) + rtol * fd.abs() + floor
    difference = (ad - fd).abs()
    magnitude = torch.maximum(ad.abs(), fd.abs())
    relative = torch.where(magnitude > 0, difference / magnitude, torch.zeros_like(difference))
    failing = ~(difference <= tolerance)  # NaN fails
    ratio = difference / tolerance.clamp_min(torch.finfo(torch.float64).tiny)
    ratio = torch.nan_to_num(ratio, nan=math.inf)
    worst = []
    if fd.numel():
        top = torch.topk(ratio.reshape(-1), min(WORST, fd.numel())).indices.tolist()
        out_dim = fd.dim() - in_dim
        for flat_index in top:
            index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), shape))
            worst.append(
                GradCheckEntry(
                    index[:out_dim],
                    index[out_dim:],
                    float(ad[index]),
                    float(fd[index]),
                    float(tolerance[index]),
                )
            )
    return GradCheckPair(
        out_name,
        in_name,
        shape,
        float(torch.nan_to_num(difference, nan=math.inf).max()) if fd.numel() else 0.0,
        float(torch.nan_to_num(relative, nan=math.inf).max()) if fd.numel() else 0.0,
        int(failing.sum()),
        tuple(worst),
    )
