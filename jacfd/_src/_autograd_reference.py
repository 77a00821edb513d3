"""The function under ``check_grad``, bound to its arguments: autograd's Jacobian
of it (the side being checked) and jacfd's finite differences of it (the reference).

Also the ``torch.autograd.Function`` plumbing that lets a classic-style Function's
``forward`` run under ``torch.vmap`` for the finite differences.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils._pytree import (
    TreeSpec,
    keystr,
    tree_flatten,
    tree_flatten_with_path,
    tree_unflatten,
)

from ._evaluate import Strategy
from ._jacfd import jacfd_with_error
from ._stencil import Scheme
from ._steps import NOISE_EXPONENT

Mode = Literal["reverse", "forward"]


def _failed_under_vmap(error: BaseException) -> bool:
    """Whether jacfd's vmap strategy could not run func (then a plain loop can).

    The one place that recognises it; the engine refactor replaces it by a
    private exception type raised by the vmap strategy.
    """
    return isinstance(error, RuntimeError) and "vmap" in str(error)


class _CheckedCall:
    """``func`` bound to the arguments to check at, as a function of its
    differentiated leaves.

    Leaves are flattened in ``argnums`` order, then pytree order; outputs are
    named by key path (``out['loss']``) and Jacobian blocks come output-major.
    """

    def __init__(
        self,
        name: str,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
        positions: tuple[int, ...],
    ) -> None:
        self.name, self.func, self.args, self.kwargs = name, func, args, kwargs
        self.positions = positions
        self.in_names: list[str] = []
        self.leaves: list[torch.Tensor] = []
        self.specs: list[TreeSpec] = []
        self.out_names: list[str] = []
        for position in positions:
            with_path, spec = tree_flatten_with_path(args[position])
            self.specs.append(spec)
            for path, leaf in with_path:
                if not isinstance(leaf, torch.Tensor) or not leaf.is_floating_point():
                    raise TypeError(
                        f"{name}(func, *args): argument {position} must be a tensor or a pytree "
                        f"of real floating-point tensors; found {type(leaf).__name__} at "
                        f"args[{position}]{keystr(path)}."
                    )
                self.in_names.append(f"args[{position}]{keystr(path)}")
                self.leaves.append(leaf.detach())

    def call(self, f: Callable[..., Any], leaves: Sequence[torch.Tensor]) -> Any:
        """``f`` (``func`` or its ``forward``) with the differentiated leaves replaced."""
        full = list(self.args)
        start = 0
        for position, spec in zip(self.positions, self.specs):
            full[position] = tree_unflatten(list(leaves[start : start + spec.num_leaves]), spec)
            start += spec.num_leaves
        return f(*full, **self.kwargs)

    def check_blocks(self, ad_blocks: list[torch.Tensor], fd_blocks: list[torch.Tensor]) -> None:
        if len(fd_blocks) != len(ad_blocks):
            raise ValueError(
                f"{self.name}(func): autograd and finite differences disagree on the output "
                f"structure ({len(ad_blocks)} vs {len(fd_blocks)} Jacobian blocks): does "
                "forward return the same outputs as apply?"
            )

    def pair_indices(self) -> list[tuple[int, int]]:
        """(output leaf, input leaf) of each Jacobian block, output-major."""
        return [(o, i) for o in range(len(self.out_names)) for i in range(len(self.leaves))]

    def rows(self, blocks: list[torch.Tensor], in_dim: int | None = None) -> list[torch.Tensor]:
        """Per output leaf, ``sum_k block[..., k]`` over every input element ``k``
        (the last ``in_dim`` dims of a block; default: the input leaf's)."""
        sums = []
        for (_, i), block in zip(self.pair_indices(), blocks):
            dims = self.leaves[i].dim() if in_dim is None else in_dim
            out_shape = block.shape[: block.dim() - dims]
            sums.append(block.to(torch.float64).reshape(*out_shape, -1).sum(-1))
        n_in = len(self.leaves)
        return [torch.stack(sums[o : o + n_in]).sum(0) for o in range(0, len(sums), n_in)]

    def flat_outputs(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``func``'s output leaves, checked and named, for autograd."""
        with_path, _ = tree_flatten_with_path(self.call(self.func, leaves))
        if not self.out_names:
            self.out_names.extend(f"out{keystr(path)}" for path, _ in with_path)
        for path, out in with_path:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                raise TypeError(
                    f"check_grad(func): func must return a tensor or a pytree of floating-point "
                    f"tensors; found {type(out).__name__} at out{keystr(path)}."
                )
        return tuple(out for _, out in with_path)

    def autograd_jacobian(self, mode: Mode) -> list[torch.Tensor]:
        """Autograd's Jacobian blocks, each ``out.shape + in.shape``.

        ``torch.autograd.functional.jacobian``: vectorised with ``vmap`` over the
        backward (or forward-mode) pass, which works for classic
        autograd.Functions too since ``func`` itself runs outside vmap; one pass
        per element if the backward (or jvp) cannot be vmapped.
        """
        inputs = tuple(self.leaves)
        ad_mode = "forward-mode" if mode == "forward" else "reverse-mode"
        try:
            jac = _jacobian(self.flat_outputs, inputs, True, ad_mode)
        except RuntimeError:  # the vmapped pass failed: one pass per element
            if mode == "reverse":
                jac = _jacobian(self.flat_outputs, inputs, False, ad_mode)
            else:
                units = [torch.eye(x.numel(), dtype=x.dtype, device=x.device) for x in inputs]
                products = self.forward_products(
                    [e.reshape(-1, *x.shape) for e, x in zip(units, inputs)]
                )
                return [
                    p.reshape(p.shape[:-1] + self.leaves[i].shape)
                    for (_, i), p in zip(self.pair_indices(), products)
                ]
        return [block.detach() for row in jac for block in row]

    def forward_products(self, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """``J @ t`` by forward-mode AD, one dual-number pass per tangent ``t``.

        ``tangents[i]`` stacks the tangents of input leaf ``i`` along dim 0;
        each block is ``out.shape + (len(tangents[i]),)``.
        """
        columns: list[list[list[torch.Tensor]]] = []  # [input][tangent][output]
        for i, stacked in enumerate(tangents):
            per_tangent = []
            for tangent in stacked:
                with fwAD.dual_level():
                    duals = [
                        fwAD.make_dual(x, tangent) if k == i else x  # type: ignore[no-untyped-call]
                        for k, x in enumerate(self.leaves)
                    ]
                    per_tangent.append(
                        [
                            torch.zeros_like(out) if (t := _tangent(out)) is None else t.clone()
                            for out in self.flat_outputs(*duals)
                        ]
                    )
            columns.append(per_tangent)
        return [
            torch.stack([column[o] for column in columns[i]], dim=-1)
            for o, i in self.pair_indices()
        ]

    def finite_differences(
        self,
        primals: list[torch.Tensor],
        wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
        delta: float | None,
        scheme: Scheme,
        order: int | None,
        strategy: Strategy | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``jacfd_with_error`` of ``wrap(leaves -> func(...))`` at ``primals``, as
        flat blocks output-major; without a ``strategy``, vmap first and a plain
        loop if func cannot run under vmap."""

        def run(
            f: Callable[..., Any], chosen: Strategy
        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            g = wrap(lambda *leaves: self.call(f, leaves))
            if hasattr(self.func, NOISE_EXPONENT):  # func made by jacfd: its precision
                setattr(g, NOISE_EXPONENT, getattr(self.func, NOISE_EXPONENT))
            jac, err = jacfd_with_error(
                g, tuple(range(len(primals))), delta, scheme, order=order, strategy=chosen
            )(*primals)
            return tree_flatten(jac)[0], tree_flatten(err)[0]

        with torch.no_grad():
            if strategy is not None:
                return run(self.func, strategy)
            for candidate in (_forward_of(self.func), self.func):
                if candidate is None:
                    continue
                try:
                    return run(candidate, "vmap")
                except RuntimeError as error:
                    if not _failed_under_vmap(error):
                        raise
            return run(self.func, "loop")


class _Context:
    """A stand-in for ``ctx`` in a classic ``Function.forward(ctx, ...)`` run
    outside autograd: attributes can be set, the bookkeeping calls do nothing."""

    needs_input_grad: tuple[bool, ...] = ()
    materialize_grads = True

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def save_for_forward(self, *tensors: Any) -> None:
        pass

    def mark_dirty(self, *tensors: Any) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def _forward_of(func: Callable[..., Any]) -> Callable[..., Any] | None:
    """For ``func = SomeFunction.apply``: its ``forward``, callable under vmap.

    ``Function.apply`` refuses functorch transforms unless the class has
    ``setup_context`` and a vmap rule, which classic-style Functions lack. Only
    the values matter for finite differences, so ``forward`` is called directly,
    with a dummy ``ctx`` in the classic style.
    """
    owner = getattr(func, "__self__", None)
    if (
        getattr(func, "__name__", None) != "apply"
        or not isinstance(owner, type)
        or not issubclass(owner, torch.autograd.Function)
    ):
        return None
    forward = owner.forward
    if owner.setup_context is not torch.autograd.Function.setup_context:
        return forward
    return lambda *args, **kwargs: forward(_Context(), *args, **kwargs)


def _jacobian(
    flat: Callable[..., tuple[torch.Tensor, ...]],
    inputs: tuple[torch.Tensor, ...],
    vectorize: bool,
    ad_mode: str,
) -> tuple[tuple[torch.Tensor, ...], ...]:
    jac: tuple[tuple[torch.Tensor, ...], ...] = torch.autograd.functional.jacobian(  # type: ignore[no-untyped-call]
        flat, inputs, vectorize=vectorize, strategy=ad_mode
    )
    return jac


def _tangent(out: torch.Tensor) -> torch.Tensor | None:
    tangent: torch.Tensor | None = fwAD.unpack_dual(out).tangent  # type: ignore[no-untyped-call]
    return tangent
