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
whose estimate is smallest over the column.
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
from ._stencil import Scheme, Stencil
from ._strategy import StrategyOption as Strategy
from ._with_error import ROUNDING_SAFETY

UNIT = 4
"""The offsets are multiples of ``h / UNIT``: the smallest step of the sequence."""
ROUNDS = ((4, 8, 16), (1, 2, 32))
"""The steps of each round, in units of ``h / UNIT``: ``h, 2h, 4h``, then
``h/4, h/2, 8h``. Without a tolerance both are one round."""
SAFETY = 2.0
"""Factor on the difference between neighbouring extrapolations."""
NOISE_SAFETY = 2.0
"""Factor on the noise measured at the smallest step."""


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
    both rounds.)

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

    Returns:
        A function returning ``(jacobian, error, info)``, or ``(jacobian, error,
            info, aux)`` with ``has_aux``: the first two in :func:`jacfd`'s layout,
            ``info`` an :class:`AdaptiveInfo` with the number of evaluations and
            the step each column kept.

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
    )
    rtol = _check_tolerance(name, "rtol", rtol)
    atol = _check_tolerance(name, "atol", atol)
    stencil = options.stencil
    options = dataclasses.replace(options, stencil=_unit(stencil))
    early = rtol > 0 or atol > 0
    rounds = (
        [_Round(stencil, m, has_aux) for m in ROUNDS]
        if early
        else [_Round(stencil, tuple(sorted(ROUNDS[0] + ROUNDS[1])), has_aux)]
    )
    first = rounds[0].planner(func, options, None)

    @wraps(func)
    def jacobian_adaptive(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
        call = first.prepare(args, kwargs)
        columns = run_points(call, options)
        n = columns.steps.numel()
        evaluations = rounds[0].rows(n)
        fine = _Fine(rounds[0], columns, call, stencil)
        if early:
            done = fine.select(rtol, atol)
            todo = _unreadable_or(done)
            if todo is not None and todo.numel():
                second = _second_round(func, options, call, args, kwargs, rounds[1], todo)
                fine.add(rounds[1], second, todo)
                evaluations += rounds[1].rows(todo.numel())
                fine.select(0.0, 0.0, todo)
        else:
            fine.select(0.0, 0.0)
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


def _unreadable_or(done: torch.Tensor) -> torch.Tensor | None:
    """The columns still to do, or all of them where ``done`` cannot be read."""
    if torch.compiler.is_compiling():
        return torch.arange(done.numel(), device=done.device)
    try:
        return torch.nonzero(~done).reshape(-1)
    except RuntimeError:  # under vmap: data-dependent shapes are not allowed
        return torch.arange(done.numel(), device=done.device)


def _second_round(
    func: Callable[..., Any],
    options: Options,
    call: Call,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    round_: _Round,
    todo: torch.Tensor,
) -> Columns:
    """The second round's steps along the columns ``todo``, with the first round's
    steps (its output precision and estimated noise, not measured again)."""
    if options.rule is not None and options.rule.noise == "estimate":
        options = dataclasses.replace(
            options,
            rule=dataclasses.replace(
                options.rule, noise=0.0 if call.noise is None else call.noise
            ),
        )
    n = sum(p.numel() for p in call.primals)
    colors = torch.full((n,), -1, dtype=torch.long, device=todo.device)
    colors[todo] = torch.arange(todo.numel(), device=todo.device)
    again = round_.planner(func, options, colors).prepare(args, kwargs)
    again.plan.output_eps[0] = call.plan.output_eps[0]
    return run_points(again, options)


class _Fine:
    """The derivative estimates at every step evaluated so far, per output leaf as
    float64 ``(steps, columns, outputs)``, and the selection among them."""

    def __init__(self, round_: _Round, columns: Columns, call: Call, stencil: Stencil) -> None:
        self.power, self.derivative = 2**stencil.accuracy, stencil.derivative
        self.unit = columns.steps.to(torch.float64)
        self.multiples = list(round_.multiples)
        blocks = columns.blocks[0]
        self.dtypes = [b.dtype for b in blocks]
        self.out_shapes = [b.shape[1:] for b in blocks]
        # The rounding of one evaluation, relative: the coarser of input and output,
        # or func's noise where it is larger.
        eps = max(
            *(torch.finfo(p.dtype).eps for p in call.primals),
            *(torch.finfo(b.dtype).eps for b in blocks if b.dtype.is_floating_point),
            call.plan.output_eps[0],
        )
        noise = call.noise  # (a tensor per sample when estimated under vmap)
        self.eps: float | torch.Tensor = (
            eps
            if noise is None
            else noise.clamp_min(eps)
            if isinstance(noise, torch.Tensor)
            else max(eps, noise)
        )
        self.d, self.a = self._blocks(round_, columns, self.unit)
        self.jacobian: list[torch.Tensor] = []
        self.error: list[torch.Tensor] = []
        self.step = self.unit

    def _blocks(
        self, round_: _Round, columns: Columns, h: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per output leaf: D and sum|w||f|/h as ``(steps, columns, outputs)``; the
        colours' columns are not divided by their steps yet."""
        count = len(round_.multiples)
        scale = h.reshape(1, -1, 1) ** self.derivative
        d, a = [], []
        for k in range(len(columns.blocks[0])):
            stack = [columns.blocks[c][k] for c in range(2 * count)]
            flat = torch.stack([s.reshape(s.shape[0], -1) for s in stack]).to(torch.float64)
            flat = flat / scale
            d.append(flat[:count])
            a.append(flat[count:])
        return d, a

    def add(self, round_: _Round, columns: Columns, todo: torch.Tensor) -> None:
        """Merges the second round's steps for the columns ``todo`` (the other
        columns are dropped from the stacks: they are done)."""
        d, a = self._blocks(round_, columns, self.unit[todo])
        merged = self.multiples + list(round_.multiples)
        order = sorted(range(len(merged)), key=merged.__getitem__)
        self.multiples = [merged[i] for i in order]
        self.d = [torch.cat([old[:, todo], new])[order] for old, new in zip(self.d, d)]
        self.a = [torch.cat([old[:, todo], new])[order] for old, new in zip(self.a, a)]

    def select(self, rtol: float, atol: float, todo: torch.Tensor | None = None) -> torch.Tensor:
        """Keeps each column's best extrapolation (into the columns ``todo``);
        returns which columns have ``max error <= atol + rtol * max|J|``."""
        p, eps = self.power, self.eps
        h = self.unit if todo is None else self.unit[todo]
        scales = torch.tensor(self.multiples[:-1], dtype=torch.float64, device=h.device)
        steps = scales.reshape(-1, 1) * h.reshape(1, -1)  # (K, columns)
        results, errors, scores = [], [], []
        for d, a in zip(self.d, self.a):
            r = (p * d[:-1] - d[1:]) / (p - 1)
            spread = (r[1:] - r[:-1]).abs()
            nearby = torch.maximum(
                torch.cat([spread[:1], spread]), torch.cat([spread, spread[-1:]])
            )
            floor = ROUNDING_SAFETY * eps * (p * a[:-1] + a[1:]) / (p - 1)
            if self.multiples[0] == 1 and d.shape[1] > 0:  # the smallest step: f's noise
                noise = ((d[0] - d[1]).abs() * h.reshape(-1, 1)).amax(dim=0)
                floor = floor + NOISE_SAFETY * noise / steps[..., None]
            error = SAFETY * nearby + floor
            results.append(r)
            errors.append(error)
            worst = error.amax(dim=2) if error.shape[2] else error.sum(dim=2)
            scores.append(worst.nan_to_num(torch.inf))
        best = torch.stack(scores).amax(dim=0).argmin(dim=0)  # (columns,)
        jac, err = [], []
        largest = torch.zeros(best.shape, dtype=torch.float64, device=best.device)
        worst = torch.zeros_like(largest)
        for r, e in zip(results, errors):
            index = best.reshape(1, -1, 1).expand(1, *r.shape[1:])
            jac.append(r.gather(0, index)[0])
            err.append(e.gather(0, index)[0])
            if r.shape[2]:
                largest = torch.maximum(largest, jac[-1].abs().amax(dim=1))
                worst = torch.maximum(worst, err[-1].amax(dim=1))
        # Per column, as a norm: an entry that is zero (f ignores the input) keeps
        # its rounding floor, which no relative tolerance of its own would meet.
        done = worst <= atol + rtol * largest
        chosen = steps.gather(0, best.reshape(1, -1))[0]
        if todo is None:
            self.jacobian, self.error, self.step = jac, err, chosen
        else:
            self.jacobian = [j.index_copy(0, todo, new) for j, new in zip(self.jacobian, jac)]
            self.error = [e.index_copy(0, todo, new) for e, new in zip(self.error, err)]
            self.step = self.step.index_copy(0, todo, chosen)
        return done

    def blocks(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per output leaf, ``(columns, *out)`` in the output's dtype."""
        return [
            v.reshape(v.shape[0], *shape).to(dtype)
            for v, shape, dtype in zip(values, self.out_shapes, self.dtypes)
        ]
