"""Parallel evaluation: ``workers=`` for a slow black box, ``process_group=`` for an f-bound model.

1. A black box of about 20 ms per call: an 18 ms sleep (an external code waiting on a
   licence server or a file system) and a ``scipy.integrate.solve_ivp`` run of a
   stiff-ish oscillator, in numpy. n = 16 inputs, central differences: 32 calls.
   jacfd serial (``strategy="loop"``), with ``workers=2`` (this process and a worker
   process made for the call), with a long-lived ``Pool(2).map``, and scipy's
   ``approx_derivative`` serial and with ``workers=Pool(2).map`` on the same simulator.
2. The overheads: a function costing nothing, per task (the long-lived pool, and
   ``workers=2``) and per call (``workers=2``: making and joining its worker).
3. Two gloo ranks (``torch.multiprocessing.spawn``, one thread each) on an f-bound
   MLP under vmap, against one process with one thread."""

from __future__ import annotations

import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jacfd import jacfd

from ._timing import table

N = 16
SLEEP = 0.018


def _oscillator(t: float, y: np.ndarray, mu: float) -> np.ndarray:
    return np.array([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])


def simulate_numpy(p: np.ndarray) -> np.ndarray:
    """The black box: a sleep, then a van der Pol run whose end state the inputs shift."""
    from scipy.integrate import solve_ivp

    time.sleep(SLEEP)
    solution = solve_ivp(_oscillator, (0.0, 3.0), [2.0, 0.0], args=(1.5,), rtol=1e-8)
    end = solution.y[:, -1]
    return np.concatenate([np.sin(p) * end[0], np.cumsum(p) * end[1]])


def simulate(p: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(simulate_numpy(p.numpy()))


def _median(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(cases: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Each case's median over ``rounds`` passes over all of them: a burst of load from
    other processes falls on every case alike."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def nothing(p: torch.Tensor) -> torch.Tensor:
    return p.sin()


def black_box_rows(quick: bool) -> list[list[str]]:
    from scipy.optimize._numdiff import approx_derivative

    rounds = 1 if quick else 5
    p = torch.linspace(0.1, 1.0, N, dtype=torch.float64)
    serial_fn = jacfd(simulate, strategy="loop")
    simulate(p)  # imports scipy.integrate before any timing
    rows = []
    with multiprocessing.get_context("fork").Pool(2) as pool:
        candidates: dict[str, Callable[[], Any]] = {
            "jacfd, serial": lambda: serial_fn(p),
            "jacfd, workers=2 (processes per call)": lambda: jacfd(
                simulate, strategy="loop", workers=2
            )(p),
            "jacfd, workers=Pool(2).map": lambda: jacfd(
                simulate, strategy="loop", workers=pool.map
            )(p),
            "scipy approx_derivative, serial": lambda: approx_derivative(
                simulate_numpy, p.numpy(), method="3-point"
            ),
            "scipy approx_derivative, workers=Pool(2).map": lambda: approx_derivative(
                simulate_numpy, p.numpy(), method="3-point", workers=pool.map
            ),
        }
        times = _interleaved(candidates, rounds)
        tasks = 2 * N
        # A function costing nothing: one point per task (32 tasks), or two tasks.
        trivial = {
            "serial, 32 tasks": jacfd(nothing, strategy="loop", chunk_size=1),
            "Pool(2).map, 32 tasks": jacfd(
                nothing, strategy="loop", chunk_size=1, workers=pool.map
            ),
            "workers=2, 32 tasks": jacfd(nothing, strategy="loop", chunk_size=1, workers=2),
            "serial, 2 tasks": jacfd(nothing, strategy="loop", chunk_size=N),
            "workers=2, 2 tasks": jacfd(nothing, strategy="loop", chunk_size=N, workers=2),
        }
        small = _interleaved({name: lambda f=f: f(p) for name, f in trivial.items()}, 9)
    base = times["jacfd, serial"]
    scipy_base = times["scipy approx_derivative, serial"]
    for name, seconds in times.items():
        reference = scipy_base if name.startswith("scipy") else base
        speedup = reference / seconds
        target = "1.7" if name.startswith("jacfd, workers=2 ") else "n/a"
        met = "n/a" if target == "n/a" else "yes" if speedup >= 1.7 else "**no**"
        rows.append([name, f"{seconds * 1e3:.0f}", f"{speedup:.2f}x", target, met])
    per_task = (small["Pool(2).map, 32 tasks"] - small["serial, 32 tasks"]) / tasks
    fresh_per_task = (small["workers=2, 32 tasks"] - small["workers=2, 2 tasks"]) / (tasks - 2)
    per_call = small["workers=2, 2 tasks"] - small["serial, 2 tasks"]
    overhead = [
        [
            "per task, long-lived Pool(2).map",
            f"{per_task * 1e3:.2f}",
            f"{tasks} tasks of one point; (pool - serial) / {tasks}",
        ],
        [
            "per task, workers=2",
            f"{fresh_per_task * 1e3:.2f}",
            f"(32 tasks - 2 tasks of {N} points) / {tasks - 2}",
        ],
        [
            "processes made and joined per call (workers=2)",
            f"{per_call * 1e3:.1f}",
            f"2 tasks of {N} points; workers=2 - serial",
        ],
    ]
    return [
        *rows,
        ["__overhead__"],
        *overhead,
    ]


WIDTH, HIDDEN, LAYERS = 96, 1024, 270
"""Every activation of a batch of 192 points (768 KB) and both weights (384 KB each)
fit in one core's 2 MB of L2 cache: the cost is linear in the points, so a rank
with half of them is not also faster per point (it was with a hidden width of 4096);
and each op is wide enough that its dispatch, paid in full by every rank, is small."""


def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    for _ in range(LAYERS):
        x = torch.tanh(torch.tanh(x @ w1) @ w2)
    return x


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    w1 = torch.randn(WIDTH, HIDDEN, generator=generator) / WIDTH**0.5
    w2 = torch.randn(HIDDEN, WIDTH, generator=generator) / HIDDEN**0.5
    return w1, w2


def _rank(rank: int, world: int, port: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        w1, w2 = _weights()
        x = torch.linspace(-1, 1, WIDTH)
        shared = jacfd(mlp, process_group=dist.group.WORLD)
        shared(x, w1, w2)  # warm-up
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            shared(x, w1, w2)
            times.append(time.perf_counter() - start)
        if rank == 0:
            Path(out).write_text(str(statistics.median(times)))
    finally:
        dist.destroy_process_group()


def distributed_rows(quick: bool) -> list[list[str]]:
    import torch.multiprocessing as torch_mp

    repeats = 2 if quick else 7
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w1, w2 = _weights()
        x = torch.linspace(-1, 1, WIDTH)
        alone = jacfd(mlp)
        alone(x, w1, w2)
        one = _median(lambda: alone(x, w1, w2), repeats)
        halves = jacfd(mlp, chunk_size=WIDTH)  # the batch each rank evaluates
        halves(x, w1, w2)
        one_halves = _median(lambda: halves(x, w1, w2), repeats)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as folder:
        out = str(Path(folder) / "time")
        port = 29600 + os.getpid() % 300
        torch_mp.spawn(_rank, args=(2, port, repeats, out), nprocs=2)
        two = float(Path(out).read_text())
    speedup = one / two
    return [
        ["one process, one thread", f"{one * 1e3:.0f}", "1.00x", "n/a", "n/a"],
        [
            f"one process, one thread, chunk_size={WIDTH}",
            f"{one_halves * 1e3:.0f}",
            f"{one / one_halves:.2f}x",
            "n/a",
            "n/a",
        ],
        [
            "2 gloo ranks, one thread each",
            f"{two * 1e3:.0f}",
            f"{speedup:.2f}x",
            "1.6",
            "yes" if speedup >= 1.6 else "**no**",
        ],
    ]


NOTES = f"""\
**Black box** (n = {N}, central: {2 * N} calls of about 20 ms: a {SLEEP * 1e3:.0f} ms sleep
and a `solve_ivp` van der Pol run), `strategy="loop"`, the median of 5 interleaved rounds
(1 with `--quick`). Speed-ups are against the serial run of the same library.
`workers=2` evaluates in this process and one worker process forked for the call.
**Overhead**: a function costing nothing, medians of 9 interleaved rounds. **Distributed**:
`jacfd(mlp)` under vmap (an MLP {WIDTH} -> {HIDDEN} -> {WIDTH}, {LAYERS} times, float32;
{2 * WIDTH} points), two gloo ranks spawned by `torch.multiprocessing`, one thread each,
against one process with one thread; the time is rank 0's median after a barrier,
gathering included. Each rank evaluates one vmap batch of {WIDTH} points; the sizes are
chosen so that the batch's activations and the weights fit in one core's L2 cache at
either batch size, and the row with `chunk_size={WIDTH}` (two batches of {WIDTH} in one
process) checks that halving the batch does not by itself make a point cheaper."""


def report(quick: bool) -> str:
    box = black_box_rows(quick)
    split = box.index(["__overhead__"])
    header = ["case", "time (ms)", "speed-up", "target", "met"]
    parts = [NOTES, table(header, box[:split])]
    parts.append(table(["overhead", "ms", "how"], box[split + 1 :]))
    parts.append(table(header, distributed_rows(quick)))
    return "\n\n".join(parts)
