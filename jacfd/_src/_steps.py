"""Step rule: how far each coordinate is perturbed.

The default step balances truncation error (~ h**p) against rounding error
(~ eps / h**q): ``h = eps**(1 / (p + q)) * max(1, |x|)`` in the input's own dtype.
Every step is then rounded so that ``x + h`` is exactly representable
(``h = (x + h) - x``), which removes the error of dividing by an ``h`` that is
not the distance actually travelled.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeAlias

import torch
from torch.utils._pytree import TreeSpec, tree_flatten

from ._stencil import Stencil

Delta: TypeAlias = "float | torch.Tensor | Any | None"
"""A step: None (automatic), a float, a tensor, or a pytree of tensors and floats
matching the differentiated arguments (hence the ``Any``)."""
StepSpec: TypeAlias = "float | torch.Tensor | None"
"""One differentiated leaf's step, after :func:`match_delta`."""

NOISE_EXPONENT = "_jacfd_noise_exponent"
"""Attribute of a function made by jacfd: its values are accurate to about
``eps**exponent`` relative, which is what a jacfd around it must step against."""


def mark_noise(fn: Callable[..., Any], exponent: float) -> None:
    """Marks a function made by jacfd: its values are accurate to ~eps**exponent."""
    setattr(fn, NOISE_EXPONENT, exponent)


def noise_of(func: Callable[..., Any]) -> float:
    """The noise exponent of func's values: 1 for an ordinary function."""
    return float(getattr(func, NOISE_EXPONENT, 1.0))


def check_delta(name: str, delta: Delta) -> Delta:
    """Validates a user's ``delta`` once, when the transform is built."""
    if delta is not None:
        check_positive_tree(
            name, "delta", delta, "Use delta=None for the automatic step, or e.g. delta=1e-6."
        )
    return delta


def any_readable(mask: torch.Tensor) -> bool:
    """``bool(mask.any())`` where the values can be read; False under
    ``torch.compile`` or ``vmap`` (a check on them is then skipped)."""
    if torch.compiler.is_compiling():
        return False
    try:
        return bool(mask.any())
    except RuntimeError:  # under vmap: data-dependent control flow is not allowed
        return False


def check_positive_tree(name: str, option: str, value: Any, fix: str) -> None:
    """``value`` must be a positive float, a floating tensor of positive finite values,
    or a pytree of them (``delta``, ``typical``): else a TypeError or ValueError
    naming ``name(func, option)``, ending with ``fix``."""
    expected = (
        f"{option} must be None, a positive float, a tensor, or a pytree of them matching "
        "the differentiated arguments"
    )
    leaves, _ = tree_flatten(value)
    if not leaves:
        raise TypeError(f"{name}(func, {option}): {expected}, got {value!r}. {fix}")
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if not leaf.dtype.is_floating_point:
                raise TypeError(
                    f"{name}(func, {option}): a {option} tensor must be floating point, got "
                    f"dtype {leaf.dtype}. {fix}"
                )
            bad = ~(torch.isfinite(leaf) & (leaf > 0))
            if any_readable(bad):
                raise ValueError(
                    f"{name}(func, {option}): every value of a {option} tensor must be finite "
                    f"and positive, got {leaf[bad].flatten()[:3].tolist()}. {fix}"
                )
        elif isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            if not (math.isfinite(leaf) and leaf > 0):
                raise ValueError(
                    f"{name}(func, {option}={leaf!r}): {option} must be finite and positive. {fix}"
                )
        else:
            raise TypeError(
                f"{name}(func, {option}): {expected}, got a {type(leaf).__name__}. {fix}"
            )


def match_delta(
    name: str, delta: Delta, leaves: list[torch.Tensor], spec: TreeSpec, option: str = "delta"
) -> list[StepSpec]:
    """One step specification (None, float or tensor) per differentiated leaf.

    ``option`` names the option in error messages (``typical`` and ``bounds``
    are matched the same way)."""
    if delta is None or isinstance(delta, (int, float)):
        return [delta] * len(leaves)
    if isinstance(delta, torch.Tensor):
        if len(leaves) != 1:
            raise ValueError(
                f"{name}(func, {option}): a single {option} tensor is ambiguous for "
                f"{len(leaves)} differentiated tensors; pass a pytree of steps with the "
                "same structure as the differentiated arguments, or a float."
            )
        steps: list[StepSpec] = [delta]
    else:
        steps, delta_spec = tree_flatten(delta)
        # The primals are always flattened as a tuple of arguments; accept a bare
        # pytree for the common single-argument case too.
        if delta_spec != spec and tree_flatten((delta,))[1] != spec:
            raise ValueError(
                f"{name}(func, {option}): the structure of {option} does not match the "
                f"differentiated arguments.\n  {option}:     {delta_spec}\n  arguments: {spec}"
            )
    for step, leaf in zip(steps, leaves):
        if isinstance(step, torch.Tensor):
            try:
                fits = torch.broadcast_shapes(step.shape, leaf.shape) == leaf.shape
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(
                    f"{name}(func, {option}): a {option} tensor of shape {tuple(step.shape)} does "
                    f"not broadcast to its argument of shape {tuple(leaf.shape)}."
                )
    return steps


def exact_steps(
    leaf: torch.Tensor,
    step: StepSpec,
    stencil: Stencil,
    precision: float | torch.Tensor,
    name: str = "jacfd",
    typical: StepSpec = None,
) -> torch.Tensor:
    """Flat, detached, exactly representable steps for one differentiated leaf.

    ``precision`` is the relative accuracy of func's values (the dtype's eps for
    an ordinary function); the automatic step is ``precision**(1/(p+q))`` times
    ``max(|x|, typical)`` (``typical`` 1 unless given: a float or a tensor). A
    user's step that rounds to zero (``x + h == x``) is refused, naming ``name``.

    The steps are constants for autograd: ``grad`` through jacfd then equals the
    finite difference of the gradient taken with the same steps.
    """
    x = leaf.detach()
    x = x if x.dim() == 1 else x.reshape(-1)
    h: torch.Tensor | float
    if step is None:
        if typical is None or isinstance(typical, (int, float)):
            size = x.abs().clamp_min_(1.0 if typical is None else float(typical))
        else:  # per-element typical magnitudes
            size = torch.maximum(x.abs(), typical.detach().to(x).expand(leaf.shape).reshape(-1))
        relative = stencil.relative_step(precision)
        if isinstance(relative, float) and not stencil.imaginary:
            # x +- relative * size in one kernel, then made exact: the fewest kernels
            # for the step every call of the default options computes.
            if stencil.leading_direction > 0:
                return torch.add(x, size, alpha=relative).sub_(x)  # (x + h) - x
            return torch.sub(x, size, alpha=relative).sub_(x).neg_()  # x - (x - h)
        h = size.mul_(relative)
    elif isinstance(step, torch.Tensor):
        h = step.detach().to(x).expand(leaf.shape).reshape(-1)
    else:  # a float, added as a scalar: no tensor of steps to make
        h = float(step)
    if stencil.imaginary:  # x + ih is exact: the step is the imaginary part itself
        return h if isinstance(h, torch.Tensor) else torch.full_like(x, h)
    if stencil.leading_direction > 0 and step is None and isinstance(h, torch.Tensor):
        exact = h.add_(x).sub_(x)  # (x + h) - x, in the buffer of jacfd's own step
    elif stencil.leading_direction > 0:
        exact = torch.add(x, h).sub_(x)  # never in the user's step tensor
    else:
        exact = torch.sub(x, h).neg_().add_(x)  # x - (x - h), exactly
    if step is not None:  # the automatic step is never below max(1, |x|) * eps
        check_moves(name, leaf, exact, h)
    return exact


def check_moves(
    name: str, leaf: torch.Tensor, exact: torch.Tensor, h: torch.Tensor | float
) -> None:
    """Refuses a user's step that does not move some finite element of ``leaf``.

    Such a step is zero once rounded, and its difference quotient 0/0: the whole
    column would be NaN. Under ``torch.compile`` or ``vmap`` the values cannot be
    read; the check is then skipped (the column stays NaN).
    """
    if torch.compiler.is_compiling():
        return
    # (x + h) - x is NaN, not 0, where x is not finite: no mask needed for those.
    try:
        if bool(exact.all()):  # one kernel: every step is nonzero (NaN counts as moved)
            return
    except RuntimeError:  # under vmap: data-dependent control flow is not allowed
        return
    flat = int(torch.nonzero(exact == 0)[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), leaf.shape))
    value = float(leaf.detach().reshape(-1)[flat])
    raise ValueError(
        f"{name}(func, delta): the step {float(h if isinstance(h, float) else h[flat]):.3g} "
        f"does not move the element {index} = {value:.6g} of a differentiated {leaf.dtype} "
        f"tensor of shape {tuple(leaf.shape)}: x + h == x after rounding, so its "
        "derivative would be 0/0. "
        f"Use a larger delta (at least about |x| * {torch.finfo(leaf.dtype).eps:.1e}), "
        "or delta=None for the automatic step."
    )
