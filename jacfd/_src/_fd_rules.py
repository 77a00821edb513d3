"""The autograd.Functions behind ``differentiable``: finite differences as a derivative rule.

:class:`_Apply` calls func; its backward and jvp call :class:`_Vjp` and
:class:`_Jvp`, which compute ``v^T J`` (from :func:`jacfd`'s Jacobian) and ``J t``
(from :func:`jvpfd`). Each has a vmap rule, so that ``vmap(grad(f))`` and
``jacfwd`` work; differentiating ``_Vjp`` or ``_Jvp`` raises.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch.utils._pytree import TreeSpec

from ._jacfd import jacfd
from ._jvp import jvpfd
from ._vector_jacobian import vector_jacobian

NAME = "differentiable(func, ...)"
_JVP_OPTIONS = (
    "scheme",
    "order",
    "randomness",
    "strategy",
    "workers",
    "process_group",
    "typical",
    "noise",
    "bounds",
)


class _Call:
    """One call signature of a differentiable function: the flat function of its
    tensor leaves, which of them are differentiated, and the derivative options."""

    def __init__(
        self,
        flat: Callable[..., tuple[torch.Tensor, ...]],
        wrt: tuple[int, ...],
        options: dict[str, Any],
        batch_dim: int | None,
        sparsity: Any,
    ) -> None:
        self.flat = flat
        self.wrt = wrt
        self.options = options
        self.batch_dim = batch_dim
        self.sparsity = sparsity
        self.out_spec: TreeSpec | None = None
        self.out_meta: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        self._jacobians: dict[tuple[int, ...], Callable[..., Any]] = {}
        self._products: dict[tuple[int, ...], Callable[..., list[torch.Tensor]]] = {}
        self._lock = threading.Lock()

    def options_for(self, wrt: tuple[int, ...]) -> dict[str, Any]:
        """The options for the inputs ``wrt`` (a subset of ``self.wrt``): a tuple of
        ``typical`` (or of a side of ``bounds``) holds one value per input of
        ``self.wrt`` (see ``_differentiable._per_input``); the others apply to all."""

        def subset(value: Any) -> Any:
            if not isinstance(value, tuple) or wrt == self.wrt:
                return value
            return tuple(value[self.wrt.index(i)] for i in wrt)

        options = dict(self.options)
        if "typical" in options:
            options["typical"] = subset(options["typical"])
        if options.get("bounds") is not None:
            options["bounds"] = tuple(subset(side) for side in options["bounds"])
        return options

    def jacobian(self, wrt: tuple[int, ...]) -> Callable[..., Any]:
        """``jacfd`` of the flat function, built once per set of argnums: its plan
        cache then serves every backward of this signature."""
        with self._lock:
            transform = self._jacobians.get(wrt)
            if transform is None:
                transform = jacfd(
                    self.flat,
                    argnums=wrt,
                    **self.options_for(wrt),
                    sparsity=self.sparsity,
                    batch_dim=self.batch_dim,
                )
                self._jacobians[wrt] = transform
            return transform

    def vector_jacobian(self, wrt: tuple[int, ...]) -> Callable[..., list[torch.Tensor]]:
        """``(cotangents, *xs) -> v^T J``, contracted chunk by chunk, built once per
        set of argnums."""
        with self._lock:
            transform = self._products.get(wrt)
            if transform is None:
                transform = vector_jacobian(
                    self.flat, wrt, NAME.split("(")[0], **self.options_for(wrt)
                )
                self._products[wrt] = transform
            return transform

    @property
    def vmappable(self) -> bool:
        return self.options.get("strategy", "vmap") == "vmap" and self.sparsity is None


def _is_float(x: torch.Tensor) -> bool:
    return x.is_floating_point() or x.is_complex()


def _vjp(
    call: _Call, wrt: tuple[int, ...], xs: Sequence[torch.Tensor], cts: Sequence[Any]
) -> list[torch.Tensor]:
    """``v^T J`` for the inputs ``wrt``, from the finite-difference Jacobian at ``xs``."""
    if call.batch_dim is None and call.sparsity is None and "bounds" not in call.options:
        # Dense: contracted chunk by chunk, never holding the Jacobian (with bounds,
        # the one-sided columns are merged into the Jacobian instead).
        products = call.vector_jacobian(wrt)(list(cts), *xs)
        return [g.to(xs[i].dtype) for g, i in zip(products, wrt)]
    jac = call.jacobian(wrt)(*xs)
    grads: list[torch.Tensor] = []
    for k, i in enumerate(wrt):
        x = xs[i]
        total = torch.zeros_like(x)
        for out_jac, ct in zip(jac, cts):
            block = out_jac[k]
            if ct is None:
                continue
            ct = ct.to(block.dtype)
            if call.batch_dim is None:
                total = total + torch.tensordot(ct, block, dims=ct.dim()).to(x.dtype)
            else:
                # Per-sample Jacobians (B, *out_sample, *in_sample): contract each
                # sample's cotangent with its own block.
                d_out, d_in = call.batch_dim % ct.dim(), call.batch_dim % x.dim()
                ct0 = ct.movedim(d_out, 0)
                size = ct0.shape[0]
                g = torch.einsum(
                    "bo,boi->bi", ct0.reshape(size, -1), block.reshape(size, ct0[0].numel(), -1)
                )
                total = total + g.reshape(x.movedim(d_in, 0).shape).movedim(0, d_in).to(x.dtype)
        grads.append(total)
    return grads


def _jvp(call: _Call, xs: Sequence[torch.Tensor], ts: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    """``J t`` by differences along ``t`` (only the differentiated inputs move)."""
    moving = [i for i in call.wrt if ts[i] is not None]
    if not moving:
        return tuple(torch.zeros(s, dtype=d, device=v) for s, d, v in call.out_meta)

    along = _Along(call.flat, list(xs), moving)
    moving_options = call.options_for(tuple(moving))
    options = {k: moving_options[k] for k in _JVP_OPTIONS if k in moving_options}
    delta = call.options.get("delta")
    if isinstance(delta, float):
        options["delta"] = delta
    primals = tuple(xs[i] for i in moving)
    tangents = tuple(ts[i].to(xs[i].dtype) for i in moving)
    _, out = jvpfd(along, primals, tangents, **options)
    return tuple(out)


@dataclass(frozen=True)
class _Along:
    """The flat function with only the moving inputs as arguments; a class, not a
    closure, so that worker processes can be sent it."""

    flat: Callable[..., tuple[torch.Tensor, ...]]
    xs: list[torch.Tensor]
    moving: list[int]

    def __call__(self, *zs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        full = list(self.xs)
        for i, z in zip(self.moving, zs):
            full[i] = z
        return self.flat(*full)


def _no_second_derivative() -> NoReturn:
    raise RuntimeError(
        f"{NAME}: no second derivative: the derivatives of a differentiable function come "
        "from finite differences, and they are not differentiated again. For a Hessian of "
        "a black box use jacfd.hessfd(func); to differentiate a gradient, wrap the whole "
        "gradient computation in differentiable(...) instead."
    )


class _Terminal(torch.autograd.Function):
    """A Function whose own derivatives are not taken: finite-difference rules
    (``_Vjp``, ``_Jvp``) and the reattachment (``_Stop``) share this."""

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Any) -> Any:
        _no_second_derivative()

    @staticmethod
    def jvp(ctx: Any, *grad_inputs: Any) -> Any:
        _no_second_derivative()


class _Vjp(_Terminal):
    @staticmethod
    def forward(
        call: _Call, wrt: tuple[int, ...], n: int, *xs_cts: Any
    ) -> tuple[torch.Tensor, ...]:
        # Detached: the finite differences are not differentiated again (by
        # autograd through func's torch ops); the backward below says so instead.
        xs_cts = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in xs_cts)
        return tuple(_vjp(call, wrt, xs_cts[:n], xs_cts[n:]))

    @staticmethod
    def vmap(
        info: Any, in_dims: Any, call: _Call, wrt: tuple[int, ...], n: int, *xs_cts: Any
    ) -> Any:
        dims = in_dims[3:]
        if call.vmappable:
            # vmap(grad(f)): the backward of every sample in one vmap of jacfd.
            detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in xs_cts]
            out = torch.func.vmap(
                lambda *a: tuple(_vjp(call, wrt, a[:n], a[n:])),
                in_dims=tuple(dims),
                randomness=call.options.get("randomness", "error"),
            )(*detached)
            tensors = [a for a in xs_cts if isinstance(a, torch.Tensor)]
            out = _apply(_Stop, len(out), *out, *tensors)
        else:
            out = _loop(info.batch_size, dims, xs_cts, lambda *a: _apply(_Vjp, call, wrt, n, *a))
        return out, (0,) * len(out)


class _Stop(_Terminal):
    """Finite-difference results made inside a vmap rule, from detached inputs:
    the inputs are attached again only so that differentiating the results raises
    (instead of silently giving zero)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(n_out: int, *outs_inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(o.clone() for o in outs_inputs[:n_out])


class _Jvp(_Terminal):
    @staticmethod
    def forward(call: _Call, n: int, *xs_ts: Any) -> tuple[torch.Tensor, ...]:
        xs_ts = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in xs_ts)
        return _jvp(call, xs_ts[:n], xs_ts[n:])

    @staticmethod
    def vmap(info: Any, in_dims: Any, call: _Call, n: int, *xs_ts: Any) -> Any:
        # jacfwd: one directional difference per tangent (jvpfd reads the size of
        # its tangent to scale the step, which a vmapped tangent cannot give).
        out = _loop(info.batch_size, in_dims[2:], xs_ts, lambda *a: _apply(_Jvp, call, n, *a))
        return out, (0,) * len(out)


def _apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    """``Function.apply``, which torch leaves untyped."""
    return function.apply(*args)  # type: ignore[no-untyped-call]


def _loop(
    size: int, dims: Sequence[int | None], args: Sequence[Any], fn: Callable[..., Any]
) -> tuple[torch.Tensor, ...]:
    """``fn`` per sample, stacked: the vmap rule of strategies that cannot be vmapped."""
    results = [
        fn(*(a.select(d, b) if d is not None else a for a, d in zip(args, dims)))
        for b in range(size)
    ]
    return tuple(torch.stack(outs) for outs in zip(*results))


class _Apply(torch.autograd.Function):
    @staticmethod
    def forward(call: _Call, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = call.flat(*(x.detach() for x in xs))
        pointers = {x.untyped_storage().data_ptr() for x in xs if x.numel()}
        # An output that shares memory with an input would let a later in-place
        # change of one corrupt the other (and the saved inputs): copy it.
        outs = tuple(
            o.clone() if o.numel() and o.untyped_storage().data_ptr() in pointers else o
            for o in outs
        )
        call.out_meta = [(o.shape, o.dtype, o.device) for o in outs]
        return outs

    @staticmethod
    def setup_context(ctx: Any, inputs: Any, output: Any) -> None:
        ctx.call = inputs[0]
        ctx.save_for_backward(*inputs[1:])
        ctx.save_for_forward(*inputs[1:])
        ctx.mark_non_differentiable(*(o for o in output if not _is_float(o)))

    @staticmethod
    def backward(ctx: Any, *cts: Any) -> Any:
        call: _Call = ctx.call
        xs = ctx.saved_tensors
        wrt = tuple(i for i in call.wrt if ctx.needs_input_grad[1 + i])
        grads: list[Any] = [None] * len(xs)
        if wrt:
            for i, g in zip(wrt, _apply(_Vjp, call, wrt, len(xs), *xs, *cts)):
                grads[i] = g
        return (None, *grads)

    @staticmethod
    def jvp(ctx: Any, _call_tangent: Any, *ts: Any) -> Any:
        call: _Call = ctx.call
        xs = ctx.saved_tensors
        return _apply(_Jvp, call, len(xs), *xs, *ts)

    @staticmethod
    def vmap(info: Any, in_dims: Any, call: _Call, *xs: torch.Tensor) -> Any:
        dims = in_dims[1:]
        size = info.batch_size
        if call.vmappable and call.batch_dim is None:
            # vmap(differentiable(f)) is differentiable(vmap(f)) with independent
            # samples: per-sample Jacobians (batch_dim=0) at the cost of one sample.
            moved = []
            for i, (x, d) in enumerate(zip(xs, dims)):
                if d is not None:
                    moved.append(x.movedim(d, 0))
                elif i in call.wrt:  # shared but differentiated: one copy per sample
                    moved.append(x.expand(size, *x.shape))
                else:
                    moved.append(x)
            batched_dims = tuple(
                0 if d is not None or i in call.wrt else None for i, d in enumerate(dims)
            )
            inner = _Call(
                torch.func.vmap(
                    call.flat,
                    in_dims=batched_dims,
                    randomness=call.options.get("randomness", "error"),
                ),
                call.wrt,
                call.options,
                0,
                None,
            )
            # (call.flat, run inside, records the output structure on call itself)
            out = _apply(_Apply, inner, *moved)
        else:
            out = _loop(size, dims, xs, lambda *a: _apply(_Apply, call, *a))
        return out, (0,) * len(out)
