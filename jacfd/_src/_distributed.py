"""``process_group=``: the tasks shared among the ranks of a ``torch.distributed`` group.

Every rank calls the transform with the same arguments, so every rank plans the
same chunks and tasks (the plan is a deterministic function of the shapes, the
options and, for sparsity, the colouring made when the transform was built) and
computes the same steps (elementwise arithmetic on the same values). Rank ``r``
of ``W`` evaluates tasks ``r, r + W, r + 2W, ...``; the values of every task are
then all-gathered, so every rank reduces the same values into the same Jacobian.
For ``randomness="same"`` the generator states are broadcast from the group's
first rank, so every point on every rank replays them.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

if TYPE_CHECKING:
    from ._workers import Result


def world_size(group: Any) -> int:
    return 1 if group is None else int(torch.distributed.get_world_size(group))


def share(group: Any, tasks: int) -> list[int]:
    """This rank's tasks: every ``W``-th, from its rank in the group."""
    if group is None:
        return list(range(tasks))
    rank, world = torch.distributed.get_rank(group), world_size(group)
    return list(range(rank, tasks, world))


def _device(group: Any, primals: list[torch.Tensor]) -> torch.device:
    """Where the group's collectives run: NCCL needs this rank's GPU."""
    if torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def common_starts(
    group: Any, starts: dict[torch.device, torch.Tensor], primals: list[torch.Tensor]
) -> dict[torch.device, torch.Tensor]:
    """The generator states of the group's first rank, for every rank (in the same
    device order: rank ``r``'s GPU gets the first rank's GPU state)."""
    if group is None:
        return starts
    device = _device(group, primals)
    source = torch.distributed.get_global_rank(group, 0)
    common = {}
    for key, state in starts.items():
        moved = state.to(device)
        torch.distributed.broadcast(moved, source, group=group)
        common[key] = moved.cpu()
    return common


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)


def gather(group: Any, results: list[Result], primals: list[torch.Tensor]) -> list[Result]:
    """Every rank's results, on every rank: the tensors all-gathered as bytes (padded
    to the longest rank's), their layout and the rest as objects."""
    if group is None:
        return results
    from ._workers import Result

    device = _device(group, primals)
    local = primals[0].device if primals else device
    layouts: list[Any] = []
    buffers: list[torch.Tensor] = []
    for result in results:
        flat, spec = tree_flatten(result.outputs)
        kinds = [
            (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else ("value", x)
            for x in flat
        ]
        ends = None if result.end is None else list(result.end.values())
        layouts.append((result.index, result.start, spec, kinds, ends))
        buffers.extend(_as_bytes(x).to(device) for x in flat if isinstance(x, torch.Tensor))
    world = world_size(group)
    everyone: list[Any] = [None] * world
    with warnings.catch_warnings():
        # Unpickling an output TreeSpec trips a deprecation inside torch's pytree.
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        torch.distributed.all_gather_object(everyone, layouts, group=group)
    mine = torch.cat(buffers) if buffers else torch.empty(0, dtype=torch.uint8, device=device)
    sizes = [_size(rank_layouts) for rank_layouts in everyone]
    longest = max(sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: mine.numel()] = mine
    received = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(received, padded, group=group)
    keys = list(_starts_keys(results, local))
    gathered = []
    for rank_layouts, data in zip(everyone, received):
        offset = 0
        for index, start, spec, kinds, ends in rank_layouts:
            leaves = []
            for kind in kinds:
                if kind[0] == "value":
                    leaves.append(kind[1])
                    continue
                shape, dtype = kind
                size = _nbytes(shape, dtype)
                chunk = data[offset : offset + size].to(local)
                offset += size
                value = chunk.view(dtype) if size else torch.empty(0, dtype=dtype, device=local)
                leaves.append(value.reshape(shape))
            end = None if ends is None else dict(zip(keys, ends))
            gathered.append(Result(index, start, tree_unflatten(leaves, spec), end))
    return gathered


def _starts_keys(results: list[Result], local: torch.device) -> list[torch.device]:
    """The devices of this rank's generator states, in the order they are sent."""
    for result in results:
        if result.end is not None:
            return list(result.end)
    keys = [torch.device("cpu")]
    if local.type == "cuda":
        keys.append(torch.device("cuda", local.index or 0))
    return keys


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()


def _size(layouts: list[Any]) -> int:
    return sum(
        _nbytes(*kind) for _, _, _, kinds, _ in layouts for kind in kinds if kind[0] != "value"
    )
