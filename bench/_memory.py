"""Peak-memory helpers: the rise of the peak RSS during one call, in fresh processes.

torch's CPU tensors live outside ``tracemalloc``'s view, and ``ru_maxrss`` only
ever grows, so a process measures a call by resetting the kernel's high-water
mark (``VmHWM``, through ``/proc/self/clear_refs``, Linux only) just before it.
Large blocks are returned to the OS as soon as they are freed (``mallopt``), so
the resident set follows live memory; blocks under 64 KiB may reuse freed heap,
so rises well under 1 MB read as about 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_all_start_methods, get_context
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any

M_MMAP_THRESHOLD = -3


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} is not in /proc/self/status")


def peak_rise_mb(call: Callable[[], object]) -> float:
    """MB (10^6 bytes) by which ``call()``, after one warm-up call, raises the
    peak RSS of this process (its result is held until the peak is read);
    ``nan`` where the kernel offers no resettable high-water mark."""
    # Not glibc: freed blocks may stay resident, the rise is a lower bound.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 16)
    call()  # warm-up: code pages, lazily built caches
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kb("VmRSS")
    except OSError:
        return math.nan
    result = call()
    peak = _status_kb("VmHWM")
    del result
    return (peak - before) * 1024 / 1e6


def in_fresh_processes(
    fn: Callable[..., float], jobs: Sequence[tuple[Any, ...]], workers: int = 2
) -> list[float]:
    """``fn(*job)`` for every job, each in a fresh process, ``workers`` at a time.

    Where it can, a fork server that has imported ``fn``'s module (and torch with
    it) forks the processes: fresh heaps without paying the imports every time.
    """
    context: BaseContext
    if "forkserver" in get_all_start_methods():
        context = get_context("forkserver")
        main = getattr(sys.modules["__main__"].__spec__, "name", None)  # re-imported by children
        context.set_forkserver_preload([fn.__module__, *([main] if main else [])])
    else:
        context = get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        return [future.result() for future in [pool.submit(fn, *job) for job in jobs]]
