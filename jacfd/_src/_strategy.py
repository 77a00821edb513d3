"""Evaluation strategies: how ``func`` meets a batch of stencil points.

A strategy receives the differentiated leaves, each either batched along dim 0
(one row per stencil point) or shared by every point (``in_dims`` None), and
returns ``func``'s outputs stacked along a new leading dimension:

- :class:`Vmap`: one ``torch.func.vmap`` call per chunk (the default);
- :class:`Batched` / :class:`FoldedBatch`: ``func`` itself takes a real batch,
  stacked along an axis of the user's choice or folded into its own batch axis;
- :class:`Loop`: one call per point with ordinary tensors: any Python code works.

Each strategy owns its validation, its failure hint and how it sees random
numbers; the engine asks the object and never compares strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeAlias

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._random import (
    RANDOM_HINT,
    GeneratorWatch,
    Randomness,
    RandomState,
    draws_random_numbers,
    replaying,
)
from ._vmap import FLAT_VMAP, explain_vmap_failure, flat_vmap


class Strategy:
    """The interface every evaluation strategy implements."""

    watches_rng: ClassVar[bool] = True
    """Whether ``randomness="error"`` must be enforced by watching the generator
    (vmap detects random ops by itself)."""
    common_random_numbers: ClassVar[bool] = True
    """Whether ``randomness="same"`` can hold (a real batch draws per point)."""

    def check_leaf(self, where: str, leaf: torch.Tensor) -> None:
        """Raises if a differentiated tensor cannot be evaluated this way."""

    def calls(self, rows: int, chunk_size: int | None) -> int:
        """How many calls of func evaluate ``rows`` points."""
        return 1 if chunk_size is None else -(-rows // chunk_size)

    def run(
        self,
        fn: Callable[..., Any],
        leaves: Sequence[torch.Tensor],
        in_dims: Sequence[int | None],
        rows: int,
        where: str,
        rng: RandomState | None,
    ) -> Any:
        """``fn`` at ``rows`` points, stacked; ``rng`` replays common random numbers."""
        raise NotImplementedError


@dataclass(frozen=True)
class Vmap(Strategy):
    randomness: Randomness = "error"
    watches_rng: ClassVar[bool] = False

    def run(
        self,
        fn: Callable[..., Any],
        leaves: Sequence[torch.Tensor],
        in_dims: Sequence[int | None],
        rows: int,
        where: str,
        rng: RandomState | None,
    ) -> Any:
        if all(d is None for d in in_dims):  # nothing to batch: one point
            return Loop().run(fn, leaves, in_dims, rows, where, rng)
        try:
            with replaying(rng, where):
                if not FLAT_VMAP or torch.compiler.is_compiling():
                    vmapped = torch.func.vmap(
                        fn, in_dims=tuple(in_dims), randomness=self.randomness
                    )
                    return vmapped(*leaves)
                return flat_vmap(fn, leaves, in_dims, rows, self.randomness)
        except (RuntimeError, NotImplementedError) as error:
            explain_vmap_failure(fn, leaves, in_dims, where, error)
            raise


@dataclass(frozen=True)
class Loop(Strategy):
    def calls(self, rows: int, chunk_size: int | None) -> int:
        return rows

    def run(
        self,
        fn: Callable[..., Any],
        leaves: Sequence[torch.Tensor],
        in_dims: Sequence[int | None],
        rows: int,
        where: str,
        rng: RandomState | None,
    ) -> Any:
        per_row = [x.unbind(0) if d is not None else (x,) * rows for x, d in zip(leaves, in_dims)]
        outputs = []
        for point in zip(*per_row):
            with replaying(rng, where):
                outputs.append(fn(*point))
        return _stack(outputs)


def _stack(outputs: list[Any]) -> Any:
    """Stacks equally structured outputs leaf by leaf (flattening each once)."""
    if type(outputs[0]) is torch.Tensor:
        return torch.stack(outputs)
    _, spec = tree_flatten(outputs[0])
    flat = [
        list(out) if all(isinstance(t, torch.Tensor) for t in out) else tree_flatten(out)[0]
        for out in outputs
    ]
    return tree_unflatten([torch.stack(column) for column in zip(*flat)], spec)


Others: TypeAlias = Literal["broadcast", "repeat"]


class _RealBatch(Strategy):
    """func takes the points as a real batch: stack, call, unstack."""

    others: Others
    common_random_numbers: ClassVar[bool] = False
    leading = False
    """The points go in and come out along a new leading axis: stacked rows pass
    as they are, and an output with ``rows`` rows needs no unstacking."""

    def stack(self, x: torch.Tensor, batched: bool, rows: int) -> torch.Tensor:
        raise NotImplementedError

    def unstack(self, where: str, y: torch.Tensor, rows: int) -> torch.Tensor:
        raise NotImplementedError

    def run(
        self,
        fn: Callable[..., Any],
        leaves: Sequence[torch.Tensor],
        in_dims: Sequence[int | None],
        rows: int,
        where: str,
        rng: RandomState | None,
    ) -> Any:
        if self.leading and self.others == "broadcast" and None not in in_dims:
            outputs = fn(*leaves)  # the common Batched(): nothing to move
            if type(outputs) is torch.Tensor and outputs.dim() and outputs.shape[0] == rows:
                return outputs
        else:
            stacked = [self.stack(x, d is not None, rows) for x, d in zip(leaves, in_dims)]
            others = None
            if self.others == "repeat":
                others = lambda t: self.stack(t, False, rows)  # noqa: E731
            outputs = fn(*stacked, others=others)
        if type(outputs) is torch.Tensor:  # no pytree walk
            return self.unstack(where, outputs, rows)
        return tree_map(lambda y: self.unstack(where, y, rows), outputs)


@dataclass(frozen=True)
class Batched(_RealBatch):
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

    Raises:
        TypeError: If a field has the wrong type.
        ValueError: If ``others`` is not ``"broadcast"`` or ``"repeat"``.

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
    others: Others = "broadcast"

    def __post_init__(self) -> None:
        for field, value in (("dim", self.dim), ("out_dim", self.out_dim)):
            if (value is not None or field == "dim") and (
                isinstance(value, bool) or not isinstance(value, int)
            ):
                raise TypeError(
                    f"Batched({field}={value!r}): {field} must be an int"
                    f"{' or None' if field == 'out_dim' else ''}, e.g. Batched(dim=0)."
                )
        if not isinstance(self.existing, bool):
            raise TypeError(
                f"Batched(existing={self.existing!r}): existing must be True or False."
            )
        if self.others not in ("broadcast", "repeat"):
            raise ValueError(
                f"Batched(others={self.others!r}): others must be 'broadcast' or 'repeat'."
            )
        leading = self.dim == 0 and self.out_dim in (None, 0) and not self.existing
        object.__setattr__(self, "leading", leading)  # (frozen: set once, here)

    def stack(self, x: torch.Tensor, batched: bool, rows: int) -> torch.Tensor:
        """``x`` (``(rows, *shape)`` if ``batched``) with the rows along ``dim``."""
        if self.existing:
            d = self.dim % x.dim() if not batched else self.dim % (x.dim() - 1)
            if batched:
                return x.squeeze(d + 1).movedim(0, d)
            return x.expand(*x.shape[:d], rows, *x.shape[d + 1 :])
        if batched:
            return x if self.dim == 0 else x.movedim(0, self.dim % x.dim())
        d = self.dim % (x.dim() + 1)
        return x.unsqueeze(d).expand(*x.shape[:d], rows, *x.shape[d:])

    def unstack(self, where: str, y: torch.Tensor, rows: int) -> torch.Tensor:
        """An output with the rows along ``out_dim`` -> ``(rows, *per-point shape)``."""
        out_dim = self.dim if self.out_dim is None else self.out_dim
        if y.dim() == 0 or not -y.dim() <= out_dim < y.dim() or y.shape[out_dim] != rows:
            raise ValueError(
                f"{where}(func, strategy=Batched(...)): func was given a batch of {rows} "
                f"points along dim {self.dim} but returned a tensor of shape "
                f"{tuple(y.shape)}, which has no axis of size {rows} at out_dim="
                f"{out_dim}. Return outputs (and aux) batched along out_dim, or set "
                "out_dim to where func puts the batch."
            )
        d = out_dim % y.dim()
        moved = y.movedim(d, 0) if d else y
        return moved.unsqueeze(d + 1) if self.existing else moved

    def check_leaf(self, where: str, leaf: torch.Tensor) -> None:
        """A differentiated tensor must have room for the batch axis."""
        if self.existing and not (
            -leaf.dim() <= self.dim < leaf.dim() and leaf.shape[self.dim] == 1
        ):
            raise ValueError(
                f"{where}(func, strategy=Batched(dim={self.dim}, existing=True)): a "
                f"differentiated tensor of shape {tuple(leaf.shape)} has no axis of size 1 "
                f"at dim {self.dim} to stack the points in. Use existing=False to stack "
                "along a new axis."
            )
        if not self.existing and not -leaf.dim() - 1 <= self.dim <= leaf.dim():
            raise ValueError(
                f"{where}(func, strategy=Batched(dim={self.dim})): dim is out of range "
                f"for a differentiated tensor of shape {tuple(leaf.shape)}."
            )


@dataclass(frozen=True)
class FoldedBatch(_RealBatch):
    """Per-sample Jacobians by real batches: the stencil points are folded into
    the function's own batch axis ``dim`` (``rows * B`` samples in one call)."""

    dim: int
    others: Others = "broadcast"

    def stack(self, x: torch.Tensor, batched: bool, rows: int) -> torch.Tensor:
        if batched:  # (rows, ..., B at dim, ...) -> (..., rows * B, ...)
            d = self.dim % (x.dim() - 1)
            return x.movedim(0, d).flatten(d, d + 1)
        d = self.dim % x.dim()
        return x.unsqueeze(d).expand(*x.shape[:d], rows, *x.shape[d:]).flatten(d, d + 1)

    def unstack(self, where: str, y: torch.Tensor, rows: int) -> torch.Tensor:
        if y.dim() == 0 or not -y.dim() <= self.dim < y.dim() or y.shape[self.dim] % rows:
            raise ValueError(
                f"{where}(func, batch_dim={self.dim}, strategy='batched'): func was given "
                f"{rows} stencil points folded into its batch axis but returned a tensor "
                f"of shape {tuple(y.shape)}; per-sample Jacobians need every output "
                f"batched along dim {self.dim} like the inputs."
            )
        d = self.dim % y.dim()
        return torch.unflatten(y, d, (rows, -1)).movedim(d, 0)


StrategyOption: TypeAlias = Literal["vmap", "batched", "loop"] | Batched
STRATEGIES: tuple[str, ...] = ("vmap", "batched", "loop")


def resolve_strategy(
    where: str, strategy: object, chunk_size: int | None, randomness: Randomness
) -> Strategy:
    """The strategy object for a transform's options, decided once."""
    if strategy == "batched":
        strategy = Batched()
    if not (isinstance(strategy, Batched) or strategy in ("vmap", "loop")):
        raise ValueError(
            f"{where}(func, strategy={strategy!r}): unknown strategy; choose one of "
            f"{STRATEGIES} or a jacfd.Batched(...)."
        )
    if isinstance(strategy, Batched):
        if randomness == "same" and not strategy.common_random_numbers:
            raise ValueError(
                f"{where}(func, strategy=Batched(...), randomness='same'): a real batch "
                "draws different random numbers for each point. Use strategy='vmap' or "
                "'loop' for common random numbers, or make func deterministic (e.g. eval "
                "mode)."
            )
        return strategy
    if strategy == "loop" or chunk_size == 1:
        return Loop()
    return Vmap(randomness)


def evaluate(
    strategy: Strategy,
    fn: Callable[..., Any],
    leaves: Sequence[torch.Tensor],
    in_dims: Sequence[int | None],
    rows: int,
    chunk_size: int | None,
    rng: RandomState | GeneratorWatch | None,
    randomness: Randomness,
    where: str,
) -> Any:
    """``fn`` at ``rows`` points, at most ``chunk_size`` per call, stacked.

    ``fn(*leaves, others=None)`` evaluates func, applying ``others`` to the
    tensors of its non-differentiated arguments. ``rng``, if given, is replayed
    before every call (common random numbers) or watched (``randomness="error"``
    outside vmap).
    """
    replay = rng if isinstance(rng, RandomState) else None
    if chunk_size is None or rows <= chunk_size:
        pieces = [strategy.run(fn, leaves, in_dims, rows, where, replay)]
    else:
        pieces = []
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            part = [x[start:stop] if d is not None else x for x, d in zip(leaves, in_dims)]
            pieces.append(strategy.run(fn, part, in_dims, stop - start, where, replay))
    if isinstance(rng, GeneratorWatch) and rng.changed():
        check_draws(strategy, fn, leaves, in_dims, where)
    if len(pieces) == 1:
        return pieces[0]
    return tree_map(lambda *parts: torch.cat(parts), *pieces)


def check_draws(
    strategy: Strategy,
    fn: Callable[..., Any],
    leaves: Sequence[torch.Tensor],
    in_dims: Sequence[int | None],
    where: str,
) -> None:
    """Under ``randomness="error"``, once the generators moved while func was
    evaluated: raises if func itself draws random numbers."""
    # By func, or by another thread? Only func's own draws are an error; a
    # thread-local watch on one point tells them apart.
    point = [x[:1] if d is not None else x for x, d in zip(leaves, in_dims)]
    if draws_random_numbers(lambda: strategy.run(fn, point, in_dims, 1, where, None)):
        raise RuntimeError(
            f"{where}: func used the random number generator while randomness='error'. "
            + RANDOM_HINT
        )
