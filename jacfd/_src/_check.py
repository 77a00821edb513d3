"""``check_grad``: hand-written gradients against finite differences."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import (
    TreeSpec,
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_unflatten,
)

from ._inputs import Argnums, normalize_argnums
from ._jacfd import jacfd_with_error
from ._plan import Options, check_options
from ._stencil import Scheme
from ._steps import NOISE_EXPONENT
from ._strategy import Batched
from ._strategy import StrategyOption as Strategy

Mode = Literal["reverse", "forward"]

ROUNDING_ULPS = 16.0
"""The default ``atol`` is ``ROUNDING_ULPS * eps * max|J|`` per input/output pair:
the rounding of autograd's own Jacobian (a sum of products with a few dozen
terms), which ``jacfd_with_error``'s estimate does not cover. It keeps entries
that are zero in exact arithmetic from failing on autograd's round-off."""

WORST = 5
"""Entries kept per pair in the report: the largest ratios of error to tolerance."""

DIRECTIONS = 2
"""Random directions per input leaf along which ``check_grad`` first compares
``J @ u``: each costs a few evaluations of func where the entry-wise check costs
a few per input element. One direction already sees a wrong entry anywhere; a
second guards against two wrong entries of one row cancelling by coincidence."""

DIRECTIONS_TIGHTER = 4.0
"""``J @ u`` is compared with ``safety / DIRECTIONS_TIGHTER``. A false alarm there
only costs the entry-wise check, while a miss would change the verdict, and a
row's tolerance can exceed one entry's (a wrong zero entry next to large ones).
With it, 520 single wrong entries planted in jacfd's test functions (float32 and
float64, 1e-1 to 1e-9 of max|J|) got the entry-wise verdict every time, against 2
misses at the full safety; correct gradients there use at most 0.11 of it."""


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
    """One Jacobian entry, ``d output[output_index] / d input[input_index]``, as
    both sides computed it.

    In a report decided along random directions (``report.directions > 0``) it
    is entry ``output_index`` of ``J @ u`` instead, ``u`` being direction
    ``input_index[0]``.

    Attributes:
        output_index: The index into the output leaf.
        input_index: The index into the input leaf (or the direction).
        autograd: Autograd's value.
        finite_difference: jacfd's value.
        tolerance: What the two may differ by (see :func:`check_grad`).
    """

    output_index: tuple[int, ...]
    input_index: tuple[int, ...]
    autograd: float
    finite_difference: float
    tolerance: float

    @property
    def error(self) -> float:
        """``|autograd - finite_difference|``."""
        return abs(self.autograd - self.finite_difference)

    @property
    def failed(self) -> bool:
        """``error > tolerance``, or either value NaN."""
        return not self.error <= self.tolerance

    @property
    def ratio(self) -> float:
        """``error / tolerance``: above 1 fails."""
        return self.error / self.tolerance if self.tolerance > 0 else math.inf * (self.error > 0)


@dataclass(frozen=True)
class GradCheckPair:
    """The comparison for one output leaf and one differentiated input leaf.

    Attributes:
        output: The output leaf's pytree key path: ``out`` for a tensor result,
            ``out[1]`` or ``out['loss']`` inside a pytree.
        input: The input leaf's: ``args[0]`` for a differentiated tensor
            argument, ``args[0]['weight']`` inside one.
        shape: The Jacobian block's shape, ``output.shape + input.shape`` (or
            ``output.shape + (directions,)`` for ``J @ u``).
        max_abs_error: The largest ``|autograd - finite difference|``.
        max_rel_error: The largest of the same divided by
            ``max(|autograd|, |finite difference|)`` (0 where both are 0).
        failures: How many entries exceed their tolerance.
        worst: The entries with the largest error-to-tolerance ratios, worst
            first (at most five).
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
        """No entry exceeds its tolerance."""
        return self.failures == 0


@dataclass(frozen=True)
class GradCheckReport:
    """The result of :func:`check_grad`.

    ``str(report)`` is a table of the pairs followed by the worst entries of the
    failing pairs (or of the pair closest to failing, if every entry passed).

    Attributes:
        pairs: One :class:`GradCheckPair` per output/input leaf pair, in
            ``torch.func.jacrev``'s order (output-major).
        mode: The autograd mode checked, ``"reverse"`` or ``"forward"``.
        scheme: The finite-difference scheme.
        safety: The multiple of the error estimate allowed.
        directions: 0 when every entry was compared. Otherwise ``J @ u`` agreed
            along this many random directions ``u`` per input leaf, within
            ``safety / 4``, and each pair's errors and entries are those of
            ``J @ u``: an entry's ``input_index`` is ``(direction,)``. (When
            ``J @ u`` disagrees, every entry is compared.)
    """

    pairs: tuple[GradCheckPair, ...]
    mode: str
    scheme: str
    safety: float
    directions: int = 0

    @property
    def passed(self) -> bool:
        """True when every entry of every pair is within its tolerance."""
        return all(pair.passed for pair in self.pairs)

    def __str__(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        failures = sum(pair.failures for pair in self.pairs)
        settings = f"autograd mode={self.mode!r} vs jacfd scheme={self.scheme!r}"
        settings += f", safety={self.safety:g}"
        if self.directions:
            summary = (
                f"J @ u agrees along {self.directions} random directions u per input, "
                f"within safety/{DIRECTIONS_TIGHTER:g} ({settings}); exhaustive=True "
                "compares every entry"
            )
        else:
            summary = f"{failures} failing entries ({settings})"
        shape, index, of = (
            ("J @ u shape", "direction", "({}) @ u")
            if self.directions
            else ("shape", "input index", "{}")
        )
        lines = [
            f"check_grad {verdict}: {summary}",
            "",
            (
                f"{'output':<16} {'input':<20} {shape:<14} {'max abs err':>12} "
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
                f"worst entries of {of.format(f'd {pair.output} / d {pair.input}')}:",
                (
                    f"  {'output index':<16} {index:<16} {'autograd':>14} "
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

    **Two stages.** First ``J @ u`` is compared along two random directions
    ``u`` per input leaf: autograd's Jacobian times ``u`` (or forward-mode
    ``jvp``) against the finite-difference derivative of ``s -> f(x + s u)``,
    a few evaluations of ``func`` in all. Every component of ``u`` is at least
    ``max(1, |x_k|)`` in size with a random sign and size, so a wrong entry
    anywhere moves ``J @ u`` by at least its own error. If every ``J @ u``
    agrees, that is the verdict; otherwise (or with ``exhaustive=True``) the
    whole Jacobian is compared entry by entry, which costs a few evaluations
    per input element and reports which entries are wrong.

    **Entry by entry**, the Jacobian is computed by autograd (vectorised
    reverse or forward mode through ``torch.autograd.functional.jacobian``,
    which unlike ``torch.func`` accepts classic autograd.Functions) and by
    :func:`jacfd_with_error`, which also returns a per-entry error estimate
    ``e``. An entry fails when::

        |J_autograd - J_fd| > safety * (e + r) + rtol * |J_fd| + atol

    The tolerance follows the dtype, the scheme, the step and the size of
    ``func`` and its derivatives at ``args``, entry by entry, with no hand-tuned
    ``atol=1e-5, rtol=1e-3`` (too loose for small entries, too strict for
    float32):

    - ``e`` bounds the true error on >= 99.8% of entries in jacfd's tests and
      is typically 40-50x pessimistic, so ``safety=10`` leaves a margin of
      several hundred. A wrong backward changes entries by a multiple of their
      size, about ``eps**(-2/3)`` times ``e`` for central differences (1e10 in
      float64, 1e4 in float32).
    - ``r_ij = eps**(p/(p+1)) * sum_k |J_fd[i, k]|`` (over every
      differentiated element ``k``; ``p`` is the scheme's order) is the
      rounding of ``f_i`` when it is a sum of cancelling terms (a matmul),
      which ``e``, built from ``|f_i|``, misses.
    - The default ``atol``, ``16 * eps * max|J|`` per pair, is the round-off of
      autograd's own result.
    - ``J @ u`` is compared by the same rule, with ``e`` the estimate for the
      directional derivative, ``r_i = eps**(p/(p+1)) * sum_k |J_ik| |u_k|``, and
      ``safety / 4``: a false alarm there only costs the entry-wise check, but
      a row's tolerance can exceed a small entry's, and a miss would change the
      verdict.

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
    point = _Point(name, func, args, kwargs, normalize_argnums(name, argnums, len(args)))
    accuracy = options.stencil.accuracy
    # The rounding of f, after division by the step h ~ eps**(1/(p+1)).
    exponent = 1.0 if options.stencil.imaginary else accuracy / (accuracy + 1)
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
    point: _Point,
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
    step = 2.0 ** math.floor(math.log2(stencil.step_constant * precision**stencil.step_exponent))
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
    point: _Point, blocks: list[torch.Tensor], directions: list[torch.Tensor]
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


class _Point:
    """``func`` at the point to check, as a function of its differentiated leaves.

    Leaves are flattened in ``argnums`` order, then pytree order; outputs are
    named by key path (``out['loss']``) and Jacobian blocks come output-major.
    """

    def __init__(
        self,
        name: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        positions: tuple[int, ...],
    ) -> None:
        self.name, self.func, self.args, self.kwargs = name, func, args, kwargs
        self.positions = positions
        self.in_names: list[str] = []
        self.leaves: list[torch.Tensor] = []
        self.specs: list[TreeSpec] = []
        self.out_names: list[str] = []
        for position in positions:
            with_path, spec = tree_flatten_with_path(args[position])
            self.specs.append(spec)
            for path, leaf in with_path:
                if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                    raise TypeError(
                        f"{name}(func, *args): argument {position} must be a tensor or a pytree "
                        f"of real floating-point tensors; found {type(leaf).__name__} at "
                        f"args[{position}]{keystr(path)}."
                    )
                self.in_names.append(f"args[{position}]{keystr(path)}")
                self.leaves.append(leaf.detach())

    def call(self, f: Callable[..., Any], leaves: Sequence[torch.Tensor]) -> Any:
        """``f`` (``func`` or its ``forward``) with the differentiated leaves replaced."""
        full = list(self.args)
        start = 0
        for position, spec in zip(self.positions, self.specs):
            full[position] = tree_unflatten(list(leaves[start : start + spec.num_leaves]), spec)
            start += spec.num_leaves
        return f(*full, **self.kwargs)

    def check_blocks(self, ad_blocks: list[torch.Tensor], fd_blocks: list[torch.Tensor]) -> None:
        if len(fd_blocks) != len(ad_blocks):
            raise ValueError(
                f"{self.name}(func): autograd and finite differences disagree on the output "
                f"structure ({len(ad_blocks)} vs {len(fd_blocks)} Jacobian blocks): does "
                "forward return the same outputs as apply?"
            )

    def pair_indices(self) -> list[tuple[int, int]]:
        """(output leaf, input leaf) of each Jacobian block, output-major."""
        return [(o, i) for o in range(len(self.out_names)) for i in range(len(self.leaves))]

    def rows(self, blocks: list[torch.Tensor], in_dim: int | None = None) -> list[torch.Tensor]:
        """Per output leaf, ``sum_k block[..., k]`` over every input element ``k``
        (the last ``in_dim`` dims of a block; default: the input leaf's)."""
        sums = []
        for (_, i), block in zip(self.pair_indices(), blocks):
            dims = self.leaves[i].dim() if in_dim is None else in_dim
            out_shape = block.shape[: block.dim() - dims]
            sums.append(block.to(torch.float64).reshape(*out_shape, -1).sum(-1))
        n_in = len(self.leaves)
        return [torch.stack(sums[o : o + n_in]).sum(0) for o in range(0, len(sums), n_in)]

    def flat_outputs(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``func``'s output leaves, checked and named, for autograd."""
        with_path, _ = tree_flatten_with_path(self.call(self.func, leaves))
        if not self.out_names:
            self.out_names.extend(f"out{keystr(path)}" for path, _ in with_path)
        for path, out in with_path:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise TypeError(
                    f"check_grad(func): func must return a tensor or a pytree of floating-point "
                    f"tensors; found {type(out).__name__} at out{keystr(path)}."
                )
        return tuple(out for _, out in with_path)

    def autograd_jacobian(self, mode: Mode) -> list[torch.Tensor]:
        """Autograd's Jacobian blocks, each ``out.shape + in.shape``.

        ``torch.autograd.functional.jacobian``: vectorised with ``vmap`` over the
        backward (or forward-mode) pass, which works for classic
        autograd.Functions too since ``func`` itself runs outside vmap; one pass
        per element if the backward (or jvp) cannot be vmapped.
        """
        inputs = tuple(self.leaves)
        strategy = "forward-mode" if mode == "forward" else "reverse-mode"
        try:
            jac = _jacobian(self.flat_outputs, inputs, True, strategy)
        except RuntimeError as error:
            if not any(word in str(error) for word in ("vmap", "functorch", "batch")):
                raise
            if mode == "reverse":
                jac = _jacobian(self.flat_outputs, inputs, False, strategy)
            else:
                units = [torch.eye(x.numel(), dtype=x.dtype, device=x.device) for x in inputs]
                products = self.forward_products(
                    [e.reshape(-1, *x.shape) for e, x in zip(units, inputs)]
                )
                return [
                    p.reshape(p.shape[:-1] + self.leaves[i].shape)
                    for (_, i), p in zip(self.pair_indices(), products)
                ]
        return [block.detach() for row in jac for block in row]

    def forward_products(self, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """``J @ t`` by forward-mode AD, one dual-number pass per tangent ``t``.

        ``tangents[i]`` stacks the tangents of input leaf ``i`` along dim 0;
        each block is ``out.shape + (len(tangents[i]),)``.
        """
        columns: list[list[list[torch.Tensor]]] = []  # [input][tangent][output]
        for i, stacked in enumerate(tangents):
            per_tangent = []
            for tangent in stacked:
                with fwAD.dual_level():
                    duals = [
                        fwAD.make_dual(x, tangent) if k == i else x  # type: ignore[no-untyped-call]
                        for k, x in enumerate(self.leaves)
                    ]
                    per_tangent.append(
                        [
                            torch.zeros_like(out) if (t := _tangent(out)) is None else t.clone()
                            for out in self.flat_outputs(*duals)
                        ]
                    )
            columns.append(per_tangent)
        return [
            torch.stack([column[o] for column in columns[i]], dim=-1)
            for o, i in self.pair_indices()
        ]

    def finite_differences(
        self,
        primals: list[torch.Tensor],
        wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
        delta: float | None,
        scheme: Scheme,
        order: int | None,
        strategy: Strategy | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``jacfd_with_error`` of ``wrap(leaves -> func(...))`` at ``primals``, as
        flat blocks output-major; without a ``strategy``, vmap first and a plain
        loop if func cannot run under vmap."""

        def run(
            f: Callable[..., Any], chosen: Strategy
        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            g = wrap(lambda *leaves: self.call(f, leaves))
            if hasattr(self.func, NOISE_EXPONENT):  # func made by jacfd: its precision
                setattr(g, NOISE_EXPONENT, getattr(self.func, NOISE_EXPONENT))
            jac, err = jacfd_with_error(
                g, tuple(range(len(primals))), delta, scheme, order=order, strategy=chosen
            )(*primals)
            return tree_flatten(jac)[0], tree_flatten(err)[0]

        with torch.no_grad():
            if strategy is not None:
                return run(self.func, strategy)
            for candidate in (_forward_of(self.func), self.func):
                if candidate is None:
                    continue
                try:
                    return run(candidate, "vmap")
                except RuntimeError as error:
                    if "vmap" not in str(error):
                        raise
            return run(self.func, "loop")


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


def _jacobian(
    flat: Callable[..., tuple[torch.Tensor, ...]],
    inputs: tuple[torch.Tensor, ...],
    vectorize: bool,
    strategy: str,
) -> tuple[tuple[torch.Tensor, ...], ...]:
    jac: tuple[tuple[torch.Tensor, ...], ...] = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]
        flat, inputs, vectorize=vectorize, strategy=strategy
    )
    return jac


def _tangent(out: torch.Tensor) -> torch.Tensor | None:
    tangent: torch.Tensor | None = fwAD.unpack_dual(out).tangent  # type: ignore[no-untyped-call]
    return tangent


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
