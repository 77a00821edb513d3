"""Checking a hand-written backward: ``jacfd.check_grad`` against
``torch.autograd.gradcheck`` (default settings, float64) on a classic
``torch.autograd.Function`` computing ``y = A @ tanh(x)`` with 64 outputs."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from jacfd import check_grad

from ._timing import measure, table


class TanhMatVec(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(x)
        ctx.save_for_backward(t, a)
        return a @ t

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        t, a = ctx.saved_tensors
        return (a.T @ grad) * (1 - t * t), None


def report(quick: bool) -> str:
    torch.manual_seed(0)
    rows = []
    for n in (64,) if quick else (256, 1024):
        a = torch.randn(64, n, dtype=torch.float64) / n**0.5
        x = torch.randn(n, dtype=torch.float64)
        xg = x.clone().requires_grad_()
        ours = check_grad(TanhMatVec.apply, x, a).passed
        t_ours = measure(partial(check_grad, TanhMatVec.apply, x, a), quick)
        theirs = torch.autograd.gradcheck(TanhMatVec.apply, (xg, a), raise_exception=False)
        t_theirs = measure(
            partial(torch.autograd.gradcheck, TanhMatVec.apply, (xg, a), raise_exception=False),
            quick,
        )
        rows.append(
            [
                f"{n} -> 64",
                t_ours.short(),
                ours,
                t_theirs.short(),
                theirs,
                f"{t_theirs.median / t_ours.median:.1f}x",
            ]
        )
    return "\n\n".join(
        [
            "### Gradient check of a custom autograd.Function, `y = A @ tanh(x)` (float64)",
            table(
                ["inputs -> outputs", "check_grad", "passed", "gradcheck", "passed", "speed-up"],
                rows,
            ),
        ]
    )


if __name__ == "__main__":
    import sys

    print(report("--quick" in sys.argv))
