"""Timing helpers: medians and IQRs of warm runs, and markdown tables."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def measure(fn: Callable[[], object], quick: bool) -> Timing:
    """Warm-up, then ``blocked_autorange``: torch picks the block size, so cheap
    calls are timed in blocks and the timer's own cost is amortised."""
    fn()
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    result = timer.blocked_autorange(min_run_time=0.05 if quick else 0.5)
    return Timing(result.median, result.iqr)


def format_seconds(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
