"""The function under ``check_grad``, bound to its arguments: autograd's Jacobian
of it (the side being checked) and jacfd's finite differences of it (the reference).

Also the ``torch.autograd.Function`` plumbing that lets a classic-style Function's
``forward`` run under ``torch.vmap`` for the finite differences.
"""

from __future__ import annotations

import math
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

from ._stencil import Scheme
from ._steps import mark_noise, noise_of
from ._strategy import StrategyOption as Strategy
from ._with_error import jacfd_with_error

Mode = Literal["reverse", "forward"]


class _AutogradUnavailableError(Exception):
    """Autograd could not differentiate func (its error is the ``__cause__``);
    ``check_grad`` turns it into an error that says why it needs autograd."""


class _FuncFailedError(Exception):
    """func raised at a point where jacfd evaluated it (its error is ``error``).

    Not a ``RuntimeError``, so that no strategy fallback mistakes it for its own.
    """

    def __init__(self, where: str, error: BaseException) -> None:
        super().__init__(where)
        self.where, self.error = where, error


def _output_leaves(out: Any) -> list[tuple[Any, Any]]:
    """func's output leaves with their key paths, refusing an output with none."""
    if out is None:
        raise TypeError(
            "check_grad(func): func returned no tensors, but None: did func forget a return "
            "statement? check_grad needs a tensor or a pytree of floating-point tensors."
        )
    with_path, _ = tree_flatten_with_path(out)
    if not with_path:
        raise ValueError(
            f"check_grad(func): func returned no tensors ({out!r}); check_grad needs a tensor "
            "or a pytree of floating-point tensors with at least one leaf."
        )
    for path, leaf in with_path:
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"check_grad(func): func must return a tensor or a pytree of floating-point "
                f"tensors; found {type(leaf).__name__} at out{keystr(path)}."
            )
    return with_path


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
        self.workers: Any = None
        self.process_group: Any = None
        """Where the finite differences are evaluated (jacfd's options); neither is
        sent to a worker with the rest of this call."""
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
                # A copy: a func writing into its input must not change the caller's.
                self.leaves.append(leaf.detach().clone())

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["workers"] = state["process_group"] = None
        return state

    def call(self, f: Callable[..., Any], leaves: Sequence[torch.Tensor]) -> Any:
        """``f`` (``func`` or its ``forward``) with the differentiated leaves replaced."""
        full = list(self.args)
        start = 0
        for position, spec in zip(self.positions, self.specs):
            full[position] = tree_unflatten(list(leaves[start : start + spec.num_leaves]), spec)
            start += spec.num_leaves
        return f(*full, **self.kwargs)

    def check_blocks(self, n_autograd: int, n_finite_differences: int) -> None:
        if n_autograd != n_finite_differences:
            raise ValueError(
                f"{self.name}(func): autograd and finite differences disagree on the output "
                f"structure ({n_autograd} vs {n_finite_differences} Jacobian blocks): does "
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
            size = math.prod(block.shape[block.dim() - dims :])  # not -1: blocks may be empty
            sums.append(block.to(torch.float64).reshape(*out_shape, size).sum(-1))
        n_in = len(self.leaves)
        return [torch.stack(sums[o : o + n_in]).sum(0) for o in range(0, len(sums), n_in)]

    def flat_outputs(self, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``func``'s output leaves, checked and named, for autograd."""
        with_path = _output_leaves(self.call(self.func, leaves))
        if not self.out_names:
            self.out_names.extend(f"out{keystr(path)}" for path, _ in with_path)
        for path, out in with_path:
            if not out.is_floating_point():
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
        per element if the vectorised pass fails.

        Raises:
            _AutogradUnavailableError: If autograd cannot differentiate func at all.
        """
        inputs = tuple(self.leaves)
        ad_mode = "forward-mode" if mode == "forward" else "reverse-mode"
        try:
            jac = _jacobian(self.flat_outputs, inputs, True, ad_mode)
        except (RuntimeError, IndexError):  # IndexError: torch's reverse mode on 0 elements
            try:
                if mode == "forward":  # one pass per element of all the inputs together
                    sizes = [x.numel() for x in inputs]
                    units = torch.split(torch.eye(sum(sizes), dtype=torch.float64), sizes, dim=1)
                    products = self.forward_products(
                        [e.to(x).reshape(-1, *x.shape) for e, x in zip(units, inputs)]
                    )
                    return [
                        part.reshape(part.shape[:-1] + x.shape)
                        for p in products
                        for part, x in zip(torch.split(p, sizes, dim=-1), inputs)
                    ]
                jac = _jacobian(self.flat_outputs, inputs, False, ad_mode)
            except RuntimeError as error:
                empty = self._empty_jacobian()
                if empty is not None:
                    return empty
                raise _AutogradUnavailableError(
                    f"compute the Jacobian ({mode} mode) of"
                ) from error
        return [block.detach() for row in jac for block in row]

    def _empty_jacobian(self) -> list[torch.Tensor] | None:
        """The blocks of a Jacobian with no entries (torch's reverse mode fails on
        it), or None if it has some."""
        with torch.no_grad():
            outputs = self.flat_outputs(*self.leaves)
        if sum(o.numel() for o in outputs) and sum(x.numel() for x in self.leaves):
            return None
        return [outputs[o].new_zeros(outputs[o].shape + x.shape) for o, x in self._pairs()]

    def _pairs(self) -> list[tuple[int, torch.Tensor]]:
        return [(o, self.leaves[i]) for o, i in self.pair_indices()]

    def forward_products(self, tangents: list[torch.Tensor]) -> list[torch.Tensor]:
        """``J @ t`` by forward-mode AD, one dual-number pass per tangent.

        ``tangents[i]`` stacks tangents of input leaf ``i`` along dim 0, the
        same number for every leaf; pass ``k`` makes every input leaf dual at
        once, with tangent ``tangents[i][k]``, as ``torch.func.jvp`` does. Each
        block is ``out.shape + (len(tangents[0]),)``, one per output leaf.
        """
        per_tangent: list[list[torch.Tensor]] = []  # [tangent][output]
        for k in range(len(tangents[0])):
            with fwAD.dual_level():
                duals = [
                    fwAD.make_dual(x.clone(), t[k])  # type: ignore[no-untyped-call]
                    for x, t in zip(self.leaves, tangents)
                ]
                try:
                    outputs = self.flat_outputs(*duals)
                except RuntimeError as error:
                    raise _AutogradUnavailableError(
                        "make a forward-mode (jvp) pass through"
                    ) from error
                per_tangent.append(
                    [
                        torch.zeros_like(o) if (t := _tangent(o)) is None else t.clone()
                        for o in outputs
                    ]
                )
        return [
            torch.stack([column[o] for column in per_tangent], dim=-1)
            for o in range(len(self.out_names))
        ]

    def finite_differences(
        self,
        primals: list[torch.Tensor],
        wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
        delta: Any,
        scheme: Scheme,
        order: int | None,
        strategy: Strategy | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``jacfd_with_error`` of ``wrap(leaves -> func(...))`` at ``primals``, as
        flat blocks output-major; without a ``strategy``, vmap first and a plain
        loop if func cannot run under vmap.

        If func fails there, it is run once more with autograd on (inputs that
        require grad, as autograd runs it: a func registering tensor hooks needs
        that) before giving up.

        Raises:
            _FuncFailedError: If func raised at one of the points.
        """

        def run(
            f: Callable[..., Any], chosen: Strategy, with_grad: bool = False
        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            at = _At(self, f, chosen == "vmap")
            g = wrap(at)
            mark_noise(g, noise_of(self.func))  # func made by jacfd: its precision
            points = [x.detach().requires_grad_(with_grad) for x in primals]
            with torch.set_grad_enabled(with_grad):
                jac, err = jacfd_with_error(
                    g,
                    tuple(range(len(primals))),
                    delta,
                    scheme,
                    order=order,
                    strategy=chosen,
                    workers=self.workers,
                    process_group=self.process_group,
                )(*points)
            blocks: list[torch.Tensor] = [j.detach() for j in tree_flatten(jac)[0]]
            # An infinite estimate (the step reaches beyond func's Taylor region) must
            # not pass as an infinite tolerance: NaN fails every comparison.
            errors: list[torch.Tensor] = [
                torch.where(e == math.inf, math.nan, e) for e in tree_flatten(err)[0]
            ]
            return blocks, errors

        def run_or_with_grad(
            f: Callable[..., Any], chosen: Strategy
        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            try:
                return run(f, chosen)
            except _FuncFailedError as failure:
                try:
                    return run(f, chosen, with_grad=True)
                except _FuncFailedError:
                    raise failure from failure.error

        if strategy is not None:
            return run_or_with_grad(self.func, strategy)
        for candidate in (_forward_of(self.func), self.func):
            if candidate is None:
                continue
            try:
                return run(candidate, "vmap")
            except (RuntimeError, _FuncFailedError):
                pass  # vmap could not run func: a plain loop may, and names the point if not
        return run_or_with_grad(self.func, "loop")

    def _where(self, leaves: Sequence[torch.Tensor]) -> str:
        """Which differentiated elements differ from ``args`` at a point, and by how much."""
        moved = []
        for name, x, y in zip(self.in_names, self.leaves, leaves):
            if y.shape != x.shape:
                return "in a batch of points"
            change = (y.detach() - x).reshape(-1)
            changed = torch.nonzero(change).reshape(-1)
            if len(changed):
                k = int(changed[0])
                index = tuple(torch.unravel_index(torch.tensor(k), x.shape)) if x.dim() else ()
                more = f" (and {len(changed) - 1} more elements)" if len(changed) > 1 else ""
                at = f"[{', '.join(str(int(i)) for i in index)}]" if index else ""
                moved.append(f"{name}{at} moved by {change[k].item():.3g}{more}")
        return "; ".join(moved) or "at args itself"


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


class _At:
    """``f`` at the differentiated leaves, its failures named by the point; a class,
    not a closure, so that worker processes can be sent it."""

    def __init__(self, call: _CheckedCall, f: Callable[..., Any], inside_vmap: bool) -> None:
        self.checked, self.f, self.inside_vmap = call, f, inside_vmap

    def __call__(self, *leaves: torch.Tensor) -> Any:
        try:
            out = self.checked.call(self.f, leaves)
        except Exception as error:
            if self.inside_vmap and isinstance(error, RuntimeError):
                raise  # the strategy decides (a plain loop may work)
            where = "under torch.vmap" if self.inside_vmap else self.checked._where(leaves)
            raise _FuncFailedError(where, error) from error
        _output_leaves(out)
        return out


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
