"""Evaluation strategies: black boxes against scipy, and vmap vs batched vs loop.

1. ``strategy="loop"`` on numpy black boxes against
   ``scipy.optimize.approx_derivative``, with the same scheme and so the same
   number of evaluations (2-point: n + 1; 3-point: 2n).
2. vmap, batched and loop on a torch-native MLP, against ``f`` on the stacked
   batch of the stencil points (the cost no strategy can beat).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize._numdiff import approx_derivative

from jacfd import jacfd

from ._timing import measure, table


def elementwise(v: np.ndarray) -> np.ndarray:
    """A cheap black box (~10 µs): per-call overhead shows most here."""
    return np.sin(np.cumsum(v)) * np.exp(-v)


def simulator(v: np.ndarray) -> np.ndarray:
    """A small simulator: 40 RK4 steps of a damped chain of oscillators whose
    stiffnesses are the inputs; returns the final positions (~1 ms a call)."""
    n, dt = v.size, 0.01
    state = np.concatenate([np.linspace(0.0, 1.0, n), np.zeros(n)])

    def rate(s: np.ndarray) -> np.ndarray:
        position, velocity = s[:n], s[n:]
        coupling = np.roll(position, 1) + np.roll(position, -1) - 2 * position
        return np.concatenate([velocity, -v * position + coupling - 0.1 * velocity])

    for _ in range(40):
        k1 = rate(state)
        k2 = rate(state + dt / 2 * k1)
        k3 = rate(state + dt / 2 * k2)
        k4 = rate(state + dt * k3)
        state = state + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return state[:n]


def black_box_rows(quick: bool) -> list[list[object]]:
    rows: list[list[object]] = []
    boxes = {"element-wise (n=32)": (elementwise, 32), "RK4 simulator (n=8)": (simulator, 8)}
    for label, (black_box, n) in boxes.items():
        x = np.linspace(0.5, 2.0, n)

        def through_torch(t: torch.Tensor, black_box=black_box) -> torch.Tensor:
            return torch.from_numpy(black_box(t.numpy()))

        for method, scheme in (("2-point", "forward"), ("3-point", "central")):
            transform = jacfd(through_torch, scheme=scheme, strategy="loop")
            xt = torch.from_numpy(x)
            error = np.abs(
                transform(xt).numpy() - approx_derivative(black_box, x, method=method)
            ).max()
            scipy_time = measure(lambda: approx_derivative(black_box, x, method=method), quick)
            jacfd_time = measure(lambda: transform(xt), quick)
            ratio = jacfd_time.median / scipy_time.median
            rows.append(
                [
                    label,
                    f"{scheme} / {method}",
                    scipy_time,
                    jacfd_time,
                    f"{ratio:.2f}",
                    f"{error:.1e}",
                ]
            )
    return rows


def strategy_rows(quick: bool) -> list[list[object]]:
    torch.manual_seed(0)
    n, hidden = 64, 256
    model = torch.nn.Sequential(
        torch.nn.Linear(n, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n)
    ).requires_grad_(False)
    x = torch.randn(n)
    stacked = torch.randn(n + 1, n)  # forward differences: the centre and n points
    limit = measure(lambda: model(stacked), quick)
    rows: list[list[object]] = [["f on the stacked batch (limit)", limit, "1.00"]]
    for strategy in ("vmap", "batched", "loop"):
        transform = jacfd(model, scheme="forward", strategy=strategy)
        timing = measure(lambda: transform(x), quick)
        rows.append(
            [f'jacfd(strategy="{strategy}")', timing, f"{timing.median / limit.median:.2f}"]
        )
    return rows


def report(quick: bool) -> str:
    return "\n\n".join(
        [
            '### Black boxes: `strategy="loop"` vs `scipy.optimize.approx_derivative`',
            table(
                [
                    "black box",
                    "scheme",
                    "scipy",
                    "jacfd loop",
                    "jacfd / scipy",
                    "max abs difference",
                ],
                black_box_rows(quick),
            ),
            "### Strategies on a torch-native MLP (64 -> 256 -> 64, float32, forward)",
            table(["evaluation", "time", "ratio to the limit"], strategy_rows(quick)),
        ]
    )
