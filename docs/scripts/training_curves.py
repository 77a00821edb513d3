"""Training through a numpy simulator with ``jacfd.differentiable``, against its torch twin.

A small network reads a target point and proposes a launch velocity; a numpy
simulator (a projectile with quadratic drag, 50 fixed RK4 steps) flies it for one
second; the loss is the squared miss distance. The simulator is a black box to
autograd, so the network trains through ``jacfd.differentiable(simulate,
batch_dim=0, strategy="loop")``: one 2x2 Jacobian per sample, from 4 simulator calls
on the whole batch. The twin is the same simulator written in torch, trained with
autograd from the same initial weights and the same batches.

Prints the final losses and the time per step, and saves the two training curves
to ``docs/img/training.png``. ``--steps`` sets the number of Adam steps (default 300).

Usage: ``python docs/scripts/training_curves.py [--steps N] [--no-plot]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import jacfd

GRAVITY, DRAG, DT, STEPS = 9.81, 0.3, 0.02, 50


def simulate_numpy(velocity: torch.Tensor) -> torch.Tensor:
    """Where a projectile launched from the origin with ``velocity`` (B, 2) is after
    one second, with drag ``-DRAG |v| v``: numpy, invisible to autograd."""
    v = velocity.numpy().copy()
    p = np.zeros_like(v)

    def rate(p: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        speed = np.sqrt((v**2).sum(axis=1, keepdims=True))
        return v, -DRAG * speed * v - np.array([0.0, GRAVITY])

    for _ in range(STEPS):
        k1 = rate(p, v)
        k2 = rate(p + DT / 2 * k1[0], v + DT / 2 * k1[1])
        k3 = rate(p + DT / 2 * k2[0], v + DT / 2 * k2[1])
        k4 = rate(p + DT * k3[0], v + DT * k3[1])
        p = p + DT / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        v = v + DT / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return torch.from_numpy(p)


def simulate_torch(velocity: torch.Tensor) -> torch.Tensor:
    """The same simulator in torch: the differentiable twin."""
    v = velocity
    p = torch.zeros_like(v)
    g = torch.tensor([0.0, GRAVITY], dtype=v.dtype)

    def rate(p: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        speed = v.pow(2).sum(dim=1, keepdim=True).sqrt()
        return v, -DRAG * speed * v - g

    for _ in range(STEPS):
        k1 = rate(p, v)
        k2 = rate(p + DT / 2 * k1[0], v + DT / 2 * k1[1])
        k3 = rate(p + DT / 2 * k2[0], v + DT / 2 * k2[1])
        k4 = rate(p + DT * k3[0], v + DT * k3[1])
        p = p + DT / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        v = v + DT / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return p


# The black box, differentiable: per-sample Jacobians (the samples do not interact).
simulate_fd = jacfd.differentiable(simulate_numpy, batch_dim=0, strategy="loop")


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)
    ).double()


def targets(step: int, batch: int) -> torch.Tensor:
    """A batch of targets: x in [1, 3] m, y in [-0.5, 0.5] m (the same for both runs)."""
    g = torch.Generator().manual_seed(1000 + step)
    low = torch.tensor([1.0, -0.5], dtype=torch.float64)
    return low + torch.rand(batch, 2, dtype=torch.float64, generator=g) * torch.tensor(
        [2.0, 1.0], dtype=torch.float64
    )


def loss_fn(
    model: torch.nn.Module, simulator: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor
) -> torch.Tensor:
    # The network proposes a velocity around a rough guess (5 m/s up and along x).
    velocity = model(target) + torch.tensor([3.0, 5.0], dtype=torch.float64)
    return (simulator(velocity) - target).pow(2).sum(dim=1).mean()


def train(
    simulator: Callable[[torch.Tensor], torch.Tensor],
    steps: int,
    batch: int = 64,
    lr: float = 1e-2,
) -> tuple[list[float], float]:
    """Adam on the miss distance; returns the losses and the seconds per step."""
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model, simulator, targets(step, batch))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, (time.perf_counter() - start) / steps


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for (label, losses), style in zip(curves.items(), ("-", "--")):
        ax.semilogy(losses, style, label=label)
    ax.set_xlabel("Adam step")
    ax.set_ylabel("mean squared miss (m²)")
    ax.set_title("Training through a numpy simulator")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--no-plot", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)
    fd_losses, fd_time = train(simulate_fd, options.steps)
    twin_losses, twin_time = train(simulate_torch, options.steps)
    print(f"torch {torch.__version__}, {options.steps} steps, batch 64, threads=1\n")
    print("| simulator | gradients | final loss (m²) | time per step |")
    print("|---|---|---|---|")
    print(f"| numpy | jacfd.differentiable | {fd_losses[-1]:.3g} | {fd_time * 1e3:.2f} ms |")
    print(f"| torch twin | autograd | {twin_losses[-1]:.3g} | {twin_time * 1e3:.2f} ms |")
    gap = max(abs(a - b) / b for a, b in zip(fd_losses, twin_losses))
    print(f"\nlargest relative gap between the two curves: {gap:.1e}")
    if not options.no_plot:
        path = Path(__file__).resolve().parent.parent / "img" / "training.png"
        plot(
            {"numpy + jacfd.differentiable": fd_losses, "torch twin + autograd": twin_losses}, path
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
