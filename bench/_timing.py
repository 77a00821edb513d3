"""Timing helpers: medians and IQRs of warm runs, and markdown tables."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.utils.benchmark as benchmark


@dataclass(frozen=True)
class Timing:
    median: float
    """Seconds per call."""
    iqr: float

    def __str__(self) -> str:
        return f"{format_seconds(self.median)} ± {format_seconds(self.iqr / 2)}"

    def short(self) -> str:
        """The median and half the IQR in percent: ``1.23 ms ±2%``."""
        return f"{format_seconds(self.median)} ±{50 * self.iqr / self.median:.0f}%"


def measure(fn: Callable[[], object], quick: bool) -> Timing:
    """Warm-up, then ``blocked_autorange``: torch picks the block size, so cheap
    calls are timed in blocks and the timer's own cost is amortised."""
    return measure_all({"": fn}, quick, rounds=1)[""]


def measure_all(
    fns: Mapping[str, Callable[[], object]], quick: bool, rounds: int = 3
) -> dict[str, Timing]:
    """``measure`` for several functions, interleaved: ``rounds`` passes over all
    of them, each pass a ``rounds``-th of the run time, the block times pooled.

    A burst of load from other processes then falls on every function alike, not
    on one of them, so the ratios of medians from one call stay fair.
    """
    timers = {}
    for name, fn in fns.items():
        fn()  # warm-up
        timers[name] = benchmark.Timer(
            "fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
        )
    run_time = (0.05 if quick else 0.5) / rounds
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name] += timer.blocked_autorange(min_run_time=run_time).times
    return {name: summarise(samples) for name, samples in times.items()}


def measure_alternating(
    fns: Mapping[str, Callable[[], object]], quick: bool, rounds: int | None = None
) -> dict[str, Timing]:
    """Per-call times of cheap functions (µs), timed in alternation.

    Each function is timed in blocks of about a millisecond (enough calls that
    the clock's own cost is negligible); a round times one block of every
    function, starting from a different one each round, and there are
    ``rounds`` rounds. A burst of load from other processes then spans a few
    blocks of every function rather than all the blocks of one, and the
    median over blocks discards it. Garbage collection is off while timing,
    as in ``timeit``.
    """
    rounds = rounds or (12 if quick else 150)
    block_seconds = 2e-4 if quick else 1e-3
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up: first-call caches, lazy imports
        start, count = time.perf_counter(), 0
        while (elapsed := time.perf_counter() - start) < block_seconds or count < 3:
            fn()
            count += 1
        calls[name] = max(1, round(count * block_seconds / elapsed))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    gc.collect()
    gc.disable()
    try:
        for round_index in range(rounds):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                fn, count = fns[name], calls[name]
                start = time.perf_counter()
                for _ in range(count):
                    fn()
                samples[name].append((time.perf_counter() - start) / count)
    finally:
        gc.enable()
    return {name: summarise(times) for name, times in samples.items()}


def summarise(samples: Sequence[float]) -> Timing:
    """The median and interquartile range of per-call times."""
    if len(samples) < 2:
        return Timing(samples[0], 0.0)
    q1, median, q3 = statistics.quantiles(samples, n=4)
    return Timing(median, q3 - q1)


def format_bytes(size: float) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
