"""Parallel evaluation: the chunks of stencil points as tasks for workers and ranks.

With ``workers=`` or ``process_group=``, the driver asks :func:`evaluate_in_parallel`
for every chunk's outputs before its loop, which then checks and reduces them as
it does its own evaluations. A *task* is a slice of a chunk's rows, exactly the
slices :func:`~._strategy.evaluate` makes for ``chunk_size``, so the outputs are
bitwise those of a serial evaluation with the same chunks. A task is picklable:
func, the call's arguments, the strategy and the slice's leaves; a module-level
function (:func:`run_task`) rebuilds the evaluation in the worker.
"""

from __future__ import annotations

import builtins
import math
import os
import pickle
import threading
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import torch
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.utils._pytree import tree_flatten, tree_map, tree_map_only

from ._processes import LOADING, PICKLING, WorkerError, run_in_processes
from ._random import GeneratorWatch, Randomness, RandomState, rng_for
from ._strategy import Loop, Strategy, evaluate

if TYPE_CHECKING:
    from ._plan import Call, Options
    from ._points import Chunk, PointSet

MapLike: TypeAlias = Callable[[Callable[[Any], Any], Iterable[Any]], Iterable[Any]]
Workers: TypeAlias = "int | MapLike | None"

TASKS_PER_WORKER = 4
"""Without chunk_size, each worker gets about this many tasks: few enough that the
per-task overhead stays small, enough that an uneven task does not idle the rest."""

PICKLE_HINT = (
    "A lambda, or a function defined inside another function (a closure), cannot be "
    "pickled: define func at module level (and its arguments as plain tensors or "
    "picklable objects), or pass a thread pool's map, e.g. "
    "workers=concurrent.futures.ThreadPoolExecutor(4).map, which needs no pickling."
)

HINTS = {
    LOADING: (
        "A spawned worker (made when CUDA is initialised) imports func by name: define it "
        "in a module, or in a script under `if __name__ == '__main__':`, not in an "
        "interactive session; or pass a thread pool's map, e.g. "
        "workers=concurrent.futures.ThreadPoolExecutor(4).map."
    ),
    PICKLING: (
        "func's outputs (and aux) come back from the worker processes pickled: return "
        "tensors in containers pickle can rebuild (not a class defined inside func), or "
        "pass a thread pool's map, e.g. workers=concurrent.futures.ThreadPoolExecutor(4).map."
    ),
}


def check_workers(name: str, workers: object) -> Workers:
    """Validates ``workers=``: None, a positive int or -1, or a map-like callable."""
    if workers is None or callable(workers):
        return workers
    if isinstance(workers, bool) or not isinstance(workers, int):
        hint = ""
        if hasattr(workers, "map"):
            hint = f" Pass its map method: workers={type(workers).__name__}(...).map."
        raise TypeError(
            f"{name}(func, workers={workers!r}): workers must be None, an int (that many "
            f"processes evaluate, this one included; -1 for all cores) or a map-like callable "
            f"workers(fn, iterable).{hint}"
        )
    if workers == 0 or workers < -1:
        raise ValueError(
            f"{name}(func, workers={workers}): the number of processes must be "
            "positive, or -1 for all cores; use workers=None to evaluate in this process."
        )
    return workers


def check_process_group(name: str, group: object) -> Any:
    """Validates ``process_group=``: None or a ``torch.distributed`` process group."""
    if group is None:
        return None
    distributed = torch.distributed
    if not distributed.is_available() or not isinstance(group, distributed.ProcessGroup):
        raise TypeError(
            f"{name}(func, process_group={group!r}): expected None or a torch.distributed "
            "process group, e.g. torch.distributed.group.WORLD after "
            "torch.distributed.init_process_group(...)."
        )
    return group


@dataclass(frozen=True)
class Job:
    """What every task of one call shares: func at the call's arguments."""

    func: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    argnums: tuple[int, ...]
    bare: bool
    name: str
    has_aux: bool
    strategy: Strategy
    randomness: Randomness
    calls: int
    starts: dict[torch.device, torch.Tensor] | None
    """The generator states every point replays (randomness="same")."""


@dataclass(frozen=True)
class Task:
    """Rows ``start:stop`` of chunk ``index``: their leaves and where they lie."""

    job: Job | bytes
    """The job, or its pickle (made once, not once per task)."""
    index: int
    start: int
    stop: int
    leaves: list[torch.Tensor]
    in_dims: list[int | None]


@dataclass(frozen=True)
class Result:
    """A task's outputs (and the generator states after it), or how it failed."""

    index: int
    start: int
    outputs: Any = None
    end: dict[torch.device, torch.Tensor] | None = None
    failed_row: int | None = None
    """The row func failed at (a loop), or None for the task's rows together."""
    error_type: str = ""
    error: str = ""
    worker_traceback: str = ""


_jobs = threading.local()  # the last job unpickled by this worker thread


def _job_of(task: Task) -> Job:
    if not isinstance(task.job, bytes):
        return task.job
    cached = getattr(_jobs, "last", None)
    if cached is None or cached[0] != task.job:
        _jobs.last = cached = (task.job, pickle.loads(task.job))
    job: Job = cached[1]
    return job


def run_task(task: Task) -> Result:
    """Evaluates one task, in a worker or here; failures come back as values."""
    from ._plan import at_point_of  # (a cycle at import time: _plan uses this module)

    job = _job_of(task)
    rows = task.stop - task.start
    calls = [0]
    try:
        spec = tree_flatten(tuple(job.args[i] for i in job.argnums))[1]
        at_point = at_point_of(
            job.func, job.name, job.has_aux, job.argnums, job.bare, spec, job.args, job.kwargs
        )

        def counted(*leaves: torch.Tensor, **kwargs: Any) -> Any:
            calls[0] += 1
            return at_point(*leaves, **kwargs)

        rng: RandomState | GeneratorWatch | None
        if job.starts is not None:
            rng = RandomState.replaying_from(job.starts)
        else:
            rng = rng_for(job.randomness, job.strategy.watches_rng, job.calls, task.leaves)
        outputs = evaluate(
            job.strategy, counted, task.leaves, task.in_dims, rows, None, rng, job.randomness,
            job.name,
        )  # fmt: skip
    except Exception as error:
        looped = isinstance(job.strategy, Loop) or all(d is None for d in task.in_dims)
        return Result(
            task.index,
            task.start,
            failed_row=task.start + max(calls[0] - 1, 0) if looped else None,
            error_type=type(error).__name__,
            error=str(error),
            worker_traceback=traceback.format_exc(),
        )
    end = rng.end if isinstance(rng, RandomState) and job.starts is not None else None
    # Plain values, whichever map ran the task: a tensor in an autograd graph (func
    # using a parameter) would come back from a pickle as a leaf that requires grad,
    # its graph silently cut, or not at all (torch.multiprocessing refuses it).
    outputs = tree_map_only(torch.Tensor, torch.Tensor.detach, outputs)
    return Result(task.index, task.start, outputs, end)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor without the rest of its storage (pickling sends the whole storage)."""
    if tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone()


def _split(points: PointSet, rows_per_task: int) -> list[tuple[int, int, int]]:
    """The tasks: ``(chunk, start, stop)``, rows in the slices ``evaluate`` makes."""
    tasks = []
    for index, chunk in enumerate(points.chunks):
        rows = points.rows(chunk)
        for start in range(0, rows, rows_per_task):
            tasks.append((index, start, min(start + rows_per_task, rows)))
    return tasks


def _worker_count(workers: Workers) -> int:
    if workers is None:
        return 1
    cores = os.cpu_count() or 1
    if isinstance(workers, int):
        return cores if workers == -1 else workers
    return cores  # a map of unknown width: one per core is the likely size


@contextmanager
def _mapper(options: Options, job: Job) -> Iterator[tuple[MapLike, Job | bytes]]:
    """The map to run tasks with, and the job as the tasks carry it."""
    workers, name = options.workers, options.name
    if workers is None:
        yield map, job
        return
    if not isinstance(workers, int):
        yield workers, job
        return
    try:
        payload = pickle.dumps(job)
    except Exception as error:  # pickling raises PicklingError, AttributeError, TypeError...
        raise TypeError(
            f"{name}(func, workers={workers}): func or its arguments cannot be pickled to "
            f"be sent to worker processes: {error}\n{PICKLE_HINT}"
        ) from error
    # Processes made for this call alone (see _processes: none is kept for the next).
    count = _worker_count(workers)
    yield (lambda fn, tasks: run_in_processes(fn, list(tasks), count, payload)), payload


def _describe(points: PointSet, chunk: Chunk, row: int) -> str:
    """Which stencil point row ``row`` of ``chunk`` is, in the user's terms."""
    from ._points import AxisPoints, ColorPoints

    if not isinstance(points, AxisPoints) or not chunk.count:
        return f"stencil point {row} of chunk {points.chunks.index(chunk)}"
    if chunk.with_center and row == 0:
        return "the unperturbed point x"
    k, j = divmod(row - int(chunk.with_center), chunk.count)
    offset = points.offsets[k]
    kind = "colour" if isinstance(points, ColorPoints) else "element"
    sign = "+" if offset > 0 else "-"
    size = "" if abs(offset) == 1 else f"{abs(offset)} "
    return f"x {sign} {size}h along {kind} {chunk.start + j} of the flattened inputs"


def _named(workers: Workers) -> str:
    """``workers=...`` as the user wrote it: ``2``, or ``Pool.map`` for a map."""
    if workers is None or isinstance(workers, int):
        return f"workers={workers}"
    return f"workers={getattr(workers, '__qualname__', type(workers).__name__)}"


def _raise_failure(options: Options, points: PointSet, result: Result) -> None:
    chunk = points.chunks[result.index]
    if result.failed_row is not None:
        where = _describe(points, chunk, result.failed_row)
    else:
        first = _describe(points, chunk, result.start)
        where = f"a batch of stencil points starting at {first}"
    parallel = "process_group" if options.workers is None else _named(options.workers)
    message = (
        f"{options.name}(func, {parallel}): func raised {result.error_type} at {where}: "
        f"{result.error}\nThe worker's traceback:\n{result.worker_traceback}"
    )
    kind = getattr(builtins, result.error_type, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            raise kind(message)
        except TypeError as unexpected:  # a constructor that takes no message
            if kind is TypeError:
                raise
            raise RuntimeError(message) from unexpected
    raise RuntimeError(message)


def _raise_lost(
    options: Options, points: PointSet, tasks: list[Task], failed: WorkerError
) -> None:
    """A task whose worker died, or whose pickle or result's pickle failed."""
    where = ""
    if failed.task is not None:
        task = tasks[failed.task]
        first = _describe(points, points.chunks[task.index], task.start)
        where = f"at the stencil points from {first}, "
    message = f"{options.name}(func, {_named(options.workers)}): {where}{failed.what}"
    if failed.worker_traceback:
        message += f"\nThe traceback:\n{failed.worker_traceback}"
    if failed.stage in HINTS:
        raise TypeError(f"{message}\n{HINTS[failed.stage]}") from None
    raise RuntimeError(message) from None


def evaluate_in_parallel(
    call: Call,
    options: Options,
    primals: list[torch.Tensor],
    steps: list[torch.Tensor],
    rng: RandomState | GeneratorWatch | None,
) -> list[Any] | None:
    """Every chunk's outputs, from the workers and ranks; None to evaluate here."""
    if options.workers is None and options.process_group is None:
        return None
    from . import _distributed

    name, points, plan = options.name, call.plan.points, call.plan
    if torch.compiler.is_compiling() or retrieve_all_functorch_interpreters():
        raise ValueError(
            f"{name}(func, workers/process_group): parallel evaluation sends plain tensors "
            "to other processes, so it cannot run inside torch.compile or a torch.func "
            "transform (vmap, grad, jacrev...). Call the transform outside them, or drop "
            "workers= and process_group=."
        )
    if call.func is None:
        raise AssertionError("a call made without its func")
    group = options.process_group
    world = _distributed.world_size(group)
    starts = None
    if options.randomness == "same":
        state = rng if isinstance(rng, RandomState) else RandomState([p.device for p in primals])
        starts = _distributed.common_starts(group, state.starts, primals)
        rng = state
    rows_per_task = options.chunk_size or max(
        1,
        math.ceil(
            sum(points.rows(c) for c in points.chunks)
            / (world * TASKS_PER_WORKER * _worker_count(options.workers))
        ),
    )
    if options.workers is None:  # ranks alone: one task per rank, each evaluated whole
        rows_per_task = options.chunk_size or max(
            1, math.ceil(sum(points.rows(c) for c in points.chunks) / world)
        )
    tasks = _split(points, rows_per_task)
    mine = _distributed.share(group, len(tasks))
    # Plain tensors: the values alone are sent (a tensor in a graph cannot be pickled).
    args, kwargs = tree_map_only(torch.Tensor, torch.Tensor.detach, (call.args, call.kwargs))
    job = Job(
        call.func,
        args,
        kwargs,
        plan.argnums,
        plan.bare,
        name,
        options.has_aux,
        options.strategy,
        options.randomness,
        plan.calls,
        starts,
    )
    results: list[Result] = []
    with _mapper(options, job) as (mapping, shipped):
        built: dict[int, tuple[list[torch.Tensor], list[int | None]]] = {}
        payloads = []
        for t in mine:
            index, start, stop = tasks[t]
            if index not in built:
                built = {index: points.build(points.chunks[index], primals, steps)}
            leaves, in_dims = built[index]
            part = [
                _compact(x[start:stop].detach()) if d is not None else _compact(x.detach())
                for x, d in zip(leaves, in_dims)
            ]
            payloads.append(Task(shipped, index, start, stop, part, list(in_dims)))
        try:
            results = list(mapping(run_task, payloads))
        except WorkerError as failed:
            _raise_lost(options, points, payloads, failed)
        except (pickle.PicklingError, AttributeError, TypeError) as error:
            if "pickle" not in str(error):
                raise
            raise TypeError(
                f"{name}(func, {_named(options.workers)}): the tasks cannot be sent to "
                f"the workers: {error}\n{PICKLE_HINT}"
            ) from error
    for result in results:
        if result.error_type:
            _raise_failure(options, points, result)
    results = _distributed.gather(group, results, primals)
    if isinstance(rng, RandomState) and options.randomness == "same":
        for result in results:
            if result.end is not None:
                rng.record_end(result.end, name)
    return _join(points, results)


def _join(points: PointSet, results: list[Result]) -> list[Any]:
    """Each chunk's outputs: its tasks' outputs in row order, concatenated."""
    per_chunk: list[list[Result]] = [[] for _ in points.chunks]
    for result in results:
        per_chunk[result.index].append(result)
    joined = []
    for parts in per_chunk:
        parts.sort(key=lambda r: r.start)
        if len(parts) == 1:
            joined.append(parts[0].outputs)
        else:
            joined.append(tree_map(lambda *xs: torch.cat(xs), *[r.outputs for r in parts]))
    return joined
