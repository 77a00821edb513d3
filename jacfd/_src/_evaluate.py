"""Evaluation strategies: ``f`` at a batch of stencil points.

A call receives the differentiated leaves, each either batched along dim 0
(one row per stencil point) or unbatched (the same for every point), and
returns ``f``'s outputs stacked along a new leading dimension. Three ways:

- ``"vmap"``: one ``torch.func.vmap`` call per chunk (the default);
- ``"batched"`` / :class:`Batched`: ``f`` itself takes the real batch, stacked
  along an axis of the user's choice (for models that only work on a batch,
  or that vmap cannot trace);
- ``"loop"``: one call per point with ordinary tensors: any Python code works.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

Randomness: TypeAlias = Literal["error", "same", "different"]
RANDOMNESS: tuple[str, ...] = ("error", "same", "different")

VMAP_HINT = (
    "If func works on ordinary tensors, it probably does something torch.vmap cannot "
    "batch (.item(), .numpy(), data-dependent Python control flow, an in-place write "
    "into a captured tensor, or an op with no batching rule): pass strategy='loop' "
    "(or chunk_size=1) to evaluate the stencil points one at a time without vmap, or "
    "strategy='batched' if func already takes a batch along a leading dimension "
    "(e.g. a model with BatchNorm)."
)
RANDOM_HINT = (
    "func draws random numbers. Pass randomness='same' so that every stencil point "
    "sees the same random numbers (common random numbers); with 'different' the "
    "differences are dominated by noise."
)


@dataclass(frozen=True)
class Batched:
    """Evaluate ``func`` on real batches of stencil points, not under vmap.

    The points are stacked along ``dim`` of every differentiated tensor: a new
    axis there (default), or, with ``existing=True``, an existing axis of size
    1 (e.g. the batch axis of a single ``(1, C, H, W)`` image). ``func`` must
    return every output (and aux) leaf with the batch along ``out_dim``
    (default: ``dim``), where it is checked, never guessed from sizes.

    Attributes:
        dim: The input axis to stack the points along (negative counts from the
            end of the stacked tensor, as in ``torch.stack``).
        out_dim: The output axis holding the points; ``None`` means ``dim``.
        existing: Stack into an existing size-1 axis ``dim`` instead of a new one.
        others: What happens to the tensors of non-differentiated arguments and
            keyword arguments: ``"broadcast"`` (default) passes them unchanged;
            ``"repeat"`` gives them the batch axis too (expanded, not copied).

    Examples:
        >>> import torch
        >>> from jacfd import Batched, jacfd
        >>> def batch_only(x):  # (batch, 3) -> (batch, 2), and nothing else
        ...     assert x.dim() == 2
        ...     return torch.stack([x[:, 0] * x[:, 1], x[:, 2].sin()], dim=1)
        >>> x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)  # a batch of one
        >>> J = jacfd(batch_only, strategy=Batched(existing=True))(x)  # points along dim 0
        >>> J.shape
        torch.Size([1, 2, 1, 3])
    """

    dim: int = 0
    out_dim: int | None = None
    existing: bool = False
    others: Literal["broadcast", "repeat"] = "broadcast"

    def stack(self, x: torch.Tensor, batched: bool, rows: int) -> torch.Tensor:
        """``x`` (``(rows, *shape)`` if ``batched``) with the rows along ``dim``."""
        if self.existing:
            d = self.dim % x.dim() if not batched else self.dim % (x.dim() - 1)
            if batched:
                return x.squeeze(d + 1).movedim(0, d)
            return x.expand(*x.shape[:d], rows, *x.shape[d + 1 :])
        if batched:
            return x.movedim(0, self.dim % x.dim())
        d = self.dim % (x.dim() + 1)
        return x.unsqueeze(d).expand(*x.shape[:d], rows, *x.shape[d:])

    def unstack(self, name: str, y: torch.Tensor, rows: int) -> torch.Tensor:
        """An output with the rows along ``out_dim`` -> ``(rows, *per-point shape)``."""
        out_dim = self.dim if self.out_dim is None else self.out_dim
        if y.dim() == 0 or not -y.dim() <= out_dim < y.dim() or y.shape[out_dim] != rows:
            raise ValueError(
                f"{name}(func, strategy=Batched(...)): func was given a batch of {rows} "
                f"points along dim {self.dim} but returned a tensor of shape "
                f"{tuple(y.shape)}, which has no axis of size {rows} at out_dim="
                f"{out_dim}. Return outputs (and aux) batched along out_dim, or set "
                "out_dim to where func puts the batch."
            )
        d = out_dim % y.dim()
        moved = y.movedim(d, 0)
        return moved.unsqueeze(d + 1) if self.existing else moved

    def check(self, name: str, leaf: torch.Tensor) -> None:
        """A differentiated tensor must have room for the batch axis."""
        if self.existing and not (
            -leaf.dim() <= self.dim < leaf.dim() and leaf.shape[self.dim] == 1
        ):
            raise ValueError(
                f"{name}(func, strategy=Batched(dim={self.dim}, existing=True)): a "
                f"differentiated tensor of shape {tuple(leaf.shape)} has no axis of size 1 "
                f"at dim {self.dim} to stack the points in. Use existing=False to stack "
                "along a new axis."
            )
        if not self.existing and not -leaf.dim() - 1 <= self.dim <= leaf.dim():
            raise ValueError(
                f"{name}(func, strategy=Batched(dim={self.dim})): dim is out of range "
                f"for a differentiated tensor of shape {tuple(leaf.shape)}."
            )


@dataclass(frozen=True)
class Merged:
    """Per-sample Jacobians by real batches: the stencil points are folded into
    the function's own batch axis ``dim`` (``rows * B`` samples in one call)."""

    dim: int
    others: Literal["broadcast", "repeat"] = "broadcast"

    def stack(self, x: torch.Tensor, batched: bool, rows: int) -> torch.Tensor:
        if batched:  # (rows, ..., B at dim, ...) -> (..., rows * B, ...)
            d = self.dim % (x.dim() - 1)
            return x.movedim(0, d).flatten(d, d + 1)
        d = self.dim % x.dim()
        return x.unsqueeze(d).expand(*x.shape[:d], rows, *x.shape[d:]).flatten(d, d + 1)

    def unstack(self, name: str, y: torch.Tensor, rows: int) -> torch.Tensor:
        if y.dim() == 0 or not -y.dim() <= self.dim < y.dim() or y.shape[self.dim] % rows:
            raise ValueError(
                f"{name}(func, batch_dim={self.dim}, strategy='batched'): func was given "
                f"{rows} stencil points folded into its batch axis but returned a tensor "
                f"of shape {tuple(y.shape)}; per-sample Jacobians need every output "
                f"batched along dim {self.dim} like the inputs."
            )
        d = self.dim % y.dim()
        return torch.unflatten(y, d, (rows, -1)).movedim(d, 0)


Strategy: TypeAlias = Literal["vmap", "batched", "loop"] | Batched
STRATEGIES: tuple[str, ...] = ("vmap", "batched", "loop")


def resolve_strategy(
    name: str, strategy: object, randomness: str
) -> Literal["vmap", "loop"] | Batched:
    if strategy == "batched":
        strategy = Batched()
    if not (isinstance(strategy, Batched) or strategy in ("vmap", "loop")):
        raise ValueError(
            f"{name}(func, strategy={strategy!r}): unknown strategy; choose one of "
            f"{STRATEGIES} or a jacfd.Batched(...)."
        )
    if isinstance(strategy, Batched):
        if strategy.others not in ("broadcast", "repeat"):
            raise ValueError(
                f"{name}(func, strategy=Batched(others={strategy.others!r})): others must "
                "be 'broadcast' or 'repeat'."
            )
        if randomness == "same":
            raise ValueError(
                f"{name}(func, strategy=Batched(...), randomness='same'): a real batch draws "
                "different random numbers for each point. Use strategy='vmap' or 'loop' "
                "for common random numbers, or make func deterministic (e.g. eval mode)."
            )
    return strategy


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


def rows_of(leaves: Sequence[torch.Tensor], in_dims: Sequence[int | None]) -> Builder:
    """A builder slicing prebuilt batched leaves."""

    def build(start: int, stop: int) -> tuple[list[torch.Tensor], Sequence[int | None]]:
        return [x[start:stop] if d is not None else x for x, d in zip(leaves, in_dims)], in_dims

    return build


def evaluate(
    fn: Callable[..., Any],
    build: Builder,
    rows: int,
    chunk_size: int | None,
    strategy: Literal["vmap", "loop"] | Batched | Merged,
    randomness: Randomness,
    rng: RandomState | None,
    name: str = "jacfd",
) -> Any:
    """``fn`` at ``rows`` points, at most ``chunk_size`` per call, stacked.

    ``fn(*leaves, others=None)`` evaluates func, applying ``others`` to the
    tensors of its non-differentiated arguments. ``rng`` is set when the calls
    must share random numbers (``randomness="same"`` across several calls), or
    when a loop or a real batch must detect randomness that ``randomness="error"``
    forbids.
    """
    step = rows if chunk_size is None else chunk_size
    pieces = []
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        leaves, in_dims = build(start, stop)
        if isinstance(strategy, (Batched, Merged)):
            pieces.append(
                _batched(fn, strategy, leaves, in_dims, stop - start, randomness, rng, name)
            )
        elif strategy == "loop" or chunk_size == 1 or all(d is None for d in in_dims):
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


def _batched(
    fn: Callable[..., Any],
    strategy: Batched | Merged,
    leaves: Sequence[torch.Tensor],
    in_dims: Sequence[int | None],
    rows: int,
    randomness: Randomness,
    rng: RandomState | None,
    name: str,
) -> Any:
    stacked = [strategy.stack(x, d is not None, rows) for x, d in zip(leaves, in_dims)]
    others = None
    if strategy.others == "repeat":
        others = lambda t: strategy.stack(t, False, rows)  # noqa: E731
    outputs = fn(*stacked, others=others)
    _check_randomness(randomness, rng)
    return tree_map(lambda y: strategy.unstack(name, y, rows), outputs)


def _check_randomness(randomness: Randomness, rng: RandomState | None) -> None:
    if rng is not None and randomness == "error" and not rng.unchanged():
        raise RuntimeError(
            "jacfd: func used the random number generator while randomness='error'. " + RANDOM_HINT
        )


def _loop(
    fn: Callable[..., Any],
    leaves: Sequence[torch.Tensor],
    in_dims: Sequence[int | None],
    rows: int,
    randomness: Randomness,
    rng: RandomState | None,
) -> Any:
    per_row = [x.unbind(0) if d is not None else (x,) * rows for x, d in zip(leaves, in_dims)]
    outputs = []
    for point in zip(*per_row):
        if rng is not None and randomness == "same":
            rng.restore()
        outputs.append(fn(*point))
    _check_randomness(randomness, rng)  # any draw in the loop has moved the state
    return _stack(outputs)


def _stack(outputs: list[Any]) -> Any:
    """Stacks equally structured outputs leaf by leaf (flattening each once)."""
    _, spec = tree_flatten(outputs[0])
    flat = [
        list(out) if all(isinstance(t, torch.Tensor) for t in out) else tree_flatten(out)[0]
        for out in outputs
    ]
    return tree_unflatten([torch.stack(column) for column in zip(*flat)], spec)
