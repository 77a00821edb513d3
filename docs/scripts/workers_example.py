"""A slow black box differentiated by worker processes.

Run with ``python docs/scripts/workers_example.py``. func must be defined at module
level (worker processes are sent it by name), and a script that makes processes
needs the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np
import torch

import jacfd


def simulator(params: torch.Tensor) -> torch.Tensor:
    """Stands for an external code: 20 ms per call, numpy inside."""
    time.sleep(0.02)
    p = params.numpy()
    return torch.from_numpy(np.concatenate([np.sin(p) * p.sum(), np.cumsum(p**2)]))


def main() -> None:
    params = torch.linspace(0.1, 1.0, 16, dtype=torch.float64)

    start = time.perf_counter()
    serial = jacfd.jacfd(simulator, strategy="loop")(params)
    serial_time = time.perf_counter() - start

    start = time.perf_counter()
    # Two processes: this one, and a worker forked for this call and joined after it.
    pooled = jacfd.jacfd(simulator, strategy="loop", workers=2)(params)
    pooled_time = time.perf_counter() - start

    with multiprocessing.Pool(2) as pool:  # long-lived: made once, used by many calls
        again = jacfd.jacfd(simulator, strategy="loop", workers=pool.map)(params)

    assert torch.equal(serial, pooled) and torch.equal(serial, again)  # bitwise
    print(f"serial {serial_time:.2f} s, workers=2 {pooled_time:.2f} s: the same Jacobian")


if __name__ == "__main__":
    main()
