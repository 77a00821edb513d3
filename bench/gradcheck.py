"""Checking a hand-written backward: ``jacfd.check_grad`` against
``torch.autograd.gradcheck`` (default settings, float64) on a classic
``torch.autograd.Function`` computing ``y = A @ tanh(x)`` with 64 outputs, once
with a correct backward and once with one wrong Jacobian entry (off by 1%)."""

from __future__ import annotations

from typing import Any

import torch

from jacfd import check_grad

from ._timing import measure_all, table


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


class TanhMatVecOneWrongEntry(TanhMatVec):
    """d y[3] / d x[5] is 1% off."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        t, a = ctx.saved_tensors
        result = (a.T @ grad) * (1 - t * t)
        result[5] += 0.01 * a[3, 5] * (1 - t[5] * t[5]) * grad[3]
        return result, None


def report(quick: bool) -> str:
    torch.manual_seed(0)
    rows = []
    for n in (64,) if quick else (256, 1024):
        a = torch.randn(64, n, dtype=torch.float64) / n**0.5
        x = torch.randn(n, dtype=torch.float64)
        xg = x.clone().requires_grad_()
        for function, label in (
            (TanhMatVec, "correct"),
            (TanhMatVecOneWrongEntry, "one wrong entry"),
        ):
            ours = check_grad(function.apply, x, a)
            theirs = torch.autograd.gradcheck(function.apply, (xg, a), raise_exception=False)
            times = measure_all(
                {
                    "ours": lambda f=function: check_grad(f.apply, x, a),
                    "theirs": lambda f=function: torch.autograd.gradcheck(
                        f.apply, (xg, a), raise_exception=False
                    ),
                },
                quick,
            )
            rows.append(
                [
                    f"{n} -> 64",
                    label,
                    times["ours"].short(),
                    "passed" if ours.passed else "FAILED",
                    times["theirs"].short(),
                    "passed" if theirs else "FAILED",
                    f"{times['theirs'].median / times['ours'].median:.1f}x",
                ]
            )
    return "\n\n".join(
        [
            "### Gradient check of a custom autograd.Function, `y = A @ tanh(x)` (float64)",
            (
                "`check_grad` with its defaults: `J @ u` along two random directions, and "
                "every entry only when they disagree (which the wrong entry makes them do, "
                "so that the report can name it)."
            ),
            table(
                [
                    "inputs -> outputs",
                    "backward",
                    "check_grad",
                    "verdict",
                    "gradcheck",
                    "verdict",
                    "speed-up",
                ],
                rows,
            ),
        ]
    )


if __name__ == "__main__":
    import sys

    print(report("--quick" in sys.argv))
