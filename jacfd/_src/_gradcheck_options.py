"""``check_grad``'s own options and arguments, validated, and made ready for autograd."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from ._autograd_reference import _CheckedCall
from ._inputs import check_kwargs
from ._steps import Delta, match_delta


def _check_arguments(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any] | None,
    mode: object,
    safety: object,
    rtol: object,
    atol: object,
    exhaustive: object,
    raise_error: object,
) -> dict[str, Any]:
    """Validates check_grad's own options; returns ``kwargs`` as a dict."""
    name = "check_grad"
    if not isinstance(mode, str):
        raise TypeError(f"{name}(func, mode): mode must be 'reverse' or 'forward', got {mode!r}.")
    if mode not in ("reverse", "forward"):
        raise ValueError(f"{name}(func, mode={mode!r}): mode must be 'reverse' or 'forward'.")
    kwargs = check_kwargs(f"{name}(func, kwargs)", kwargs)
    for label, value in (("safety", safety), ("rtol", rtol), ("atol", atol)):
        if value is None and label == "atol":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{name}(func, {label}): expected a number >= 0, got {type(value).__name__}."
            )
        if not value >= 0:
            raise ValueError(f"{name}(func, {label}={value!r}): expected a number >= 0.")
    for label, flag in (("exhaustive", exhaustive), ("raise_error", raise_error)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}(func, {label}): expected a bool, got {flag!r}.")
    if not args:
        raise TypeError(f"{name}(func, *args): pass the arguments to check func at.")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # builtins and some callables have none
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            raise TypeError(
                f"{name}(func, *args, kwargs): func cannot be called with these arguments: "
                f"{error}. Pass func's positional arguments after func, and its keyword "
                "arguments as kwargs={...}."
            ) from None
    return dict(kwargs)


def _out_of_inference(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_inference():
        return value.clone()
    return value


def _steps(call: _CheckedCall, delta: Delta, args: tuple[Any, ...]) -> Any:
    """``delta`` as ``jacfd_with_error`` of the flat leaves takes it: None, a
    float, or one step (float or tensor) per differentiated leaf."""
    if delta is None:
        return None
    if isinstance(delta, (int, float)):
        return (float(delta),) * len(call.leaves)
    _, spec = tree_flatten(tuple(args[p] for p in call.positions))
    return tuple(match_delta("check_grad", delta, call.leaves, spec))
