"""``workers=n``: this process and ``n - 1`` worker processes made for one call.

A ``multiprocessing.Pool`` made per call costs far more than its forks: three handler
threads, queues behind locks, tensors sent through shared memory (a segment and its
file descriptor passed per tensor, each way), a shutdown that signals and joins it all,
and the caller idle while its workers start. Here the caller forks ``n - 1`` processes
(spawns them when CUDA is initialised: a forked child cannot use CUDA) and evaluates
tasks itself while they start, so that ``n`` processes evaluate, never more, each with
one intra-op thread (the caller's is restored after the call). Every
process takes the next task from a shared counter (a slow task or a late worker idles
no other) and runs it from its pickle; a worker sends back the pickle of all its
results when no task is left, and exits. The caller joins every worker before it
returns; a worker still running when the call fails (an error, a dead worker, Ctrl-C)
is terminated and joined: none outlives the call.

The workers are never kept for the next call: a forked worker sees the module globals
of the moment it was forked, so a kept one would evaluate a func whose globals have
changed since, and return a wrong Jacobian without a word.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, cast

import torch

LOADING, EVALUATING, PICKLING = "loading the task", "evaluating it", "pickling its result"
"""Where a task can fail outside func (func's own errors come back as results)."""


class WorkerError(RuntimeError):
    """A task that could not be run: its worker died (``stage`` empty), or a stage
    failed. ``task`` is None for a worker that died between tasks."""

    def __init__(self, task: int | None, stage: str, what: str, worker_traceback: str = ""):
        super().__init__(what)
        self.task = task
        self.stage = stage
        self.what = what
        self.worker_traceback = worker_traceback


def start_method() -> str | None:
    """Fork where it is safe and cheap; spawn once CUDA is initialised (a forked child
    cannot use it); the platform's default elsewhere (macOS, Windows: spawn)."""
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return "spawn"
    return "fork" if sys.platform == "linux" else None


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, common: object) -> None:
        super().__init__(file, pickle.HIGHEST_PROTOCOL)
        self.common = common

    def persistent_id(self, obj: object) -> str | None:
        return "common" if obj is self.common and obj is not None else None


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, common: object) -> None:
        super().__init__(file)
        self.common = common

    def persistent_load(self, pid: Any) -> object:
        return self.common


class _Tasks:
    """The tasks' pickles, less the object they all hold (the job's pickle), which is
    kept apart once: a large argument of func is not copied once per task."""

    def __init__(self, tasks: Sequence[Any], common: object) -> None:
        self.common = common
        self.pickles = []
        for task in tasks:
            buffer = io.BytesIO()
            _Pickler(buffer, common).dump(task)
            self.pickles.append(buffer.getvalue())

    def __len__(self) -> int:
        return len(self.pickles)

    def load(self, task: int) -> Any:
        return _Unpickler(io.BytesIO(self.pickles[task]), self.common).load()


class _Board:
    """What the processes of one call share: the next task's number (claimed under a
    lock), and the task each worker took last, to name it if the worker dies."""

    def __init__(self, context: Any, workers: int) -> None:
        self.lock = context.Lock()
        self.numbers = context.RawArray("q", [0] + [-1] * workers)

    def claim(self, worker: int | None = None) -> int:
        with self.lock:
            task: int = self.numbers[0]
            self.numbers[0] = task + 1
        if worker is not None:
            self.numbers[1 + worker] = task
        return task

    def last(self, worker: int, tasks: int) -> int | None:
        task: int = self.numbers[1 + worker]
        return task if 0 <= task < tasks else None


def _work(
    conn: Connection,
    fn: Callable[[Any], Any],
    tasks: _Tasks,
    board: _Board,
    me: int,
) -> None:
    """A worker: evaluates the tasks it claims, keeping their results' pickles, then
    sends ``(True, {task: pickle})``, or ``(False, failure)`` at its first failure,
    and returns, which ends the process. Sent at the end, the results never wait for
    the caller, which reads them between its own tasks or after them."""
    # Ctrl-C is for the caller, which then ends the workers; SIGTERM ends them. (A
    # ValueError would mean not the main thread: not in a fresh process.)
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # One intra-op thread, as DataLoader workers have: the n processes share the cores,
    # and a forked child hangs in its first parallel kernel if the caller had used
    # torch's OpenMP threads (that pool does not survive a fork).
    torch.set_num_threads(1)
    results: dict[int, bytes] = {}
    task, stage = -1, ""
    try:
        while (task := board.claim(me)) < len(tasks):
            stage = LOADING
            loaded = tasks.load(task)
            stage = EVALUATING
            result = fn(loaded)
            stage = PICKLING
            results[task] = pickle.dumps(result)
        reply = pickle.dumps((True, results))
    except Exception as error:
        failed = task if 0 <= task < len(tasks) else None
        failure = (failed, stage, type(error).__name__, str(error), traceback.format_exc())
        reply = pickle.dumps((False, failure))
    with contextlib.suppress(OSError):  # a caller that is gone (killed) needs no reply
        conn.send_bytes(reply)


def _run_here(fn: Callable[[Any], Any], tasks: _Tasks, task: int) -> Any:
    """What a worker does with a task, in the caller: the same pickles both ways."""
    stage = LOADING
    try:
        loaded = tasks.load(task)
        stage = EVALUATING
        result = fn(loaded)
        stage = PICKLING
        return pickle.loads(pickle.dumps(result))
    except Exception as error:
        what = f"{stage} raised {type(error).__name__}: {error}"
        raise WorkerError(task, stage, what, traceback.format_exc()) from error


def run_in_processes(
    fn: Callable[[Any], Any], tasks: Sequence[Any], count: int, common: object = None
) -> list[Any]:
    """``[fn(task) for task in tasks]``, by this process and ``min(count, len(tasks)) - 1``
    worker processes made for the call. ``fn`` must be a module-level function (a
    spawned worker is sent it by name), each task picklable; ``common``, an object
    that every task holds, is pickled once."""
    pickles = _Tasks(tasks, common)  # any pickling error: before a fork
    context: Any = multiprocessing.get_context(start_method())
    workers = min(count, len(tasks)) - 1
    board = _Board(context, workers)
    results: list[Any] = [None] * len(tasks)
    processes: dict[Connection, tuple[int, BaseProcess]] = {}
    pending: list[Connection] = []  # the workers whose results are still to come
    finished = False

    def collect(conn: Connection) -> None:
        pending.remove(conn)
        worker, process = processes[conn]
        try:
            done, value = pickle.loads(conn.recv_bytes())
        except EOFError:  # the worker died
            process.join()
            what = f"a worker process exited with code {process.exitcode}"
            raise WorkerError(board.last(worker, len(tasks)), "", what) from None
        if not done:
            task, stage, error_type, error, worker_traceback = value
            what = f"{stage} raised {error_type}: {error}"
            raise WorkerError(task, stage, what, worker_traceback)
        for task, result in value.items():
            results[task] = pickle.loads(result)

    threads = torch.get_num_threads()
    try:
        # The caller evaluates with one thread too, so that a task's values do not
        # depend on which process took it (the threads split large reductions).
        torch.set_num_threads(1)
        for worker in range(workers):
            mine, theirs = context.Pipe()
            # Not daemonic: func may make processes of its own (a daemon cannot).
            process = context.Process(
                target=_work, args=(theirs, fn, pickles, board, worker), name="jacfd-worker"
            )
            try:
                process.start()
            finally:
                theirs.close()  # so that the worker's death reads as the end of its pipe
                if process.pid is None:
                    mine.close()
            processes[mine] = (worker, process)
            pending.append(mine)
        while (task := board.claim()) < len(tasks):
            results[task] = _run_here(fn, pickles, task)
            if pending:  # a worker that failed: fail now, not after the caller's tasks
                for conn in cast("list[Connection]", wait(pending, timeout=0)):
                    collect(conn)
        while pending:
            for conn in cast("list[Connection]", wait(pending)):
                collect(conn)
        finished = True
    finally:
        torch.set_num_threads(threads)
        for _, process in processes.values():
            if not finished and process.exitcode is None:
                process.terminate()  # a call that failed: its work is not needed
        for conn, (_, process) in processes.items():
            process.join()
            process.close()
            conn.close()
    return results
