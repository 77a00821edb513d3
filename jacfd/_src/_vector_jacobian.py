"""``vector_jacobian``: ``v^T J`` contracted chunk by chunk, for the backward of
:func:`differentiable` (a dense backward never holds the Jacobian)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._contract import Contraction
from ._driver import run_points
from ._plan import Planner, check_options
from ._structure import Dense


def vector_jacobian(
    func: Callable[..., Any], argnums: tuple[int, ...], name: str, **kwargs: Any
) -> Callable[..., list[torch.Tensor]]:
    """``(cotangents, *args) -> v^T J`` for each argument in ``argnums`` (bare
    tensors), with ``jacfd``'s options, contracting each chunk's columns with the
    cotangents as soon as they are computed: a backward holds at most
    ``chunk_size`` points' columns, never the whole Jacobian."""
    options = check_options(
        name,
        func,
        argnums=argnums,
        delta=kwargs.get("delta"),
        scheme=kwargs.get("scheme", "central"),
        order=kwargs.get("order"),
        has_aux=False,
        chunk_size=kwargs.get("chunk_size"),
        randomness=kwargs.get("randomness", "error"),
        strategy=kwargs.get("strategy", "vmap"),
        workers=kwargs.get("workers"),
        process_group=kwargs.get("process_group"),
        typical=kwargs.get("typical"),
        noise=kwargs.get("noise"),
    )
    stencil = options.stencil
    offsets = stencil.shifted_offsets
    contraction = Contraction.of(stencil, offsets)
    dense = Dense()
    planner = Planner(
        func,
        options,
        lambda primals: dense.points(
            options, primals, offsets, [contraction], contraction.needs_center
        ),
    )

    def vjp(cotangents: list[torch.Tensor | None], *args: Any) -> list[torch.Tensor]:
        call = planner.prepare(args, {})

        def contract(blocks: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
            # blocks[0][k]: the chunk's (count, *out_k) columns of output k.
            total: torch.Tensor | None = None
            for block, ct in zip(blocks[0], cotangents):
                if ct is None:
                    continue
                part = torch.tensordot(block, ct.to(block.dtype), dims=ct.dim())
                total = part if total is None else total + part
            if total is None:
                total = blocks[0][0].new_zeros(blocks[0][0].shape[0])
            return [[total]]

        flat = run_points(call, options, contract).blocks[0][0]  # (n,)
        grads = torch.split(flat, [shape.numel() for shape in call.plan.shapes])
        return [g.reshape(shape) for g, shape in zip(grads, call.plan.shapes)]

    return vjp
