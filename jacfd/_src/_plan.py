"""Options and plans: everything decided before func is evaluated.

``check_options`` validates a transform's options once, when it is built.
:class:`Planner` then decides, once per *call signature* (argnums, pytree
structure, shapes, dtypes, devices, requires_grad), everything that does not
depend on the values: the differentiated leaves, the step specifications, the
point set with its chunks, colours and layout. A call only flattens its
arguments, looks its plan up, and evaluates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map_only

from ._buffers import Modules, modules_of
from ._inputs import (
    Argnums,
    check_argnums,
    check_callable,
    check_primals,
    normalize_argnums,
    replace_primals,
    split_output,
)
from ._points import PointSet
from ._random import RANDOMNESS, Randomness
from ._rule import StepRule, check_rule, match_rule
from ._stencil import Stencil, resolve_stencil
from ._steps import Delta, StepSpec, check_delta, match_delta, noise_of
from ._strategy import Strategy, resolve_strategy
from ._workers import Workers, check_process_group, check_workers

_PLANS_LOCK = threading.Lock()
"""Guards every plan cache's insertions (rare: once per new signature). One lock for
all transforms, made at import: a transform built inside torch.compile (jvpfd builds
one per call) then creates no lock, which Dynamo cannot trace."""

PLAN_CACHE_SIZE = 32
"""Plans kept per transform: one per call signature seen, the oldest dropped."""


@dataclass(frozen=True)
class Options:
    """A transform's validated options."""

    name: str
    """The public transform the user called, for error messages."""
    argnums: Argnums
    delta: Delta
    stencil: Stencil
    """The stencil whose step rule applies (extra contractions may use others)."""
    has_aux: bool
    chunk_size: int | None
    randomness: Randomness
    strategy: Strategy
    noise_exponent: float
    """func's values are accurate to ~eps**noise_exponent: 1, or less if func was
    itself made by jacfd."""
    workers: Workers = None
    """Where the chunks are evaluated: here (None), n processes, or a map."""
    process_group: Any = None
    """A ``torch.distributed`` group sharing the chunks among its ranks, or None."""
    rule: StepRule | None = None
    """``typical``, ``noise`` and ``bounds``, if any was given (see ``_rule``)."""

    @property
    def single_argnum(self) -> bool:
        return isinstance(self.argnums, int)


def check_options(
    name: str,
    func: Callable[..., Any],
    *,
    argnums: Argnums,
    delta: Delta,
    scheme: str,
    order: int | None,
    has_aux: bool,
    chunk_size: int | None,
    randomness: Randomness,
    strategy: object = "vmap",
    derivative: int = 1,
    workers: object = None,
    process_group: object = None,
    typical: Any = None,
    noise: Any = None,
    bounds: Any = None,
) -> Options:
    """Validates the options at run time too: callers need not be type-checked."""
    check_callable(name, func)
    check_argnums(name, argnums)
    stencil = resolve_stencil(name, scheme, order, derivative)
    delta = check_delta(name, delta)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(
                f"{name}(func, chunk_size): chunk_size must be None or a positive int, "
                f"got {type(chunk_size).__name__}."
            )
        if chunk_size <= 0:
            raise ValueError(
                f"{name}(func, chunk_size={chunk_size}): chunk_size must be positive; use "
                "chunk_size=None for one vmap call, or chunk_size=1 for a plain loop "
                "without vmap."
            )
    if randomness not in RANDOMNESS:
        raise ValueError(
            f"{name}(func, randomness={randomness!r}): unknown randomness; choose one of "
            f"{RANDOMNESS} (as in torch.func.vmap)."
        )
    if not isinstance(has_aux, bool):
        raise TypeError(f"{name}(func, has_aux): has_aux must be a bool, got {has_aux!r}.")
    return Options(
        name,
        argnums,
        delta,
        stencil,
        has_aux,
        chunk_size,
        randomness,
        resolve_strategy(name, strategy, chunk_size, randomness),
        noise_of(func),
        check_workers(name, workers),
        check_process_group(name, process_group),
        check_rule(name, typical, noise, bounds, stencil),
    )


@dataclass(frozen=True)
class Plan:
    """What one call signature decides. Holds no tensor of the caller's."""

    argnums: tuple[int, ...]
    spec: TreeSpec
    """The differentiated arguments' structure (a tuple over argnums)."""
    bare: bool
    """Every differentiated argument is a tensor, not a pytree of them."""
    shapes: list[torch.Size]
    dtypes: list[torch.dtype]
    precisions: list[float]
    """Each leaf's eps, raised to func's noise exponent: what its steps balance."""
    step_specs: list[StepSpec]
    points: PointSet
    calls: int
    """How many calls of func the point set takes."""
    shares_leaves: bool
    """Some calls get an unperturbed differentiated leaf as it is (not copied)."""
    extra: Any = None
    """What the structure decided for this signature (e.g. the batch size)."""
    checked_dtypes: dict[float, list[torch.dtype]] = field(default_factory=dict)
    """Output dtypes already checked (per output precision): not checked again."""
    rule_specs: Any = None
    """What ``options.rule`` matched to the differentiated leaves (see ``_rule``)."""
    output_eps: list[float] = field(default_factory=lambda: [0.0])
    """The outputs' eps once func turned out to compute coarser than its inputs:
    later calls step for it at once, instead of redoing the first chunk."""


@dataclass
class Call:
    """One call: its plan, its differentiated leaves, and func as a function of them."""

    plan: Plan
    primals: list[torch.Tensor]
    at_point: Callable[..., Any]
    """The leaves -> ``out``, or ``(out, aux)`` with has_aux, checked; the keyword
    ``others`` maps the tensors of the non-differentiated arguments."""
    modules: tuple[torch.nn.Module, ...] = ()
    """The modules func visibly uses, whose buffers are kept (see ``_buffers``)."""
    func: Callable[..., Any] | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    """func and the call's arguments: what a worker needs to rebuild ``at_point``."""
    noise: float | torch.Tensor | None = None
    """func's relative noise as given or estimated for this call (``noise=``)."""
    misfit: torch.Tensor | None = None
    """With ``bounds`` and a central stencil: the coordinates without room for it."""


PointsFactory = Callable[[list[torch.Tensor]], "tuple[PointSet, Any]"]
"""The differentiated leaves (only their shapes, dtypes and devices are read) ->
the point set and the structure's per-signature data."""


ExpressFactory = Callable[[Plan, list[torch.Tensor], Modules], Any]
"""A plan, the call's leaves and func's modules -> the signature's express path
(see ``_express``), or None where it takes the general path."""


class Planner:
    """Makes the calls of one transform, with a bounded, thread-safe plan cache."""

    def __init__(
        self,
        func: Callable[..., Any],
        options: Options,
        points: PointsFactory,
        express: ExpressFactory | None = None,
    ) -> None:
        self.func, self.options, self.make_points = func, options, points
        self.make_express = express
        self._plans: dict[Any, Plan] = {}
        self._express: dict[Any, Any] = {}
        """The express paths of the cached plans that have one, by the same key."""
        self._argnums: dict[int, tuple[int, ...] | None] = {}
        self.modules = modules_of(func)

    def express(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The call's result by its signature's express path, or None where the
        general path must take it: no express path (or its plan is not cached yet:
        a call of one bare tensor argument, outside torch.compile), or the express
        path handed it back."""
        argnums = self._argnums.get(len(args))
        if argnums is None or len(argnums) != 1:
            return None
        x = args[argnums[0]]
        if type(x) is not torch.Tensor or torch.compiler.is_compiling():
            return None
        key = (len(args), (x.shape, x.dtype, x.device, x.requires_grad))
        express = self._express.get(key)
        return None if express is None else express(args, kwargs)

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        options = self.options
        argnums = self._argnums.get(len(args))
        if argnums is None:
            argnums = self._argnums[len(args)] = _wrap(options.argnums, len(args))
        selected = [args[i] for i in argnums] if argnums is not None else None
        if selected is not None and all(type(a) is torch.Tensor for a in selected):
            primals: list[torch.Tensor] = selected
            key: Any = (
                len(args),
                *[(a.shape, a.dtype, a.device, a.requires_grad) for a in selected],
            )
        else:  # pytrees, tensor subclasses, or argnums out of range: the general path
            argnums = normalize_argnums(options.name, options.argnums, len(args))
            primals, spec = tree_flatten(tuple(args[i] for i in argnums))
            check_primals(options.name, primals, argnums)
            key = (
                len(args),
                spec,
                *[(a.shape, a.dtype, a.device, a.requires_grad) for a in primals],
            )
        if torch.compiler.is_compiling():  # no lock or cache inside a traced graph
            plan = self._plan(args, primals)
        else:
            cached = self._plans.get(key)
            if cached is None:
                plan = self._plan(args, primals)
                express = self.make_express and self.make_express(plan, primals, self.modules)
                with _PLANS_LOCK:
                    if len(self._plans) >= PLAN_CACHE_SIZE:
                        oldest = next(iter(self._plans))
                        self._plans.pop(oldest)
                        self._express.pop(oldest, None)
                    self._plans[key] = plan
                    if express is not None:
                        self._express[key] = express
            else:
                plan = cached
        at_point = self._at_point(plan, args, kwargs)
        return Call(plan, primals, at_point, self.modules, self.func, args, kwargs)

    def _plan(self, args: tuple[Any, ...], primals: list[torch.Tensor]) -> Plan:
        options, name = self.options, self.options.name
        argnums = normalize_argnums(name, options.argnums, len(args))
        _, spec = tree_flatten(tuple(args[i] for i in argnums))
        check_primals(name, primals, argnums)
        for leaf in primals:
            options.strategy.check_leaf(name, leaf)
        points, extra = self.make_points(primals)
        calls = sum(
            options.strategy.calls(points.rows(c), options.chunk_size) for c in points.chunks
        )
        return Plan(
            argnums,
            spec,
            all(isinstance(args[i], torch.Tensor) for i in argnums),
            [p.shape for p in primals],
            [p.dtype for p in primals],
            [torch.finfo(p.dtype).eps ** options.noise_exponent for p in primals],
            match_delta(name, options.delta, primals, spec),
            points,
            calls,
            len(primals) > 1 and points.shares_leaves,
            extra,
            rule_specs=None
            if options.rule is None
            else match_rule(name, options.rule, primals, spec),
        )

    def _at_point(
        self, plan: Plan, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[..., Any]:
        options = self.options
        return at_point_of(
            self.func,
            options.name,
            options.has_aux,
            plan.argnums,
            plan.bare,
            plan.spec,
            args,
            kwargs,
        )


def at_point_of(
    func: Callable[..., Any],
    name: str,
    has_aux: bool,
    argnums: tuple[int, ...],
    bare: bool,
    spec: TreeSpec,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Callable[..., Any]:
    """func as a function of the differentiated leaves (see :attr:`Call.at_point`);
    module-level so that a worker process rebuilds the same closure."""

    def at_point(
        *leaves: torch.Tensor, others: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Any:
        call_args, call_kwargs = args, kwargs
        if others is not None:
            call_args = tuple(
                arg if i in argnums else tree_map_only(torch.Tensor, others, arg)
                for i, arg in enumerate(args)
            )
            call_kwargs = tree_map_only(torch.Tensor, others, kwargs)
        if bare:  # the common case: no pytree round trip for each point
            new_args = list(call_args)
            for argnum, leaf in zip(argnums, leaves):
                new_args[argnum] = leaf
            result = func(*new_args, **call_kwargs)
        else:
            result = func(*replace_primals(call_args, argnums, leaves, spec), **call_kwargs)
        out, aux = split_output(name, result, has_aux)
        # A bare output without aux: a tuple would cost vmap another level.
        return (out, aux) if has_aux else out

    return at_point


def _wrap(argnums: Argnums, num_args: int) -> tuple[int, ...] | None:
    """argnums wrapped against the call, or None if one is out of range."""
    requested = argnums if isinstance(argnums, tuple) else (argnums,)
    if not all(-num_args <= a < num_args for a in requested):
        return None
    return tuple(a % num_args for a in requested)
