"""What one call signature's plan costs in memory, in the transform's cache.

For each case a transform is built, called once (which plans the signature, and for
a plain call also makes its express path), and the bytes that stay allocated because
of that call are counted:

- ``python``: Python objects still allocated after the call (``tracemalloc``, the
  result and its inputs deleted, garbage collected);
- ``tensors``: the storages of the tensors the planner holds (offset patterns,
  colour and index tables), found by walking its objects.

Run: ``python docs/scripts/plan_cache_memory.py``. The numbers are per signature;
a transform keeps at most ``PLAN_CACHE_SIZE`` (32) of them.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch

from jacfd import hessfd, jacfd


def planner_of(transform: Any) -> Any:
    return next(
        c.cell_contents
        for c in transform.__closure__
        if type(c.cell_contents).__name__ == "Planner"
    )


def tensor_bytes(root: object) -> int:
    """The bytes of the distinct tensor storages reachable from ``root``'s caches."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or callable(obj):  # (func and its modules are not the plan's)
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            continue
        if isinstance(obj, dict):
            todo += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo += list(obj)
        elif hasattr(obj, "__dict__"):
            todo += list(vars(obj).values())
        elif hasattr(obj, "__slots__"):
            todo += [getattr(obj, s) for s in obj.__slots__ if hasattr(obj, s)]
    return sum(storages.values())


def measure(make: Callable[[], tuple[Any, tuple[Any, ...]]]) -> tuple[int, int, int]:
    transform, args = make()
    transform(*args)  # warm: lazy imports, torch's own caches
    transform, args = make()  # a fresh transform with an empty cache
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    result = transform(*args)
    del result
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    planner = planner_of(transform)
    return grown, tensor_bytes(planner._plans), len(planner._express)


def tiny_mlp(strategy: str) -> Callable[[], tuple[Any, tuple[Any, ...]]]:
    def make() -> tuple[Any, tuple[Any, ...]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)
        ).requires_grad_(False)
        return jacfd(model, scheme="forward", strategy=strategy), (torch.randn(8),)

    return make


def hessian() -> tuple[Any, tuple[Any, ...]]:
    return hessfd(lambda x: x.sin().prod()), (torch.rand(8, dtype=torch.float64),)


def dict_of_leaves() -> tuple[Any, tuple[Any, ...]]:
    leaves = {f"w{k}": torch.rand(3, dtype=torch.float64) for k in range(6)}
    return jacfd(lambda d: sum(v.sin().sum() for v in d.values())), (leaves,)


def main() -> None:
    cases = {
        "tiny MLP 8-16-8, jacfd forward, vmap": tiny_mlp("vmap"),
        "tiny MLP 8-16-8, jacfd forward, batched": tiny_mlp("batched"),
        "hessfd, 8 float64 inputs": hessian,
        "jacfd, a dict of 6 leaves": dict_of_leaves,
    }
    print("| case | python (KB) | tensors (KB) | express paths |")
    print("|---|---|---|---|")
    for name, make in cases.items():
        python, tensors, express = measure(make)
        print(f"| {name} | {python / 1024:.1f} | {tensors / 1024:.1f} | {express} |")


if __name__ == "__main__":
    main()
