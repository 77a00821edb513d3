"""``differentiable``: a function whose derivatives come from finite differences.

Eager calls go through :class:`_Apply`, an ``autograd.Function`` with
``setup_context``, ``backward``, ``jvp`` and ``vmap``, so that ``.backward()``
and every ``torch.func`` transform see it. Its backward and jvp call two more
Functions, :class:`_Vjp` and :class:`_Jvp`, whose own vmap rules make
``vmap(grad(f))`` and ``jacfwd`` work; their backward raises: there is no second
derivative. Under ``torch.compile`` (which cannot trace a Function with a
custom ``jvp``) the same function and its vjp are two opaque custom ops.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ._compiled import CompiledOps
from ._fd_rules import NAME, _Apply, _apply, _Call, _is_float
from ._inputs import P, wraps
from ._jacfd import jacfd

SIGNATURE_CACHE_SIZE = 32
"""Call signatures (pytree structure and non-tensor arguments) kept per function."""

_JACFD_OPTIONS = (
    "delta",
    "scheme",
    "order",
    "chunk_size",
    "randomness",
    "strategy",
    "workers",
    "process_group",
    "typical",
    "noise",
    "bounds",
)


_counter = itertools.count()


class Differentiable:
    """The function returned by :func:`differentiable`."""

    def __init__(
        self,
        func: Callable[..., Any],
        argnums: Any,
        options: dict[str, Any],
        batch_dim: int | None,
        sparsity: Any,
    ) -> None:
        self.func = func
        self.argnums = argnums
        self.options = options
        self.batch_dim = batch_dim
        self.sparsity = sparsity
        self._calls: OrderedDict[Any, _Call] = OrderedDict()
        self._lock = threading.Lock()
        self._compiled = CompiledOps(self, f"f{next(_counter)}")

    def signature(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[_Call, list[torch.Tensor], TreeSpec]:
        leaves, spec = tree_flatten((args, kwargs))
        tensor_at = tuple(i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor))
        constants = tuple(None if i in tensor_at else leaf for i, leaf in enumerate(leaves))
        xs = [leaves[i] for i in tensor_at]
        try:
            key: Any = (
                spec,
                constants,
                tuple((x.is_floating_point() or x.is_complex()) for x in xs),
            )
            hash(key)
        except TypeError:  # an unhashable non-tensor argument: not cached
            key = None
        with self._lock:
            call = self._calls.get(key) if key is not None else None
            if call is None:
                call = self._new_call(spec, list(constants), tensor_at, len(args), xs)
                if key is not None:
                    self._calls[key] = call
                    if len(self._calls) > SIGNATURE_CACHE_SIZE:
                        self._calls.popitem(last=False)
            elif key is not None:
                self._calls.move_to_end(key)
        return call, xs, spec

    def _new_call(
        self,
        spec: TreeSpec,
        template: list[Any],
        tensor_at: tuple[int, ...],
        num_args: int,
        xs: list[torch.Tensor],
    ) -> _Call:
        func = self.func
        positions = _positions(spec, num_args)
        selected = set(range(num_args)) if self.argnums is None else self.argnums
        if self.argnums is not None and any(not -num_args <= a < num_args for a in self.argnums):
            raise ValueError(
                f"{NAME} with argnums={self.argnums!r}: the call has only {num_args} "
                "positional arguments; pass the differentiated tensors positionally."
            )
        selected = {a % num_args for a in selected} if self.argnums is not None else selected
        wrt = tuple(
            k for k, i in enumerate(tensor_at) if positions[i] in selected and _is_float(xs[k])
        )
        if self.argnums is None:  # keyword tensors are differentiated too
            wrt = tuple(k for k, i in enumerate(tensor_at) if _is_float(xs[k]))
        flat = _Flat(func, template, tensor_at, spec)
        differentiated = [tensor_at[k] for k in wrt]
        options = dict(self.options)
        for option in ("delta", "typical"):
            if options.get(option) is not None:
                options[option] = _per_input(
                    option, options[option], spec, num_args, self.argnums, differentiated
                )
        if options.get("bounds") is not None:
            options["bounds"] = tuple(
                _per_input("bounds", side, spec, num_args, self.argnums, differentiated)
                for side in options["bounds"]
            )
        call = _Call(flat, wrt, options, self.batch_dim, self.sparsity)
        flat.call = call
        return call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self._compiled(args, kwargs)
        call, xs, _ = self.signature(args, kwargs)
        outs = _apply(_Apply, call, *xs)
        if call.out_spec is None:
            raise AssertionError("the output structure was not recorded")
        return tree_unflatten(list(outs), call.out_spec)


class _Flat:
    """func as a function of its tensor leaves, returning its flat outputs; a class,
    not a closure, so that worker processes can be sent it (without the call)."""

    def __init__(
        self,
        func: Callable[..., Any],
        template: list[Any],
        tensor_at: tuple[int, ...],
        spec: TreeSpec,
    ) -> None:
        self.func, self.template, self.tensor_at, self.spec = func, template, tensor_at, spec
        self.call: _Call | None = None
        """Told the output structure at each call (in this process only)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Flat, (self.func, self.template, self.tensor_at, self.spec))

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = list(self.template)
        for i, t in zip(self.tensor_at, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self.spec)
        outs, out_spec = tree_flatten(self.func(*args, **kwargs))
        for out in outs:
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"{NAME}: func must return a tensor or a pytree of tensors, got a "
                    f"{type(out).__name__} leaf; return it as a tensor, or outside func."
                )
        if self.call is not None:
            self.call.out_spec = out_spec
        return tuple(outs)


def _positions(spec: TreeSpec, num_args: int) -> list[int]:
    """The positional argument of every leaf of ``(args, kwargs)``, -1 for keywords."""
    args_spec, kwargs_spec = spec.children()
    positions = []
    for a, child in enumerate(args_spec.children()):
        positions += [a] * child.num_leaves
    return positions + [-1] * kwargs_spec.num_leaves


def _per_input(
    option: str,
    value: Any,
    spec: TreeSpec,
    num_args: int,
    argnums: tuple[int, ...] | None,
    differentiated: list[int],
) -> Any:
    """``typical`` or a side of ``bounds``, as jacfd of the flat function takes it:
    a float as it is, else a tuple of one value per differentiated tensor (their
    indices among the leaves of ``(args, kwargs)``: ``differentiated``), from a
    tensor (one differentiated tensor) or a pytree like the differentiated
    arguments (as jacfd's: ``args[argnums]``; with argnums None, ``args``, or
    ``(args, kwargs)`` where keyword tensors are differentiated). Leaves at
    arguments that are not differentiated tensors are ignored."""
    if isinstance(value, (int, float)):
        return value
    where = f"{NAME.split('(')[0]}(func, {option})"
    if isinstance(value, torch.Tensor):
        if len(differentiated) != 1:
            raise ValueError(
                f"{where}: a single {option} tensor is ambiguous for {len(differentiated)} "
                "differentiated tensors; pass a pytree like the differentiated arguments, "
                "or a float."
            )
        return (value,)
    # The arguments with each leaf replaced by its index, to read orders from.
    indexed_args, indexed_kwargs = tree_unflatten(list(range(spec.num_leaves)), spec)
    if argnums is None:
        candidates = [tree_flatten((indexed_args, indexed_kwargs))]
        positional, args_spec = tree_flatten(indexed_args)
        if set(differentiated) <= set(positional):
            candidates.insert(0, (positional, args_spec))
    else:
        candidates = [tree_flatten(tuple(indexed_args[a % num_args] for a in argnums))]
    leaves, value_spec = tree_flatten(value)
    for indices, arguments in candidates:
        if value_spec == arguments or tree_flatten((value,))[1] == arguments:
            by_index = dict(zip(indices, leaves))
            return tuple(by_index[i] for i in differentiated)
    raise ValueError(
        f"{where}: the structure of {option} does not match the differentiated "
        f"arguments.\n  {option}:     {value_spec}\n  arguments: {candidates[0][1]}"
    )


def _check_keywords(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(_JACFD_OPTIONS))
    if unknown:
        raise TypeError(
            f"{NAME}: unknown option(s) {unknown}; the options are argnums, sparsity, "
            f"batch_dim and jacfd's {', '.join(_JACFD_OPTIONS)}."
        )


def _validate(
    func: Callable[..., Any], argnums: Any, options: dict[str, Any], sparsity: Any, batch_dim: Any
) -> None:
    """Builds (and drops) a jacfd transform: its checks, with this function's name."""
    if argnums is not None:
        if isinstance(argnums, int) and not isinstance(argnums, bool):
            argnums = (argnums,)
        if not isinstance(argnums, tuple):
            raise TypeError(
                f"{NAME}: argnums must be None (every tensor argument), an int or a tuple "
                f"of ints, got {type(argnums).__name__}."
            )
    try:
        jacfd(func, argnums=argnums or 0, **options, sparsity=sparsity, batch_dim=batch_dim)
    except (TypeError, ValueError) as error:
        message = str(error).replace("jacfd(func", "differentiable(func", 1)
        raise type(error)(message) from None


def differentiable(
    func: Callable[P, Any],
    *,
    argnums: int | tuple[int, ...] | None = None,
    sparsity: Any = None,
    batch_dim: int | None = None,
    **options: Any,
) -> Callable[P, Any]:
    """``func`` with derivatives from finite differences: train through black boxes.

    The result returns ``func``'s values (computed without autograd: func may use
    numpy, scipy, ``.item()`` or an external program) and is differentiable in
    both modes:

    - reverse mode (``.backward()``, ``torch.autograd.grad``, ``torch.func.grad``,
      ``vjp``, ``jacrev``): the backward computes ``v^T J`` from :func:`jacfd`'s
      Jacobian at the inputs saved by the forward call; with ``batch_dim`` one
      Jacobian per sample at the cost of one sample, with ``sparsity`` one
      evaluation per colour;
    - forward mode (``torch.func.jvp``, ``jacfwd``): :func:`jvpfd`, a difference
      along the tangent (two evaluations for ``"central"`` plus the value);
    - ``torch.func.vmap``: with ``strategy="vmap"`` the samples become one
      ``vmap(func)`` call whose backward takes per-sample Jacobians; other
      strategies, and ``sparsity``, run a loop over the samples;
    - ``torch.compile(..., fullgraph=True)``: func and its backward are two opaque
      custom ops (func is run once on zeros of the input shapes, while tracing,
      for the output shapes). Under compile, inputs and outputs must be tensors,
      or tuples, lists and dicts of tensors and hashable constants, and forward
      mode is not available.

    There is no second derivative: differentiating the backward (double backward,
    ``grad(grad(...))``, ``hessian``) raises a ``RuntimeError``. Use
    :func:`hessfd` for the Hessian of a black box.

    Args:
        func: A function of tensors, pytrees of tensors and other values, returning
            a tensor or a pytree of tensors. Its arguments are detached, and it
            must not modify them.
        argnums: The positional arguments whose floating-point tensors get
            gradients: ``None`` (default) for every tensor argument, keyword
            arguments included; an int or a tuple of ints otherwise (the others
            get ``None`` gradients).
        sparsity: As in :func:`jacfd`: the Jacobian's pattern over all the
            differentiated tensors' elements (flattened in order) and all outputs'.
        batch_dim: As in :func:`jacfd`: func's samples along this dimension of
            every differentiated input and every output do not interact.
        **options: :func:`jacfd`'s ``delta``, ``typical``, ``bounds`` (floats for
            every differentiated element, or tensors and pytrees like the
            differentiated arguments, as in :func:`jacfd`; with ``argnums=None``
            like ``args``, or ``(args, kwargs)`` when keyword tensors are
            differentiated), ``noise``, ``scheme``, ``order``,
            ``chunk_size`` (bounds the points evaluated at once in a backward; a
            dense backward never holds more than a chunk's columns), ``randomness``
            and ``strategy``,
            with the same meaning
            (``strategy="loop"`` for functions that vmap cannot trace, such as
            numpy code). Forward mode uses the same scheme, order and a float
            ``delta``.

    Returns:
        A function with ``func``'s signature and values.

    Examples:
        >>> import numpy as np
        >>> import torch
        >>> from jacfd import differentiable
        >>> def simulate(x):  # numpy: autograd cannot see inside
        ...     return torch.from_numpy(np.sin(x.numpy()) * x.numpy().sum())
        >>> f = differentiable(simulate, strategy="loop")
        >>> x = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> f(x).pow(2).sum().backward()
        >>> expected = torch.func.grad(lambda x: (x.sin() * x.sum()).pow(2).sum())(x.detach())
        >>> torch.allclose(x.grad, expected, rtol=1e-7)
        True
    """
    _check_keywords(options)
    _validate(func, argnums, options, sparsity, batch_dim)
    normalized = (argnums,) if isinstance(argnums, int) else argnums
    instance = Differentiable(func, normalized, options, batch_dim, sparsity)

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return instance(*args, **kwargs)

    return wrapper
