"""Step rules that fit the function: ``typical=``, ``noise=`` and ``bounds=``.

The default step (``_steps.exact_steps``) assumes that ``func`` is accurate to
its dtype's eps, curved on the scale ``max(1, |x|)``, and defined everywhere
near ``x``. Each option here replaces one assumption:

- ``typical``: the scale is ``max(|x|, typical)`` (Dennis and Schnabel's
  ``typx``), for inputs whose natural size is far from 1;
- ``noise``: func's values are accurate to ``noise`` relative (a float, e.g. an
  ODE solver's rtol, or ``"estimate"``: measured per call by ECnoise, see
  ``_noise``); the steps balance truncation against that instead of eps;
- ``bounds``: the points stay in ``[lower, upper]``: one-sided stencils flip
  towards the room, and steps shrink where the room is short (see ``_bounds``).

None of it runs unless one of the options is given: the transforms' hot path
only tests ``options.rule is None``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten

from ._stencil import Stencil
from ._steps import (
    Delta,
    StepSpec,
    any_readable,
    check_positive_tree,
    exact_steps,
    match_delta,
)

if TYPE_CHECKING:
    from ._plan import Call, Options


@dataclass(frozen=True)
class StepRule:
    """A transform's validated ``typical``, ``noise`` and ``bounds``."""

    typical: Delta
    noise: float | str | torch.Tensor | None
    """None, a relative noise level >= 0, or ``"estimate"`` (a tensor only where a
    one-sided pass reuses a level estimated under vmap or torch.compile)."""
    bounds: tuple[Any, Any] | None


@dataclass(frozen=True)
class RuleSpecs:
    """The rule matched to one call signature's differentiated leaves."""

    typical: list[StepSpec]
    lower: list[StepSpec]
    upper: list[StepSpec]


def check_rule(
    name: str, typical: Any, noise: Any, bounds: Any, stencil: Stencil
) -> StepRule | None:
    """Validates ``typical``, ``noise`` and ``bounds`` once, when the transform is built."""
    if typical is None and noise is None and bounds is None:
        return None
    if typical is not None:
        check_positive_tree(
            name,
            "typical",
            typical,
            "typical is the size of an input that is typical for func, e.g. typical=1e-5.",
        )
    if noise is not None:
        if isinstance(noise, str):
            if noise != "estimate":
                raise ValueError(
                    f"{name}(func, noise={noise!r}): noise must be None, a float (func's "
                    "relative noise, e.g. an ODE solver's rtol) or 'estimate'."
                )
        elif isinstance(noise, bool) or not isinstance(noise, (int, float)):
            raise TypeError(
                f"{name}(func, noise): noise must be None, a float or 'estimate', got "
                f"{type(noise).__name__}."
            )
        elif not (math.isfinite(noise) and 0 <= noise < 1):
            raise ValueError(
                f"{name}(func, noise={noise!r}): noise is the relative noise of func's "
                "values and must be in [0, 1), e.g. noise=1e-6 for an ODE solver run at "
                "rtol=1e-6."
            )
        else:
            noise = float(noise)
    if bounds is not None:
        bounds = _check_bounds(name, bounds)
    return StepRule(typical, noise, bounds)


def _check_bounds(name: str, bounds: Any) -> tuple[Any, Any]:
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(
            f"{name}(func, bounds): bounds must be a pair (lower, upper), each a float "
            "(infinities allowed), a tensor broadcastable to the differentiated tensor, or a "
            f"pytree of them matching the differentiated arguments; got {bounds!r}."
        )
    for side, value in zip(("lower", "upper"), bounds):
        leaves, _ = tree_flatten(value)
        if not leaves:
            raise TypeError(f"{name}(func, bounds): the {side} bound holds no value: {value!r}.")
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                if not leaf.dtype.is_floating_point or any_readable(leaf.isnan()):
                    raise ValueError(
                        f"{name}(func, bounds): a {side} bound tensor must be floating point "
                        "without NaN (use -inf/inf for no bound)."
                    )
            elif isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
                if math.isnan(leaf):
                    raise ValueError(
                        f"{name}(func, bounds): the {side} bound is NaN; use "
                        f"{'-' if side == 'lower' else ''}math.inf for no bound."
                    )
            else:
                raise TypeError(
                    f"{name}(func, bounds): a {side} bound must be a float or a tensor, got "
                    f"a {type(leaf).__name__}."
                )
    lower, upper = bounds
    if isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and lower > upper:
        raise ValueError(
            f"{name}(func, bounds=({lower!r}, {upper!r})): the lower bound exceeds the upper."
        )
    return lower, upper


def match_rule(name: str, rule: StepRule, leaves: list[torch.Tensor], spec: TreeSpec) -> RuleSpecs:
    """The rule's values per differentiated leaf, checked against their shapes."""
    n = len(leaves)
    typical: list[StepSpec] = [None] * n
    if rule.typical is not None:
        typical = match_delta(name, rule.typical, leaves, spec, "typical")
    if rule.bounds is None:
        lower: list[Any] = [-math.inf] * n
        upper: list[Any] = [math.inf] * n
    else:
        lower = match_delta(name, rule.bounds[0], leaves, spec, "bounds")
        upper = match_delta(name, rule.bounds[1], leaves, spec, "bounds")
    return RuleSpecs(typical, lower, upper)


def precisions_for(call: Call, options: Options, output_eps: float) -> list[float]:
    """Each leaf's eps (or the output's, if coarser), worsened by any jacfd in func."""
    plan = call.plan
    if not output_eps:
        return plan.precisions
    return [
        max(torch.finfo(dtype).eps, output_eps) ** options.noise_exponent for dtype in plan.dtypes
    ]


def rule_steps(call: Call, options: Options, output_eps: float) -> list[torch.Tensor]:
    """The steps of every differentiated leaf under the transform's rule."""
    from ._bounds import fit_to_bounds, misfit, reach_of  # (they import this module)

    rule, plan = options.rule, call.plan
    if rule is None or plan.rule_specs is None:
        raise AssertionError("rule_steps without a rule")
    specs: RuleSpecs = plan.rule_specs
    precisions = precisions_for(call, options, output_eps)
    if rule.bounds is not None:
        from ._bounds import check_inside

        check_inside(options.name, call.primals, specs)
    level: float | torch.Tensor = 0.0
    if isinstance(rule.noise, str):  # "estimate"
        from ._noise import estimate_for_call

        level = estimate_for_call(call, options)
        call.noise = level
    elif rule.noise is not None:  # a float, or a level estimated by the central pass
        level = call.noise = rule.noise
    steps, misfits = [], []
    for k, (leaf, spec, precision) in enumerate(zip(call.primals, plan.step_specs, precisions)):
        # Noise above the dtype's rounding is what the steps must balance instead
        # (an estimate under vmap or torch.compile is a tensor: a level per sample).
        balanced = (
            level.clamp_min(precision)
            if isinstance(level, torch.Tensor)
            else max(precision, level)
        )
        h = exact_steps(leaf, spec, options.stencil, balanced, options.name, specs.typical[k])
        if rule.bounds is not None and not plan.points.imaginary:
            reach = reach_of(plan.points)
            if reach[0] == -reach[1]:  # central: its misfits get a one-sided pass
                misfits.append(misfit(leaf, h, specs.lower[k], specs.upper[k], reach[1]))
            h = fit_to_bounds(leaf, h, specs.lower[k], specs.upper[k], reach, options.stencil)
        steps.append(h)
    if misfits:
        call.misfit = torch.cat(misfits) if len(misfits) > 1 else misfits[0]
    return steps
