"""``differentiable`` under ``torch.compile``: two opaque custom ops per function.

Dynamo cannot trace an ``autograd.Function`` with a custom ``jvp``, nor a black
box that leaves torch (numpy, scipy, a subprocess). Under compile a
differentiable function is therefore the custom op ``f(key, tensors)``, with a
fake implementation for shapes and ``register_autograd`` whose backward is a
second custom op, the finite-difference vjp. Custom ops take only tensors and
plain values, so the call's structure (containers and non-tensor arguments) is
interned in a table and the op receives its index. Dynamo traces that table
lookup, which it can for tuples, lists and dicts of tensors and hashable
constants: other pytrees are supported in eager mode only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ._differentiable import Differentiable


class _Tensor:
    """Marks where a tensor sits in an interned structure."""


def split(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """A hashable skeleton of ``obj``; its tensors are appended to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Tensor
    if type(obj) is tuple or type(obj) is list:
        return (type(obj), tuple(split(item, tensors) for item in obj))
    if type(obj) is dict:
        return (dict, tuple(obj.keys()), tuple(split(item, tensors) for item in obj.values()))
    return obj


def rebuild(skeleton: Any, tensors: Iterator[torch.Tensor]) -> Any:
    """The inverse of :func:`split`."""
    if skeleton is _Tensor:
        return next(tensors)
    if type(skeleton) is tuple and skeleton and skeleton[0] in (tuple, list):
        return skeleton[0](rebuild(item, tensors) for item in skeleton[1])
    if type(skeleton) is tuple and skeleton and skeleton[0] is dict:
        return {k: rebuild(v, tensors) for k, v in zip(skeleton[1], skeleton[2])}
    return skeleton


class CompiledOps:
    """The custom ops of one differentiable function, and its interned call structures."""

    def __init__(self, owner: Differentiable, name: str) -> None:
        self.owner = owner
        self.keys: dict[Any, int] = {}
        self.skeletons: list[Any] = []
        self.out_skeletons: dict[int, Any] = {}
        self._forward, self._vjp = self._register(f"jacfd_differentiable::{name}")
        intern = self._intern

        def constant_intern(skeleton: Any) -> int:
            return intern(skeleton)

        marked = torch.compiler.assume_constant_result(constant_intern)  # type: ignore[no-untyped-call]
        self._intern = marked  # type: ignore[method-assign]

    def __call__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensors: list[torch.Tensor] = []
        key = self._intern(split((args, kwargs), tensors))
        outs = self._forward(key, tensors)
        return rebuild(self.out_skeletons[key], iter(outs))

    def _intern(self, skeleton: Any) -> int:
        """The index of ``skeleton`` in the table. Dynamo calls it while tracing (the
        table must be filled before the fake implementation reads it), and the
        index is a constant of the graph."""
        key = self.keys.get(skeleton)
        if key is None:
            key = len(self.skeletons)
            self.skeletons.append(skeleton)
            self.keys[skeleton] = key
        return key

    def _call(self, key: int, xs: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor]]:
        """The eager call behind the op: the differentiable function's signature
        and its flat tensors (in torch's pytree order, the same as ``split``'s)."""
        args, kwargs = rebuild(self.skeletons[key], iter(xs))
        call, flat_xs, _ = self.owner.signature(args, kwargs)
        return call, flat_xs

    def _outputs(self, key: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        args, kwargs = rebuild(self.skeletons[key], iter(xs))
        out = self.owner.func(*args, **kwargs)
        outs: list[torch.Tensor] = []
        self.out_skeletons[key] = split(out, outs)
        return outs

    def _register(self, name: str) -> tuple[Any, Any]:
        @torch.library.custom_op(name, mutates_args=())
        def forward(key: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
            outs = self._outputs(key, [x.detach() for x in xs])
            pointers = {x.untyped_storage().data_ptr() for x in xs if x.numel()}
            # Custom ops may not return (views of) their inputs.
            return [
                o.clone() if not o.numel() or o.untyped_storage().data_ptr() in pointers else o
                for o in outs
            ]

        @forward.register_fake
        def _(key: int, xs: list[torch.Tensor]) -> list[torch.Tensor]:
            # The black box cannot run on fake tensors: run it once on real zeros of
            # the same shapes, for the shapes and dtypes of its outputs.
            from torch._subclasses.fake_tensor import unset_fake_temporarily

            with unset_fake_temporarily():
                real = [torch.zeros(x.shape, dtype=x.dtype) for x in xs]
                outs = self._outputs(key, real)
                meta = [(o.shape, o.dtype) for o in outs]
            device = xs[0].device if xs else torch.device("cpu")
            return [torch.empty(s, dtype=d, device=device) for s, d in meta]

        @torch.library.custom_op(name + "_vjp", mutates_args=())
        def vjp(key: int, xs: list[torch.Tensor], cts: list[torch.Tensor]) -> list[torch.Tensor]:
            from ._fd_rules import _vjp

            call, flat_xs = self._call(key, xs)
            grads = [torch.zeros_like(x) for x in xs]
            for i, g in zip(call.wrt, _vjp(call, call.wrt, flat_xs, cts)):
                grads[i] = g
            # Custom ops may not return views of their inputs nor of one another (the
            # dense backward splits one buffer into the inputs' gradients).
            taken = {t.untyped_storage().data_ptr() for t in (*xs, *cts) if t.numel()}
            unique = []
            for g in grads:
                pointer = g.untyped_storage().data_ptr() if g.numel() else None
                unique.append(g.clone() if pointer is None or pointer in taken else g)
                taken.add(unique[-1].untyped_storage().data_ptr())
            return unique

        @vjp.register_fake
        def _(key: int, xs: list[torch.Tensor], cts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [torch.empty_like(x) for x in xs]

        def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
            ctx.key = inputs[0]
            ctx.save_for_backward(*inputs[1])

        def backward(ctx: Any, cts: list[torch.Tensor]) -> tuple[None, list[Any]]:
            xs = list(ctx.saved_tensors)
            grads = vjp(ctx.key, xs, list(cts))
            return None, [
                g if x.is_floating_point() or x.is_complex() else None for x, g in zip(xs, grads)
            ]

        forward.register_autograd(backward, setup_context=setup_context)
        return forward, vjp
