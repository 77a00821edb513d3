"""vmap as the default strategy uses it: a flat call, and what to say when it fails.

:func:`flat_vmap` is ``torch.func.vmap`` for arguments the engine already knows
(tensors batched along dim 0 or not at all), without the public wrapper's pytree
round trips; :func:`explain_vmap_failure` adds a hint to an error only when vmap,
not func, is its cause.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._random import RANDOM_HINT

try:
    from torch._C._functorch import (
        _add_batch_dim,
        _remove_batch_dim,
        _vmap_decrement_nesting,
        _vmap_increment_nesting,
    )
    from torch._functorch.predispatch import lazy_load_decompositions

    FLAT_VMAP = True
except ImportError:  # a torch without them: the public vmap does the same, slower
    FLAT_VMAP = False

VMAP_HINT = (
    "func works on ordinary tensors, so it does something torch.vmap cannot batch "
    "(.item(), .numpy(), data-dependent Python control flow, an in-place write into a "
    "captured tensor, or an op with no batching rule): pass strategy='loop' (or "
    "chunk_size=1) to evaluate the stencil points one at a time without vmap, or "
    "strategy='batched' if func already takes a batch along a leading dimension."
)
MEMORY_HINT = (
    "Evaluating all stencil points at once ran out of memory: pass chunk_size=... to "
    "bound the points per call (or batch_dim=... for per-sample Jacobians)."
)


class VmapError(RuntimeError):
    """func failed under ``torch.vmap`` but not on ordinary tensors: a loop works."""


_decompositions_loaded = False


def flat_vmap(
    fn: Callable[..., Any],
    leaves: Sequence[torch.Tensor],
    in_dims: Sequence[int | None],
    rows: int,
    randomness: str,
) -> Any:
    """``torch.func.vmap(fn, in_dims, randomness=randomness)(*leaves)``, as torch's
    own ``_flat_vmap`` does it (torch/_functorch/vmap.py), for inputs already
    known to be tensors batched along dim 0 or not at all.

    The public vmap spends ~30 us per call on a tiny function flattening and
    checking its arguments and outputs as pytrees: more than the whole
    arithmetic of a small Jacobian. Dynamo traces the public vmap instead.
    """
    global _decompositions_loaded
    if not _decompositions_loaded:  # (vmap_impl's first step, needed once)
        lazy_load_decompositions()
        _decompositions_loaded = True
    level = _vmap_increment_nesting(rows, randomness)
    try:
        out = fn(
            *[x if d is None else _add_batch_dim(x, d, level) for x, d in zip(leaves, in_dims)]
        )
        if isinstance(out, torch.Tensor):
            return _remove_batch_dim(out, level, rows, 0)
        flat, spec = tree_flatten(out)
        for value in flat:
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"vmap({getattr(fn, '__name__', fn)}, ...): it must only return Tensors, "
                    f"got type {type(value)}."
                )
        return tree_unflatten([_remove_batch_dim(v, level, rows, 0) for v in flat], spec)
    finally:
        _vmap_decrement_nesting()


def explain_vmap_failure(
    fn: Callable[..., Any],
    leaves: Sequence[torch.Tensor],
    in_dims: Sequence[int | None],
    where: str,
    error: BaseException,
) -> None:
    """Raises the error with the right hint, given only when vmap is the cause."""
    if isinstance(error, VmapError) or str(error).startswith(where):
        return  # a nested transform has explained it already
    if isinstance(error, torch.OutOfMemoryError):
        raise torch.OutOfMemoryError(f"{where}: {error}\n{MEMORY_HINT}") from error
    message = str(error)
    if "random" in message:
        raise RuntimeError(
            f"{where}: evaluating func under torch.vmap failed: {message}\n{RANDOM_HINT}"
        ) from error
    point = [x[0] if d is not None else x for x, d in zip(leaves, in_dims)]
    try:
        fn(*point)  # the first point, without vmap: does func work at all?
    except Exception as plain:
        if "vmap" not in str(plain):  # func's own error: no misleading hint
            return
        # Still a vmap error: the transform is itself inside a vmap.
    raise VmapError(
        f"{where}: evaluating func under torch.vmap failed: {message}\nBut {VMAP_HINT}"
    ) from error
