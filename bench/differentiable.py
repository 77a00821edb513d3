"""Derivative rules: one training step through a numpy simulator.

The network and simulator of ``docs/training.md`` (``docs/scripts/training_curves.py``:
a 2-32-2 MLP proposing launch velocities, a numpy projectile simulator with drag), batch
64, float64. One step (forward, backward, Adam) with the simulator's gradient from

1. ``jacfd.differentiable(simulate, batch_dim=0, strategy="loop")``: one Jacobian per
   feature (2 features, central: 4 simulator calls on the whole batch);
2. the torch twin of the simulator, with autograd;
3. the recipe users hand-write today: an ``autograd.Function`` whose backward takes the
   Jacobian of the whole batch, ``torch.autograd.functional.jacobian`` style, by central
   differences over every one of the 128 input elements (256 simulator calls).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ._timing import measure_all, table

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "scripts" / "training_curves.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("training_curves", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hand_written(simulate: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """The recipe: a Function whose backward is a dense finite-difference Jacobian."""

    class Simulate(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(x)
            return simulate(x.detach())

        @staticmethod
        def backward(ctx: Any, grad_out: torch.Tensor) -> torch.Tensor:
            (x,) = ctx.saved_tensors
            flat = x.detach().flatten()
            h = torch.finfo(x.dtype).eps ** (1 / 3) * flat.abs().clamp_min(1.0)
            columns = []
            for i in range(flat.numel()):
                up, down = flat.clone(), flat.clone()
                up[i] += h[i]
                down[i] -= h[i]
                diff = simulate(up.view_as(x)) - simulate(down.view_as(x))
                columns.append((diff / (2 * h[i])).flatten())
            jacobian = torch.stack(columns, dim=1)  # (outputs, inputs)
            return (grad_out.flatten() @ jacobian).view_as(x)

    return Simulate.apply  # type: ignore[no-any-return]


def report(quick: bool) -> str:
    example = _example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    batch = 64
    simulators = {
        "jacfd.differentiable(batch_dim=0)": example.simulate_fd,
        "torch twin, autograd": example.simulate_torch,
        "hand-written Function, dense FD Jacobian": hand_written(example.simulate_numpy),
    }
    steps = {}
    for name, simulator in simulators.items():
        model = example.make_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        target = example.targets(0, batch)

        def step(
            model: Any = model, optimizer: Any = optimizer, simulator: Any = simulator
        ) -> None:
            optimizer.zero_grad()
            example.loss_fn(model, simulator, target).backward()
            optimizer.step()

        steps[name] = step
    try:
        timings = measure_all(steps, quick, rounds=1 if quick else 3)
    finally:
        torch.set_num_threads(threads)
    base = timings["jacfd.differentiable(batch_dim=0)"].median
    rows = [
        [name, timing.short(), f"{timing.median / base:.2f}"] for name, timing in timings.items()
    ]
    notes = (__doc__ or "").split("\n\n", 1)[1].strip()
    return "\n\n".join(
        [notes, table(["gradient of the simulator", "time per step", "/ differentiable"], rows)]
    )
