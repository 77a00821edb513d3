"""Do the error estimates bound the true error? ``jacfd_with_error`` (steps h, 2h)
against ``jacfd_adaptive`` (h/4 ... 8h, a step per column), and ``hessfd_with_error``.

For each zoo member (float32 networks and smooth functions, in float32 and float64)
and 3 seeds: the fraction of Jacobian entries whose estimate is at least the true
error (against ``torch.func.jacrev`` of the float64 function), the median of
estimate / true error (entries with a nonzero true error), and the evaluations of
func per call (points). ``--write`` puts the tables into ``docs/accuracy.md``
between the ``error-bounds`` markers.

Then ``hessfd_with_error``'s points per call, and both transforms near a bound
(``bounds=(0, 2)``, func raising outside it).

Usage: ``python docs/scripts/error_bounds_report.py [--write]``
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import hessian, jacrev

from jacfd import hessfd_with_error, jacfd_adaptive, jacfd_with_error

DOCS = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- error-bounds:begin -->", "<!-- error-bounds:end -->"
SEEDS = 3
Case = Callable[[torch.dtype, int], tuple[Any, Any, torch.Tensor]]


def _mlp(act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 8))


def _conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(512, 10),
    )


def _decoder() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 256), nn.Sigmoid())


def _network(builder: Callable[[], nn.Module], shape: tuple[int, ...]) -> Case:
    def case(dtype: torch.dtype, seed: int) -> tuple[Any, Any, torch.Tensor]:
        torch.manual_seed(seed)
        model = builder().eval()
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1000))
        return copy.deepcopy(model).to(dtype), copy.deepcopy(model).double(), x.to(dtype)

    return case


def _function(fun: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]) -> Case:
    def case(dtype: torch.dtype, seed: int) -> tuple[Any, Any, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * 3
        return fun, fun, x.to(dtype)

    return case


ZOO: dict[str, Case] = {
    "tanh MLP 16-64-64-8": _network(lambda: _mlp(nn.Tanh), (16,)),
    "GELU MLP 16-64-64-8": _network(lambda: _mlp(nn.GELU), (16,)),
    "smooth conv 3x8x8 -> 10": _network(_conv, (1, 3, 8, 8)),
    "decoder 8 -> 256": _network(_decoder, (8,)),
    "tanh": _function(torch.tanh, (5,)),
    "sin": _function(torch.sin, (3, 4)),
    "exp": _function(torch.exp, (4,)),
    "softmax": _function(lambda x: torch.softmax(x, -1), (2, 5)),
    "cubic": _function(lambda x: x**3 - 2 * x, (2, 3)),
    "sum(sin(x) x)": _function(lambda x: (torch.sin(x) * x).sum(), (3, 2)),
    "softplus(x) sum(cos x)": _function(
        lambda x: nn.functional.softplus(x) * torch.cos(x).sum(), (6,)
    ),
    "1/(1+x^2) + prod(x)": _function(lambda x: 1 / (1 + x**2) + x.prod(), (4,)),
}


def measure(transform: Callable[..., Any], case: Case, dtype: torch.dtype) -> tuple[float, ...]:
    """(fraction bounded, median estimate/error, evaluations per column)."""
    bounded = total = 0
    ratios, evaluations = [], 0.0
    for seed in range(SEEDS):
        func, func64, x = case(dtype, seed)
        with torch.no_grad():
            result = transform(func)(x)
        jac, error = result[0], result[1]
        evaluations = float(result[2].evaluations) / x.numel() if len(result) > 2 else 4.0
        true = (jac.double() - jacrev(func64)(x.double())).abs().flatten()
        estimate = error.double().flatten()
        bounded += int((estimate >= true).sum())
        total += true.numel()
        ratios.append(estimate[true > 0] / true[true > 0])
    return bounded / total, torch.cat(ratios).median().item(), evaluations


def jacobian_table() -> str:
    lines = [
        "| function | dtype | `jacfd_with_error`: bounded / median ratio / evals per column "
        "| `jacfd_adaptive`: bounded / median ratio / evals per column "
        "| `jacfd_adaptive(rtol=1e-3 or 1e-8)`: evals per column |",
        "|---|---|---:|---:|---:|",
    ]
    pooled: dict[str, list[float]] = {}
    for dtype in (torch.float64, torch.float32):
        tol = 1e-8 if dtype == torch.float64 else 1e-3
        for name, case in ZOO.items():
            before = measure(jacfd_with_error, case, dtype)
            after = measure(jacfd_adaptive, case, dtype)
            early = measure(lambda f, tol=tol: jacfd_adaptive(f, rtol=tol), case, dtype)
            pooled.setdefault(f"before {dtype}", []).append(before[0])
            pooled.setdefault(f"after {dtype}", []).append(after[0])
            lines.append(
                f"| {name} | {str(dtype)[6:]} | {100 * before[0]:.1f}% / {before[1]:.0f} / "
                f"{before[2]:.0f} | {100 * after[0]:.1f}% / {after[1]:.0f} / {after[2]:.0f} "
                f"| {early[2]:.1f} |"
            )
    return "\n".join(lines)


SECOND: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "sin(x0) sum(exp x)": (lambda x: torch.sin(x[0]) * torch.exp(x[1:]).sum(), 4),
    "softplus(x) sum(cos x)": (lambda x: nn.functional.softplus(x) * torch.cos(x).sum(), 4),
    "1/(1+x.x) + prod(x)": (lambda x: 1 / (1 + (x**2).sum()) + x.prod(), 3),
    "logsumexp(x) x0": (lambda x: torch.logsumexp(x, 0) * x[0], 5),
}


def _counted(f: Callable[[torch.Tensor], torch.Tensor], points: list[int]) -> Any:
    """f, adding the number of points of every call (strategy="loop": one each)."""

    def counted(x: torch.Tensor) -> torch.Tensor:
        points[0] += 1
        return f(x)

    return counted


def second_table() -> str:
    lines = [
        "| function | part | bounded | median ratio | points (calls of f) |",
        "|---|---|---:|---:|---:|",
    ]
    for part in ("full", "diagonal", "laplacian"):
        for name, (f, n) in SECOND.items():
            bounded = total = 0
            ratios = []
            points = [0]
            hessfd_with_error(_counted(f, points), part=part, strategy="loop")(torch.zeros(n))  # type: ignore[arg-type]
            for seed in range(5):
                g = torch.Generator().manual_seed(seed)
                x = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 2
                value, error = hessfd_with_error(f, part=part)(x)  # type: ignore[arg-type]
                exact = hessian(f)(x)
                if part != "full":
                    exact = torch.diagonal(exact, dim1=-2, dim2=-1)
                    exact = exact.sum(-1) if part == "laplacian" else exact
                true, estimate = (value - exact).abs().flatten(), error.flatten()
                bounded += int((estimate >= true).sum())
                total += true.numel()
                ratios.append(estimate[true > 0] / true[true > 0])
            median = torch.cat(ratios).median().item()
            lines.append(
                f"| {name} | {part} | {100 * bounded / total:.0f}% | {median:.0f} "
                f"| {points[0]} (1) |"
            )
    return "\n".join(lines)


def _inside(f: Callable[[torch.Tensor], torch.Tensor], lower: float, upper: float) -> Any:
    def checked(x: torch.Tensor) -> torch.Tensor:
        if bool((x < lower).any() | (x > upper).any()):
            raise AssertionError("evaluated outside the bounds")
        return f(x)

    return checked


def _ratios(value: Any, error: Any, exact: Any) -> tuple[float, float, float]:
    """(fraction of entries bounded, median estimate / true error, largest true
    error / estimate)."""
    true, estimate = (value - exact).abs().flatten(), error.flatten()
    nonzero = true > 0
    return (
        float((estimate >= true).double().mean()),
        float((estimate[nonzero] / true[nonzero]).median()),
        float((true / estimate).max()),
    )


def bounds_table() -> str:
    """Near a bound: x at, near and far from the bounds [0, 2] (float64); func raises
    outside them, so every row also shows that no point left them."""
    lines = [
        "| transform | function at x = 0, 1e-6, 1e-3, 0.5, 2 | options | bounded "
        "| median estimate / error | largest error / estimate | points |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    x = torch.tensor([0.0, 1e-6, 1e-3, 0.5, 2.0], dtype=torch.float64)

    def jacobian_rows(name: str, f: Callable[[torch.Tensor], torch.Tensor], x: Any) -> None:
        exact = jacrev(f)(x)
        labels = ("central", "rtol=1e-8", "forward", "order=4")
        for label, options in zip(
            labels, ({}, {"rtol": 1e-8}, {"scheme": "forward"}, {"order": 4})
        ):
            transform = jacfd_adaptive(
                _inside(f, 0.0, 2.0), bounds=(0.0, 2.0), strategy="loop", **options
            )
            jac, error, info = transform(x)
            bounded, median, worst = _ratios(jac, error, exact)
            lines.append(
                f"| `jacfd_adaptive` | {name} | {label} | {100 * bounded:.0f}% "
                f"| {median:.0f} | {worst:.2f} | {int(info.evaluations)} |"
            )

    def root(c: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: (torch.log(x + c) + torch.sqrt(x + c) * x.sum()).sum() * x.cos().sum()

    jacobian_rows(
        "log1p(x) + sqrt(x + 0.1) sum(x)", lambda x: torch.log1p(x) + (x + 0.1).sqrt() * x.sum(), x
    )
    for c in (0.1, 0.01):
        f = root(c)
        exact = hessian(f)(x)
        for part in ("full", "diagonal"):
            for scheme, order in (("central", 2), ("central", 4), ("forward", 1)):
                points = [0]
                transform = hessfd_with_error(
                    _counted(_inside(f, 0.0, 2.0), points),
                    scheme=scheme,  # type: ignore[arg-type]
                    order=order,
                    part=part,  # type: ignore[arg-type]
                    bounds=(0.0, 2.0),
                    strategy="loop",
                )
                value, error = transform(x)
                ref = exact if part == "full" else torch.diagonal(exact)
                bounded, median, worst = _ratios(value, error, ref)
                lines.append(
                    f"| `hessfd_with_error` ({part}) | (log(x + {c}) + sqrt(x + {c}) sum(x)) "
                    f"sum(cos x) | {scheme}, order={order} | {100 * bounded:.0f}% | {median:.0f} "
                    f"| {worst:.2f} | {points[0]} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update docs/accuracy.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = (
        f"{BEGIN}\n#### Jacobians: fraction of entries bounded, median estimate / true error, "
        f"evaluations\n\n{jacobian_table()}\n\n#### Second derivatives (float64)\n\n"
        f"{second_table()}\n\n#### Near a bound (float64)\n\n{bounds_table()}\n{END}"
    )
    print(text)
    if args.write:
        path = DOCS / "accuracy.md"
        doc = path.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        path.write_text(pattern.sub(lambda _: text, doc))


if __name__ == "__main__":
    main()
