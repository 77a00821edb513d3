"""Evaluation: ``f`` at a batch of stencil points, by vmap or by a plain loop.

A call receives the differentiated leaves, each either batched along dim 0
(one row per stencil point) or unbatched (the same for every point), and
returns ``f``'s outputs stacked along a new leading dimension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.utils._pytree import tree_map

from typing_extensions import TypeAlias

Randomness: TypeAlias = Literal["error", "same", "different"]
RANDOMNESS: tuple[str, ...] = ("error", "same", "different")

VMAP_HINT = (
    "If func works on ordinary tensors, it probably does something torch.vmap cannot "
    "batch (.item(), .numpy(), data-dependent Python control flow, an in-place write "
    "into a captured tensor, or an op with no batching rule): pass chunk_size=1 to "
    "evaluate the stencil points one at a time without vmap."
)
RANDOM_HINT = (
    "func draws random numbers. Pass randomness='same' so that every stencil point "
    "sees the same random numbers (common random numbers); with 'different' the "
    "differences are dominated by noise."
)


class RandomState:
    """The generator states of the CPU and of the CUDA devices ``f`` runs on.

    Restoring the same state before every call of ``f`` gives all stencil points
    common random numbers, as ``vmap(randomness="same")`` does inside one call.
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.cuda_indices = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(i) for i in self.cuda_indices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for index, state in zip(self.cuda_indices, self.cuda):
            torch.cuda.set_rng_state(state, index)

    def unchanged(self) -> bool:
        return torch.equal(torch.get_rng_state(), self.cpu) and all(
            torch.equal(torch.cuda.get_rng_state(i), s)
            for i, s in zip(self.cuda_indices, self.cuda)
        )


Builder: TypeAlias = Callable[[int, int], "tuple[Sequence[torch.Tensor], Sequence[int | None]]"]
"""``build(start, stop)``: the leaves of rows ``start:stop``, each batched along
dim 0 (in_dims 0) or shared by all rows (in_dims None)."""


def rows_of(
    leaves: Sequence[torch.Tensor], in_dims: Sequence[int | None]
) -> Builder:
    """A builder slicing prebuilt batched leaves."""

    def build(start: int, stop: int) -> tuple[list[torch.Tensor], Sequence[int | None]]:
        return [x[start:stop] if d is not None else x for x, d in zip(leaves, in_dims)], in_dims

    return build


def evaluate(
    fn: Callable[..., Any],
    build: Builder,
    rows: int,
    chunk_size: int | None,
    randomness: Randomness,
    rng: RandomState | None,
) -> Any:
    """``fn`` at ``rows`` points, at most ``chunk_size`` per call, stacked.

    ``rng`` is set when the calls must share random numbers (``randomness="same"``
    across several calls), or when a plain loop must detect randomness that
    ``randomness="error"`` forbids.
    """
    step = rows if chunk_size is None else chunk_size
    pieces = []
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        leaves, in_dims = build(start, stop)
        if chunk_size == 1 or all(d is None for d in in_dims):
            pieces.append(_loop(fn, leaves, in_dims, stop - start, randomness, rng))
        else:
            if rng is not None:
                rng.restore()
            pieces.append(_vmap(fn, leaves, in_dims, randomness))
    if len(pieces) == 1:
        return pieces[0]
    return tree_map(lambda *parts: torch.cat(parts), *pieces)


def _vmap(
    fn: Callable[..., Any],
    leaves: Sequence[torch.Tensor],
    in_dims: Sequence[int | None],
    randomness: Randomness,
) -> Any:
    try:
        return torch.func.vmap(fn, in_dims=tuple(in_dims), randomness=randomness)(*leaves)
    except (RuntimeError, NotImplementedError) as error:
        message = str(error)
        if message.startswith("jacfd"):  # a nested jacfd has already explained it
            raise
        hint = RANDOM_HINT if "random" in message else VMAP_HINT
        raise type(error)(
            f"jacfd: evaluating func under torch.vmap failed: {message}\n{hint}"
        ) from error


def _loop(
    fn: Callable[..., Any],
    leaves: Sequence[torch.Tensor],
    in_dims: Sequence[int | None],
    rows: int,
    randomness: Randomness,
    rng: RandomState | None,
) -> Any:
    outputs = []
    for row in range(rows):
        if rng is not None and randomness == "same":
            rng.restore()
        outputs.append(fn(*[x[row] if d is not None else x for x, d in zip(leaves, in_dims)]))
        if rng is not None and randomness == "error" and not rng.unchanged():
            raise RuntimeError(
                "jacfd: func used the random number generator while randomness='error'. "
                + RANDOM_HINT
            )
    return tree_map(lambda *values: torch.stack(values), *outputs)
