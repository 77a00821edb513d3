"""The ``jacfd`` transform: finite-difference Jacobians in ``torch.func`` layout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch.utils._pytree import tree_flatten, tree_map

from ._evaluate import RANDOMNESS, RandomState, Randomness, evaluate
from ._inputs import (
    Argnums,
    check_argnums,
    check_callable,
    flatten_primals,
    normalize_argnums,
    replace_primals,
    split_output,
    wraps,
)
from ._layout import contract, to_torch_func_layout
from ._perturb import count_calls, perturb, plan_chunks
from ._steps import NOISE_EXPONENT, Delta, check_delta, exact_steps, match_delta
from ._stencil import SCHEMES, Scheme, get_stencil


def jacfd(
    func: Callable[..., Any],
    argnums: Argnums = 0,
    delta: Delta = None,
    scheme: Scheme = "central",
    *,
    has_aux: bool = False,
    chunk_size: int | None = None,
    randomness: Randomness = "error",
) -> Callable[..., Any]:
    """Jacobian of ``func`` by finite differences, laid out like ``torch.func.jacrev``.

    Every coordinate of the differentiated arguments is perturbed by a small step
    and ``func`` is evaluated at all the resulting stencil points in one
    ``torch.vmap`` call (or in chunks, or in a plain loop). The differences,
    weighted by the stencil and divided by the steps, are the Jacobian's columns.

    Args:
        func: A function of one or more arguments, returning a tensor or a pytree
            of tensors (and an auxiliary pytree if ``has_aux``). It need not be
            differentiable by autograd.
        argnums: Which positional argument(s) to differentiate: an int or a tuple
            of ints; negative values count from the end. Each may be a tensor or
            a pytree of tensors with a real floating dtype.
        delta: The step. ``None`` (default) picks, per element and dtype,
            ``eps**(1/2) * max(1, |x|)`` for one-sided schemes and
            ``eps**(1/3) * max(1, |x|)`` for ``"central"``. A positive float is an
            absolute step for every element. A tensor (broadcastable to the one
            differentiated tensor) or a pytree of tensors and floats matching the
            differentiated arguments gives per-element steps. Steps are always
            rounded so that ``x + h`` is exactly representable.
        scheme: ``"central"`` (default, error O(h**2)), ``"forward"`` or
            ``"backward"`` (error O(h), one evaluation per coordinate plus one).
        has_aux: ``func`` returns ``(output, aux)``; the result is then
            ``(jacobian, aux)`` with ``aux`` taken at the unperturbed inputs.
        chunk_size: ``None`` evaluates every stencil point in one vmap call. A
            positive int bounds the points per call, and so the memory. ``1``
            evaluates the points one by one without vmap, so ``func`` may call
            ``.item()``, numpy, or branch on tensor values.
        randomness: As in ``torch.func.vmap``: ``"error"`` (default) forbids
            random operations in ``func``; ``"same"`` gives every stencil point
            the same random numbers (common random numbers), the setting that
            makes finite differences of, e.g., dropout meaningful; ``"different"``
            is accepted for parity with vmap, but the differences of independent
            draws are noise of order ``1/h``.

    Returns:
        A function taking the same arguments as ``func`` and returning its
        Jacobian: each leaf has shape ``out_leaf.shape + in_leaf.shape`` and the
        dtype of ``out_leaf``; the nesting is the output pytree, then the argnums
        tuple (if argnums is a tuple), then the input pytree.

    Examples:
        >>> import torch
        >>> from jacfd import jacfd
        >>> x = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
        >>> J = jacfd(torch.sin)(x)
        >>> torch.allclose(J, torch.diag(torch.cos(x)))
        True
        >>> jacfd(lambda x, y: x * y, argnums=(0, 1))(x, x)[1].shape
        torch.Size([3, 3])
    """
    check_callable(func)
    check_argnums(argnums)
    if scheme not in SCHEMES:
        raise ValueError(
            f"jacfd(func, scheme={scheme!r}): unknown scheme; choose one of {SCHEMES}."
        )
    stencil = get_stencil(scheme)
    offsets = stencil.shifted_offsets
    delta = check_delta(delta)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(
                f"jacfd(func, chunk_size): chunk_size must be None or a positive int, "
                f"got {type(chunk_size).__name__}."
            )
        if chunk_size <= 0:
            raise ValueError(
                f"jacfd(func, chunk_size={chunk_size}): chunk_size must be positive; use "
                "chunk_size=None for one vmap call, or chunk_size=1 for a plain loop "
                "without vmap."
            )
    if randomness not in RANDOMNESS:
        raise ValueError(
            f"jacfd(func, randomness={randomness!r}): unknown randomness; choose one of "
            f"{RANDOMNESS} (as in torch.func.vmap)."
        )
    if not isinstance(has_aux, bool):
        raise TypeError(f"jacfd(func, has_aux): has_aux must be a bool, got {has_aux!r}.")

    # A function made by jacfd is itself accurate only to ~eps**noise_exponent
    # (2/3 for central differences), so a jacfd around it must step further.
    noise_exponent = getattr(func, NOISE_EXPONENT, 1.0)

    @wraps(func)
    def jacobian(*args: Any, **kwargs: Any) -> Any:
        argnums_ = normalize_argnums(argnums, len(args))
        primals, primals_spec = flatten_primals(args, argnums_)
        step_specs = match_delta(delta, primals, primals_spec)

        def at_point(*leaves: torch.Tensor) -> tuple[Any, ...]:
            result = func(*replace_primals(args, argnums_, leaves, primals_spec), **kwargs)
            out, aux = split_output(result, has_aux)
            return (out, aux) if has_aux else (out,)

        num_offsets = len(offsets)
        num_coordinates = sum(leaf.numel() for leaf in primals)
        need_center = bool(stencil.center_weight) or has_aux
        chunks = plan_chunks(num_coordinates, num_offsets, need_center, chunk_size)
        rng = None
        if randomness == "same" and count_calls(chunks, num_offsets, chunk_size) > 1:
            rng = RandomState([leaf.device for leaf in primals])
        elif randomness == "error" and chunk_size == 1 and not torch.compiler.is_compiling():
            rng = RandomState([leaf.device for leaf in primals])

        def differences(output_eps: float) -> tuple[list[torch.Tensor], Any, Any] | float:
            """The Jacobian columns, output spec and aux; or, if the outputs turn
            out coarser than an input whose step was automatic, their eps."""
            steps = [
                exact_steps(leaf, spec, stencil, precision(leaf, output_eps))
                for leaf, spec in zip(primals, step_specs)
            ]
            flat_steps = torch.cat(steps) if len(steps) > 1 else steps[0]
            blocks: list[list[torch.Tensor]] = []
            center: list[torch.Tensor] = []
            aux: Any = None
            for chunk in chunks:
                leaves, in_dims = perturb(primals, steps, offsets, chunk)
                rows = chunk.rows(num_offsets)
                outputs = evaluate(at_point, leaves, in_dims, rows, chunk_size, randomness, rng)
                flat_out, out_spec = tree_flatten(outputs[0])
                if not blocks:
                    coarsest = max(torch.finfo(value.dtype).eps for value in flat_out)
                    if coarsest > output_eps and any(
                        spec is None and torch.finfo(leaf.dtype).eps < coarsest
                        for leaf, spec in zip(primals, step_specs)
                    ):
                        return coarsest
                if chunk.with_center:
                    center = [value[0] for value in flat_out]
                    flat_out = [value[1:] for value in flat_out]
                    if has_aux:
                        aux = tree_map(lambda value: value[0], outputs[1])
                chunk_steps = flat_steps[chunk.start : chunk.stop]
                blocks.append(
                    [
                        contract(values, center[k] if center else None, stencil, chunk_steps)
                        for k, values in enumerate(flat_out)
                    ]
                )
            columns = [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*blocks)]
            return columns, out_spec, aux

        def precision(leaf: torch.Tensor, output_eps: float) -> float:
            """Relative accuracy of func's values near ``leaf``: the coarser of the
            input's and the output's eps, worsened by any jacfd inside func."""
            return max(torch.finfo(leaf.dtype).eps, output_eps) ** noise_exponent

        result = differences(0.0)
        if isinstance(result, float):  # func computes coarser than its inputs
            result = differences(result)
        # With the coarsest output eps as the floor, no second restart can occur.
        columns, out_spec, aux = cast("tuple[list[torch.Tensor], Any, Any]", result)
        jac = to_torch_func_layout(
            columns, out_spec, primals, primals_spec, isinstance(argnums, int)
        )
        return (jac, aux) if has_aux else jac

    setattr(jacobian, NOISE_EXPONENT, noise_exponent * stencil.accuracy_exponent)
    return jacobian
