"""The training example of docs/training.md: a network trained through a numpy
simulator with ``jacfd.differentiable`` learns, and its gradients are the torch
twin's autograd gradients to the accuracy of central differences."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "scripts" / "training_curves.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("training_curves", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gradients_match_the_twin() -> None:
    example = _example()
    grads = []
    for simulator in (example.simulate_fd, example.simulate_torch):
        model = example.make_model()
        example.loss_fn(model, simulator, example.targets(0, 8)).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    fd, twin = grads
    assert (fd - twin).abs().max() <= 1e-8 * twin.abs().max()
    assert twin.abs().max() > 1e-2  # not vacuous: the network's gradients are not zero


def test_loss_decreases() -> None:
    example = _example()
    losses, _ = example.train(example.simulate_fd, steps=25, batch=8, lr=2e-2)
    assert losses[-1] < 0.3 * losses[0]
