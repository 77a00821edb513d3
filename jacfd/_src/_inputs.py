"""Inputs and outputs: argnums, pytree flattening, and the checks on both.

Mirrors ``torch.func``'s conventions (argnums an int or a tuple of ints,
negative argnums wrap, pytrees of tensors everywhere) but raises ``TypeError``
or ``ValueError`` with a message that says how to fix the call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ParamSpec, TypeAlias, TypeVar, cast

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

Argnums: TypeAlias = "int | tuple[int, ...]"


def check_callable(name: str, func: object) -> None:
    if not callable(func):
        raise TypeError(
            f"{name}(func): func must be callable, got {type(func).__name__}. "
            f"Pass the function itself, e.g. {name}(model) or {name}(torch.sin)."
        )


def check_argnums(name: str, argnums: object) -> None:
    """Checks the type, emptiness and uniqueness of argnums as written."""
    if isinstance(argnums, bool) or not isinstance(argnums, (int, tuple)):
        raise TypeError(
            f"{name}(func, argnums): argnums must be int or Tuple[int, ...], "
            f"got {type(argnums).__name__}. Write argnums=(0, 1), not [0, 1]."
        )
    if isinstance(argnums, tuple):
        if not argnums:
            raise ValueError(
                f"{name}(func, argnums): argnums must be non-empty; "
                "pass the index of at least one positional argument, e.g. argnums=0."
            )
        if any(isinstance(a, bool) or not isinstance(a, int) for a in argnums):
            raise TypeError(
                f"{name}(func, argnums): argnums must be int or Tuple[int, ...], got {argnums!r}."
            )
        if len(set(argnums)) != len(argnums):
            raise ValueError(
                f"{name}(func, argnums): argnums elements must be unique, got {argnums!r}. "
                "List each positional argument once."
            )


def normalize_argnums(name: str, argnums: Argnums, num_args: int) -> tuple[int, ...]:
    """Wraps negative argnums against the actual call; always returns a tuple."""
    requested = argnums if isinstance(argnums, tuple) else (argnums,)
    wrapped = []
    for argnum in requested:
        if not -num_args <= argnum < num_args:
            raise ValueError(
                f"{name}(func, argnums={argnums!r}): got argnum={argnum}, but only "
                f"{num_args} positional inputs. Pass the differentiated tensors "
                "positionally, or change argnums."
            )
        wrapped.append(argnum % num_args)
    if len(set(wrapped)) != len(wrapped):
        raise ValueError(
            f"{name}(func, argnums={argnums!r}): argnums refer to the same argument "
            f"more than once for a call with {num_args} positional inputs."
        )
    return tuple(wrapped)


def check_kwargs(where: str, kwargs: object) -> dict[str, Any]:
    """``kwargs=`` of the checkers (``check_grad``, ``check_sparsity``): None or a
    mapping of argument names to values; returned as a new dict."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise TypeError(
            f"{where}: expected None or a mapping of names (str) to values, got {kwargs!r}. "
            "Pass kwargs={'name': value}."
        )
    return dict(kwargs)


def check_primals(name: str, leaves: list[Any], argnums: tuple[int, ...]) -> None:
    """The differentiated arguments' leaves must be real floating-point tensors."""
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{name}: the differentiated arguments (argnums={argnums}) must be tensors "
                f"or pytrees of tensors, got a {type(leaf).__name__}. Convert it with "
                "torch.as_tensor(..., dtype=torch.float64), or leave it out of argnums."
            )
        if not leaf.dtype.is_floating_point:
            kind = "complex" if leaf.dtype.is_complex else "integer or bool"
            fix = (
                "pass its real and imaginary parts as separate real tensors"
                if leaf.dtype.is_complex
                else "convert it with .double() or .float(), or leave it out of argnums"
            )
            raise TypeError(
                f"{name}: differentiated arguments must have a real floating dtype, got a "
                f"{kind} tensor of dtype {leaf.dtype}; {fix}."
            )


def replace_primals(
    args: tuple[Any, ...],
    argnums: tuple[int, ...],
    leaves: list[torch.Tensor] | tuple[torch.Tensor, ...],
    spec: TreeSpec,
) -> tuple[Any, ...]:
    """``args`` with the differentiated arguments rebuilt from ``leaves``."""
    new_args = list(args)
    primals = leaves if bare_tensors(args, argnums) else tree_unflatten(list(leaves), spec)
    for argnum, primal in zip(argnums, primals):
        new_args[argnum] = primal
    return tuple(new_args)


def bare_tensors(args: tuple[Any, ...], argnums: tuple[int, ...]) -> bool:
    """Whether every differentiated argument is a tensor (not a pytree of them)."""
    return all(isinstance(args[i], torch.Tensor) for i in argnums)


def split_output(name: str, result: Any, has_aux: bool) -> tuple[Any, Any]:
    """Separates ``(out, aux)`` and checks that both are pytrees of tensors."""
    aux = None
    if has_aux:
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(
                f"{name}(func, has_aux=True): func must return a tuple (output, aux), got "
                f"{_describe(result)}. Return (output, aux), or set has_aux=False."
            )
        result, aux = result
        for leaf in tree_flatten(aux)[0]:
            if not isinstance(leaf, torch.Tensor):
                raise TypeError(
                    f"{name}(func, has_aux=True): aux must be a tensor or a pytree of tensors, "
                    f"got a {type(leaf).__name__} inside it. Wrap numbers with torch.tensor."
                )
    check_output(name, result)
    return result, aux


def check_output(name: str, out: Any) -> None:
    if type(out) is torch.Tensor and out.dtype.is_floating_point:
        return  # the common case, checked without a pytree walk
    leaves = [out] if isinstance(out, torch.Tensor) else tree_flatten(out)[0]
    if out is None or not leaves:
        raise TypeError(
            f"{name}: func must return a tensor or a non-empty pytree of tensors, got "
            f"{_describe(out)}. Did func forget a return statement?"
        )
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{name}: func must return a tensor or a pytree of tensors, got a "
                f"{type(leaf).__name__} in its output. Return torch tensors (wrap numbers "
                "with torch.as_tensor), or move non-tensor results to aux with has_aux=True."
            )
        if not (leaf.dtype.is_floating_point or leaf.dtype.is_complex):
            raise TypeError(
                f"{name}: func returned a tensor of dtype {leaf.dtype}; its Jacobian "
                "needs floating outputs. Return a floating tensor (e.g. .double()), or "
                "move it to aux with has_aux=True."
            )


def _describe(value: object) -> str:
    if isinstance(value, tuple):
        return f"a tuple of length {len(value)}"
    return "None" if value is None else f"a {type(value).__name__}"


P = ParamSpec("P")
R = TypeVar("R")


def wraps(func: Callable[P, Any]) -> Callable[[Callable[..., R]], Callable[P, R]]:
    """``functools.wraps`` minus the attributes that make Dynamo skip the wrapper.

    Typed so that a transform's result takes ``func``'s parameters, as a type
    checker sees them.

    When ``func`` is itself a compiled function, copying its ``_torchdynamo_*``
    attributes would make ``torch.compile`` treat our wrapper as already compiled.
    """
    import functools

    def decorate(wrapper: Callable[..., R]) -> Callable[P, R]:
        wrapper = functools.wraps(func)(wrapper)
        for attr in list(wrapper.__dict__):
            if attr.startswith("_torchdynamo") or attr in _DYNAMO_ATTRS:
                del wrapper.__dict__[attr]
        return cast(Callable[P, R], wrapper)

    return decorate


_DYNAMO_ATTRS = ("_isolate_recompiles_id", "get_compiler_config", "aot_compile")
