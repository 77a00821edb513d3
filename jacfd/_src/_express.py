"""The express path: a call that takes one evaluation, as straight-line code.

Most calls of ``jacfd`` (and of ``hessdiagfd``, ``laplacianfd``) differentiate
one tensor densely, with a real stencil, at points that fit one evaluation of
func: no chunks, colours, bounds, workers, or random numbers to replay. For such
a call signature the plan also holds an :class:`Express`, with every decision of
the driver bound once, and a call runs only what depends on the values::

    steps -> the batch of points -> func -> differences -> jacrev's layout

Each stage is the general path's own function (``exact_steps``, the point
set's offset pattern and ``build``, the strategy's ``run``, the generator
watch, ``contract``, ``to_torch_func_layout``), so both paths give the same
bits (``tests/test_express.py``). What the express path skips is the driver's
generic bookkeeping (chunk loop, parallel and checkpoint branches, per-call
dataclasses), which on a tiny function costs as much as the arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_map

from ._buffers import Modules, kept_buffers
from ._contract import contract
from ._driver import CoarserOutput, check_outputs_once, flatten_output
from ._inputs import check_output
from ._layout import ONE_TENSOR as _ONE_TENSOR
from ._layout import split_dim, to_torch_func_layout
from ._plan import ExpressFactory, Options, Plan, at_point_of
from ._points import AxisPoints
from ._random import cuda_indices_of, generator_bytes
from ._steps import exact_steps
from ._strategy import Batched, check_draws

Finish = Callable[[list[torch.Tensor], TreeSpec], Any]
"""The columns of each output leaf, ``(n, *out)``, and the output's tree spec -> what
the transform returns (``laplacianfd``'s sums); without one, jacrev's layout."""


class Express:
    """One call signature's whole evaluation (see the module docstring).

    Holds no tensor of the caller's: only the plan's own (the offset pattern).
    """

    def __init__(
        self,
        func: Callable[..., Any],
        options: Options,
        plan: Plan,
        leaf: torch.Tensor,
        modules: Modules,
        finish: Finish | None = None,
    ) -> None:
        points = plan.points
        if not isinstance(points, AxisPoints):  # (checked by ``expressible``)
            raise AssertionError("the express path takes a dense point set")
        self.func, self.options, self.plan, self.points = func, options, plan, points
        self.chunk = points.chunks[0]
        self.argnum = plan.argnums[0]
        self.rows = points.rows(self.chunk)
        self.pattern = points.pattern(self.chunk, [leaf])
        self.shape = leaf.shape
        self.modules, self.finish = modules, finish
        # randomness="error" where func runs outside vmap: watch the generators.
        watches = options.randomness == "error" and options.strategy.watches_rng
        self.watch = cuda_indices_of([leaf]) if watches else None
        self.contraction = points.contractions[0]
        # Forward and backward differences of one output tensor are divided by the
        # steps after the layout, where the steps broadcast along the last axis.
        self.sign = 0
        if self.contraction.simple:
            self.sign = 1 if self.contraction.terms[0][2] > 0 else -1
        self.one_to_one = options.single_argnum and plan.spec == _ONE_TENSOR
        # A plain Batched(): func takes the batch as it is, and nothing else changes.
        strategy = options.strategy
        self.direct = (
            isinstance(strategy, Batched)
            and strategy.leading
            and strategy.others == "broadcast"
            and not options.has_aux
        )

    @staticmethod
    def factory(
        func: Callable[..., Any], options: Options, finish: Finish | None = None
    ) -> ExpressFactory:
        """What a transform gives its ``Planner``: the express path of a signature
        where it is expressible, with ``finish`` (None: jacrev's layout)."""

        def make(plan: Plan, primals: list[torch.Tensor], modules: Modules) -> Express | None:
            if not Express.expressible(options, plan, primals):
                return None
            return Express(func, options, plan, primals[0], modules, finish)

        return make

    @staticmethod
    def expressible(options: Options, plan: Plan, primals: list[torch.Tensor]) -> bool:
        """Whether a signature's calls take the express path: one tensor, one
        evaluation, one contraction, a real stencil, and nothing to share out."""
        points = plan.points
        return (
            type(points) is AxisPoints
            and len(primals) == 1
            and plan.bare
            and primals[0].numel() > 0
            and plan.calls == 1
            and len(points.chunks) == 1
            and len(points.contractions) == 1
            and not points.imaginary
            and options.rule is None
            and options.workers is None
            and options.process_group is None
        )

    def _at_point(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[..., Any]:
        """func as a function of the differentiated tensor, as the strategies take it."""
        options, plan = self.options, self.plan
        return at_point_of(
            self.func, options.name, options.has_aux, plan.argnums, True, plan.spec, args, kwargs
        )

    def _evaluate(
        self,
        at_point: Callable[..., Any] | None,
        batch: torch.Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        """func at the batch of points, by the strategy; a plain ``Batched()`` calls
        func itself and only checks what its ``run`` would have checked."""
        if self.direct:
            call_args = list(args)
            call_args[self.argnum] = batch
            out = self.func(*call_args, **kwargs)
            rows = self.rows
            plain = type(out) is torch.Tensor and out.dtype.is_floating_point
            if plain and out.dim() and out.shape[0] == rows:
                return out
            check_output(self.options.name, out)
            # Anything else (an error, a pytree): the strategy's own unstacking.
            name = self.options.name
            return self.options.strategy.run(lambda *_: out, (batch,), (0,), rows, name, None)
        strategy, name = self.options.strategy, self.options.name
        if at_point is None:  # (made for every strategy but the direct one)
            raise AssertionError("no function of the points to evaluate")
        return strategy.run(at_point, (batch,), (0,), self.rows, name, None)

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The transform's result, or None where the general path must take the
        call (func computes coarser than its inputs: see ``_driver``)."""
        options, plan = self.options, self.plan
        if plan.output_eps[0]:
            return None
        name, has_aux = options.name, options.has_aux
        x = args[self.argnum]
        h = exact_steps(x, plan.step_specs[0], options.stencil, plan.precisions[0], name)
        pattern = self.pattern
        if pattern is None:
            batch = self.points.build(self.chunk, [x], [h])[0][0]
        elif len(self.shape) == 1:
            batch = torch.addcmul(x, pattern, h)  # x broadcasts over the rows
        else:
            batch = torch.addcmul(x.reshape(-1), pattern, h).view(self.rows, *self.shape)
        at_point = None if self.direct else self._at_point(args, kwargs)
        watch = self.watch  # the generators' bytes before func, if they are watched
        start = generator_bytes(watch) if watch is not None else None
        if self.modules:  # modules with buffers: put back what func changes in them
            with kept_buffers(self.modules, name):
                outputs = self._evaluate(at_point, batch, args, kwargs)
        else:
            outputs = self._evaluate(at_point, batch, args, kwargs)
        if watch is not None and generator_bytes(watch) != start:
            point = at_point or self._at_point(args, kwargs)
            check_draws(options.strategy, point, (batch,), (0,), name)
        out = outputs[0] if has_aux else outputs
        flat_out, out_spec = flatten_output(out)
        try:
            check_outputs_once(options, plan, [x], flat_out, 0.0)
        except CoarserOutput as coarser:
            plan.output_eps[0] = coarser.eps
            return None
        aux = tree_map(lambda value: value[0], outputs[1]) if has_aux else None
        if self.sign and self.one_to_one and type(out) is torch.Tensor and self.finish is None:
            # (f(x +- h e_j) - f(x)) / (+-h_j): the differences laid out as
            # (*out, n), then divided with the steps broadcast along the last axis.
            at_x, shifted = out[0], out[1:]
            diff = torch.sub(shifted, at_x) if self.sign > 0 else torch.sub(at_x, shifted)
            jac = diff.movedim(0, -1).div_(h if h.dtype == out.dtype else h.to(out.dtype))
            jac = split_dim(jac, -1, self.shape)
        else:
            center = None
            if self.chunk.with_center:
                center = [value[0] for value in flat_out]
                flat_out = [value[1:] for value in flat_out]
            count, offsets = self.chunk.count, len(self.points.offsets)
            columns = [
                contract(
                    v, None if center is None else center[k], self.contraction, h, count, offsets
                )
                for k, v in enumerate(flat_out)
            ]
            if self.finish is not None:
                jac = self.finish(columns, out_spec)
            else:
                jac = to_torch_func_layout(
                    columns, out_spec, plan.shapes, plan.spec, options.single_argnum
                )
        return (jac, aux) if has_aux else jac
