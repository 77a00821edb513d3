"""``jacfd_adaptive``: a Jacobian whose step is chosen per column from a sequence
of steps by Richardson extrapolation, with an error estimate that bounds it.

The steps are ``h/4, h/2, h, 2h, 4h, 8h`` around the automatic step ``h``: the
stencil at every step, for every column, is one point set (offsets in units of
``h/4``), evaluated in one batched call. With ``rtol``/``atol`` the sequence is
split into two rounds, ``h, 2h, 4h`` first and the rest only for the columns
whose estimate is not yet below the tolerance.

Consecutive estimates ``D_s`` and ``D_2s`` extrapolate to ``R_s`` (error
``O(s**(p+1))``); ``R_s`` is compared with its neighbours ``R_s/2`` and ``R_2s``
as in Ridders' method and numdifftools: the larger difference, times
``SAFETY``, estimates its error where truncation dominates. Where rounding
dominates that difference is one random sample of the noise and may be small by
chance, so two floors are added: ``ROUNDING_SAFETY * eps * sum|w||f| / h`` (f's
own rounding) and ``NOISE_SAFETY`` times the noise measured at the smallest
step, whose difference ``|D_h/4 - D_h/2|`` is mostly rounding. That noise is
the same quantity for every column of an output element (f's noise), so its
largest sample over the columns is taken (the median let a few entries of a
function with cancellation exceed their estimate). Each column keeps the step
whose estimate is smallest over the column (the selection: ``_selection``).

With ``bounds``, every round's steps leave room for the whole sequence (``8h``):
a one-sided stencil turns towards the room (a negative step) or shrinks where
neither side has it; the coordinates without room for a central stencil get the
one-sided stencil of the same order (at most 4) at all six steps, in a pass over
those coordinates only, and only the columns with room sample the noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ._contract import Contraction
from ._driver import Columns, run_points
from ._inputs import Argnums, P, wraps
from ._layout import per_argnums, to_torch_func_layout
from ._plan import Call, Options, Planner, check_options
from ._points import ColorPoints
from ._random import Randomness
from ._selection import Selection
from ._stencil import Scheme, Stencil, get_stencil
from ._strategy import StrategyOption as Strategy

UNIT = 4
"""The offsets are multiples of ``h / UNIT``: the smallest step of the sequence."""
ROUNDS = ((4, 8, 16), (1, 2, 32))
"""The steps of each round, in units of ``h / UNIT``: ``h, 2h, 4h``, then
``h/4, h/2, 8h``. Without a tolerance both are one round."""


class AdaptiveInfo(NamedTuple):
    """What :func:`jacfd_adaptive` did, returned with the Jacobian.

    Examples:
        >>> import torch
        >>> from jacfd import jacfd_adaptive
        >>> x = torch.tensor([0.5, 3.0], dtype=torch.float64)
        >>> _, _, info = jacfd_adaptive(torch.exp)(x)
        >>> int(info.evaluations), info.step.shape
        (24, torch.Size([2]))
    """

    evaluations: torch.Tensor
    """0-dim int64: the points at which func was evaluated, over all rounds."""
    step: Any
    """The step each column (differentiated input element) kept, laid out like
    the differentiated arguments (a tuple over ``argnums`` unless it is an int)."""


@dataclass(frozen=True)
class _UnitStencil(Stencil):
    """The stencil, whose automatic step is ``h / divisor`` (its offsets unchanged)."""

    divisor: int = 1

    def _step_constant(self) -> float:
        return super()._step_constant() / self.divisor


def _unit(stencil: Stencil) -> Stencil:
    return _UnitStencil(
        stencil.offsets, stencil.weights, stencil.derivative, stencil.accuracy, divisor=UNIT
    )


class _Round:
    """One round's offsets and contractions: ``D`` and ``sum|w||f|/h`` per step."""

    def __init__(self, stencil: Stencil, multiples: tuple[int, ...], has_aux: bool) -> None:
        scaled = [stencil.scaled(m) for m in multiples]
        self.multiples = multiples
        every = [m * o for m in (*ROUNDS[0], *ROUNDS[1]) for o in stencil.offsets]
        self.reach = (min(0, *every), max(0, *every))
        """Every round's steps: ``bounds`` leave room for all of them at once."""
        self.offsets = tuple(sorted({o for s in scaled for o in s.offsets if o != 0}))
        self.contractions = [Contraction.of(s, self.offsets) for s in scaled] + [
            Contraction.of(s, self.offsets, absolute=True) for s in scaled
        ]
        self.with_center = has_aux or any(c.needs_center for c in self.contractions)

    def planner(
        self, func: Callable[..., Any], options: Options, colors: torch.Tensor | None
    ) -> Planner:
        """A planner of the round's points along every column (``colors`` None),
        or along those ``colors`` selects: colour ``c`` for the c-th column
        evaluated, -1 for a column skipped."""

        def points(primals: list[torch.Tensor]) -> tuple[ColorPoints, Any]:
            chosen, count = colors, 0
            if chosen is None:
                count = sum(p.numel() for p in primals)
                chosen = torch.arange(count, device=primals[0].device if primals else None)
            else:
                count = int((chosen >= 0).sum())
            contractions, center = self.contractions, self.with_center
            points = ColorPoints(
                chosen, count, self.offsets, contractions, center, options.chunk_size
            )
            points.reach = self.reach
            return points, None

        return Planner(func, options, points)

    def rows(self, columns: int) -> int:
        return int(self.with_center) + len(self.offsets) * columns


def _check_tolerance(name: str, option: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}(func, {option}): {option} must be a float, got {value!r}.")
    if not value >= 0:
        raise ValueError(
            f"{name}(func, {option}={value!r}): {option} must be >= 0 (0 runs every step)."
        )
    return float(value)


def jacfd_adaptive(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    rtol: float = 0.0,
    atol: float = 0.0,
    has_aux: bool = False,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> Callable[P, tuple[Any, ...]]:
    """A Jacobian with a per-column step chosen from ``h/4 ... 8h``, and an error
    estimate meant to bound the true error.

    Every column (differentiated input element) is differentiated with the
    stencil of ``scheme`` and ``order`` at six steps, ``h/4, h/2, h, 2h, 4h,
    8h`` around the automatic step ``h`` of :func:`jacfd`, all in one batched
    call. Consecutive steps are Richardson-extrapolated; each column keeps the
    extrapolation whose error estimate is smallest (the larger difference to
    its neighbours in the sequence, plus rounding and noise floors: see
    ``docs/accuracy.md`` for how often it bounds the true error). This costs
    three times :func:`jacfd_with_error`'s evaluations (central: 12 per column).

    With ``rtol`` or ``atol``, the steps ``h, 2h, 4h`` are evaluated first; a
    column with ``max(error) <= atol + rtol * max|J|`` over its entries stops there, and
    only the others get the remaining steps, in a second batched call. (Inside
    ``vmap`` or ``torch.compile`` the values cannot be read: every column gets
    both rounds, and with ``bounds`` the one-sided pass below.)

    With ``bounds``, func is never evaluated outside them (scipy's semantics):
    the points of all six steps fit, one-sided stencils turn towards the room
    or shrink, and a central stencil's coordinates without room for ``8h`` on
    both sides get a one-sided stencil of the same order (at most 4), in another
    batched call over those coordinates. The estimate needs steps on which func
    is smooth: ``sqrt(x)`` at ``x = 1e-8`` is not, at the default step (pass
    ``typical``).

    Args:
        func: As in :func:`jacfd`.
        argnums: As in :func:`jacfd`.
        scheme: ``"central"`` (default), ``"forward"`` or ``"backward"``.
        order: The stencil's order, as in :func:`jacfd`.
        rtol: Relative tolerance for stopping after the first round.
        atol: Absolute tolerance for stopping after the first round.
        has_aux: As in :func:`jacfd`.
        chunk_size: As in :func:`jacfd` (rows per call).
        randomness: As in :func:`jacfd`.
        strategy: As in :func:`jacfd`.
        typical: As in :func:`jacfd`: the scale of ``h``.
        noise: As in :func:`jacfd`: the noise ``h`` and the rounding floor use.
        bounds: As in :func:`jacfd`: ``(lower, upper)``, floats, tensors or pytrees;
            a point outside them is a ``ValueError``.

    Returns:
        A function returning ``(jacobian, error, info)``, or ``(jacobian, error,
            info, aux)`` with ``has_aux``: the first two in :func:`jacfd`'s layout,
            ``info`` an :class:`AdaptiveInfo` with the number of evaluations and
            the step each column kept (negative where a bound turned it).

    Examples:
        >>> import torch
        >>> from jacfd import jacfd_adaptive
        >>> x = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
        >>> J, err, info = jacfd_adaptive(torch.sin)(x)
        >>> bool(((J - torch.diag(torch.cos(x))).abs() <= err).all())
        True
        >>> int(info.evaluations)  # 3 columns x 6 steps x 2 points
        36
        >>> _, _, info = jacfd_adaptive(torch.sin, rtol=1e-6)(x)
        >>> int(info.evaluations)  # the first round was enough
        18
    """
    name = "jacfd_adaptive"
    if scheme == "complex":
        raise ValueError(
            f"{name}(func, scheme='complex'): the complex step has no rounding to "
            "balance, so there is no step to choose; use jacfd(func, scheme='complex')."
        )
    options = check_options(
        name,
        func,
        argnums=argnums,
        delta=None,
        scheme=scheme,
        order=order,
        has_aux=has_aux,
        chunk_size=chunk_size,
        randomness=randomness,
        strategy=strategy,
        typical=typical,
        noise=noise,
        bounds=bounds,
    )
    rtol = _check_tolerance(name, "rtol", rtol)
    atol = _check_tolerance(name, "atol", atol)
    stencil = options.stencil
    early = rtol > 0 or atol > 0
    main = _Pass(func, options, stencil, early)
    side = None  # a central stencil near a bound: its columns from a one-sided one
    bounded = options.rule is not None and options.rule.bounds is not None
    if bounded and min(stencil.offsets) < 0 < max(stencil.offsets):
        one = get_stencil("forward", min(stencil.accuracy, 4), stencil.derivative)
        side = _Pass(func, options, one, early)

    @wraps(func)
    def jacobian_adaptive(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        call = main.first.prepare(args, kwargs)
        fine, columns, evaluations = main.run(call, main.options, args, kwargs, rtol, atol)
        misfit = call.misfit
        todo = None if side is None or misfit is None else _unreadable_or(~misfit)
        if side is not None and misfit is not None and todo is not None and todo.numel():
            # The coordinates without room for the central points at 8h, one-sided.
            measured = _measured(side.options, call)
            again = side.prepare(args, kwargs, call, todo)
            sided, _, more = side.run(
                again, measured, args, kwargs, rtol, atol, todo, misfit[todo]
            )
            fine.take(todo, sided, misfit)
            evaluations += more
        plan = call.plan
        layout = (columns.out_spec, plan.shapes, plan.spec, options.single_argnum)
        jac = to_torch_func_layout(fine.blocks(fine.jacobian), *layout)
        error = to_torch_func_layout(fine.blocks(fine.error), *layout)
        steps = torch.split(fine.step, [s.numel() for s in plan.shapes])
        leaves = [s.reshape(shape) for s, shape in zip(steps, plan.shapes)]
        info = AdaptiveInfo(
            torch.tensor(evaluations, dtype=torch.int64),
            per_argnums(leaves, plan.spec, options.single_argnum),
        )
        return (jac, error, info, columns.aux) if has_aux else (jac, error, info)

    return jacobian_adaptive


def _unreadable_or(done: torch.Tensor) -> torch.Tensor:
    """The columns still to do, or all of them where ``done`` cannot be read."""
    if torch.compiler.is_compiling():
        return torch.arange(done.numel(), device=done.device)
    try:
        return torch.nonzero(~done).reshape(-1)
    except RuntimeError:  # under vmap: data-dependent shapes are not allowed
        return torch.arange(done.numel(), device=done.device)


class _Pass:
    """The rounds of one stencil over the columns: the transform's, or the
    one-sided stencil that replaces a central one near a bound."""

    def __init__(
        self, func: Callable[..., Any], options: Options, stencil: Stencil, early: bool
    ) -> None:
        self.func, self.stencil = func, stencil
        self.options = dataclasses.replace(options, stencil=_unit(stencil))
        has_aux = options.has_aux
        self.rounds = (
            [_Round(stencil, m, has_aux) for m in ROUNDS]
            if early
            else [_Round(stencil, tuple(sorted(ROUNDS[0] + ROUNDS[1])), has_aux)]
        )
        self.first = self.rounds[0].planner(func, self.options, None)

    def prepare(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        call: Call,
        todo: torch.Tensor,
        round_: int = 0,
    ) -> Call:
        """A call of the round's points along the coordinates ``todo`` only, with
        ``call``'s output precision."""
        n = sum(p.numel() for p in call.primals)
        colors = torch.full((n,), -1, dtype=torch.long, device=todo.device)
        colors[todo] = torch.arange(todo.numel(), device=todo.device)
        again = self.rounds[round_].planner(self.func, self.options, colors).prepare(args, kwargs)
        again.plan.output_eps[0] = call.plan.output_eps[0]
        return again

    def run(
        self,
        call: Call,
        options: Options,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        rtol: float,
        atol: float,
        index: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> tuple[Selection, Columns, int]:
        """Every round along the call's columns (the coordinates ``index``, or all):
        the selection, the first round's columns and the evaluations. Only the
        ``valid`` columns sample f's noise (by default, those with room)."""
        columns = run_points(call, options)
        evaluations = self.rounds[0].rows(columns.blocks[0][0].shape[0])
        if valid is None and call.misfit is not None:  # central points without room
            valid = ~call.misfit
        fine = Selection(self.rounds[0], columns, call, self.stencil, index, valid)
        if len(self.rounds) == 1:
            fine.select(0.0, 0.0)
            return fine, columns, evaluations
        todo = _unreadable_or(fine.select(rtol, atol))
        if todo.numel():
            coordinates = todo if index is None else index[todo]
            again = self.prepare(args, kwargs, call, coordinates, 1)
            second = run_points(again, _measured(options, call))
            fine.add(self.rounds[1], second, todo)
            evaluations += self.rounds[1].rows(todo.numel())
            fine.select(0.0, 0.0, todo)
        return fine, columns, evaluations


def _measured(options: Options, call: Call) -> Options:
    """``options`` with the noise level ``call`` estimated, not measured again."""
    if options.rule is None or options.rule.noise != "estimate":
        return options
    level = 0.0 if call.noise is None else call.noise
    return dataclasses.replace(options, rule=dataclasses.replace(options.rule, noise=level))
