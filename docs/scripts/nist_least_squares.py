"""jacfd as the Jacobian of a least-squares solver on NIST's certified problems (issue 15).

Runs ``scipy.optimize.least_squares(method="lm")`` on the 27 nonlinear-regression
problems of NIST's Statistical Reference Datasets (StRD), from both certified starting
values, with the Jacobian given by each method below, and counts the digits of the
result that agree with NIST's certified parameters (the log relative error, LRE,
``-log10(|b - b_cert| / |b_cert|)``, minimum over the parameters, capped at 11). The
parameters span 5.6e-9 (Nelson's b2) to 1e4.

Methods: ``torch.func.jacrev`` (analytic), jacfd central with the default step
(``max(1, |x|)`` scale), ``order=4``, the complex step, ``jacfd_with_error``'s
extrapolated Jacobian, and candidate default step rules written as ``typical=`` (the
step scale is ``max(|x|, typical)``: ``typical=1`` is today's default, a smaller floor is
closer to a relative step, ``typical=|x|`` is purely relative with 1 where x = 0,
``typical=min(1, 30|x|)`` relative below 1/30 and absolute above, ``|x|^(2/3)`` between).

A run is *solvable* when the analytic Jacobian reaches LRE >= 4 from that start; on the
solvable runs a method *fails* when its LRE is below 4. Also measured at the certified
parameters: the error of each method's Jacobian per column relative to the column's
largest entry; and at both starts and the certified parameters, whether
``jacfd_with_error``'s estimate bounds the error of every entry.

The data (public domain, NIST ITL, https://www.itl.nist.gov/div898/strd/nls/nls_main.shtml)
are in ``nist_strd.json`` next to this script: for each problem both starting points,
the certified parameters (as printed) and the observations.

Usage: ``PYTHONPATH=. python docs/scripts/nist_least_squares.py [--methods a,b,...]``
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import least_squares

from jacfd import jacfd, jacfd_with_error

F64 = torch.float64
DATA = Path(__file__).with_name("nist_strd.json")
Model = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]
PI = math.pi


def _gauss(b: Any, x: Any) -> Any:
    return (
        b[0] * torch.exp(-b[1] * x)
        + b[2] * torch.exp(-((x - b[3]) ** 2) / b[4] ** 2)
        + b[5] * torch.exp(-((x - b[6]) ** 2) / b[7] ** 2)
    )


def _lanczos(b: Any, x: Any) -> Any:
    return b[0] * torch.exp(-b[1] * x) + b[2] * torch.exp(-b[3] * x) + b[4] * torch.exp(-b[5] * x)


def _chwirut(b: Any, x: Any) -> Any:
    return torch.exp(-b[0] * x) / (b[1] + b[2] * x)


def _rational3(b: Any, x: Any) -> Any:
    return (b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3) / (
        1 + b[4] * x + b[5] * x**2 + b[6] * x**3
    )


def _enso(b: Any, x: Any) -> Any:
    return (
        b[0]
        + b[1] * torch.cos(2 * PI * x / 12)
        + b[2] * torch.sin(2 * PI * x / 12)
        + b[4] * torch.cos(2 * PI * x / b[3])
        + b[5] * torch.sin(2 * PI * x / b[3])
        + b[7] * torch.cos(2 * PI * x / b[6])
        + b[8] * torch.sin(2 * PI * x / b[6])
    )


# The models as NIST states them (b1..bk are b[0]..b[k-1]); xs[0] is x (Nelson: x1, x2).
MODELS: dict[str, Callable[[Any, list[Any]], Any]] = {
    "Misra1a": lambda b, xs: b[0] * (1 - torch.exp(-b[1] * xs[0])),
    "Chwirut2": lambda b, xs: _chwirut(b, xs[0]),
    "Chwirut1": lambda b, xs: _chwirut(b, xs[0]),
    "Lanczos3": lambda b, xs: _lanczos(b, xs[0]),
    "Gauss1": lambda b, xs: _gauss(b, xs[0]),
    "Gauss2": lambda b, xs: _gauss(b, xs[0]),
    "DanWood": lambda b, xs: b[0] * xs[0] ** b[1],
    "Misra1b": lambda b, xs: b[0] * (1 - (1 + b[1] * xs[0] / 2) ** (-2)),
    "Kirby2": lambda b, xs: (
        (b[0] + b[1] * xs[0] + b[2] * xs[0] ** 2) / (1 + b[3] * xs[0] + b[4] * xs[0] ** 2)
    ),
    "Hahn1": lambda b, xs: _rational3(b, xs[0]),
    "Nelson": lambda b, xs: b[0] - b[1] * xs[0] * torch.exp(-b[2] * xs[1]),  # log(y)
    "MGH17": lambda b, xs: (
        b[0] + b[1] * torch.exp(-xs[0] * b[3]) + b[2] * torch.exp(-xs[0] * b[4])
    ),
    "Lanczos1": lambda b, xs: _lanczos(b, xs[0]),
    "Lanczos2": lambda b, xs: _lanczos(b, xs[0]),
    "Gauss3": lambda b, xs: _gauss(b, xs[0]),
    "Misra1c": lambda b, xs: b[0] * (1 - (1 + 2 * b[1] * xs[0]) ** (-0.5)),
    "Misra1d": lambda b, xs: b[0] * b[1] * xs[0] * ((1 + b[1] * xs[0]) ** (-1)),
    "Roszman1": lambda b, xs: b[0] - b[1] * xs[0] - torch.atan(b[2] / (xs[0] - b[3])) / PI,
    "ENSO": lambda b, xs: _enso(b, xs[0]),
    "MGH09": lambda b, xs: b[0] * (xs[0] ** 2 + xs[0] * b[1]) / (xs[0] ** 2 + xs[0] * b[2] + b[3]),
    "Thurber": lambda b, xs: _rational3(b, xs[0]),
    "BoxBOD": lambda b, xs: b[0] * (1 - torch.exp(-b[1] * xs[0])),
    "Rat42": lambda b, xs: b[0] / (1 + torch.exp(b[1] - b[2] * xs[0])),
    "MGH10": lambda b, xs: b[0] * torch.exp(b[1] / (xs[0] + b[2])),
    "Eckerle4": lambda b, xs: (b[0] / b[1]) * torch.exp(-0.5 * ((xs[0] - b[2]) / b[1]) ** 2),
    "Rat43": lambda b, xs: b[0] / ((1 + torch.exp(b[1] - b[2] * xs[0])) ** (1 / b[3])),
    "Bennett5": lambda b, xs: b[0] * (b[1] + xs[0]) ** (-1 / b[2]),
}


class Problem:
    def __init__(self, name: str, entry: dict[str, Any]) -> None:
        self.name = name
        self.starts = [np.array(entry["start1"]), np.array(entry["start2"])]
        self.certified = np.array([float(c) for c in entry["certified"]])
        y = torch.tensor([float(v) for v in entry["y"].split()], dtype=F64)
        self.y = torch.log(y) if name == "Nelson" else y
        self.xs = [torch.tensor([float(v) for v in col.split()], dtype=F64) for col in entry["x"]]
        self.model = MODELS[name]

    def residual(self, b: torch.Tensor) -> torch.Tensor:
        return self.model(b, self.xs) - self.y


def load() -> list[Problem]:
    return [Problem(name, entry) for name, entry in json.loads(DATA.read_text()).items()]


def relative(b: torch.Tensor) -> torch.Tensor:
    """Purely relative: |x|, and 1 where x = 0."""
    return torch.where(b == 0, torch.ones_like(b), b.abs())


def ramp(b: torch.Tensor) -> torch.Tensor:
    """``min(1, 30 |x|)``, at least 1e-6, and 1 where x = 0: the step scale
    ``max(|x|, typical)`` is relative below |x| = 1/30 and absolute above."""
    return torch.where(b == 0, torch.ones_like(b), (30 * b.abs()).clamp(1e-6, 1.0))


# label -> Jacobian of a residual, as a function of the parameters (float64 tensors).
def methods() -> dict[str, Callable[[Callable[..., Any], torch.Tensor], torch.Tensor]]:
    return {
        "analytic": lambda f, b: torch.func.jacrev(f)(b),
        "central (default)": lambda f, b: jacfd(f)(b),
        "central, order=4": lambda f, b: jacfd(f, order=4)(b),
        "complex": lambda f, b: jacfd(f, scheme="complex")(b),
        "jacfd_with_error": lambda f, b: jacfd_with_error(f)(b)[0],
        "central, typical=1e-2": lambda f, b: jacfd(f, typical=1e-2)(b),
        "central, typical=1e-4": lambda f, b: jacfd(f, typical=1e-4)(b),
        "central, typical=1e-8": lambda f, b: jacfd(f, typical=1e-8)(b),
        "central, typical=|x|": lambda f, b: jacfd(f, typical=relative(b))(b),
        # relative below 1/30, absolute above: the best rule of |x| alone measured
        "central, typical=min(1, 30|x|)": lambda f, b: jacfd(f, typical=ramp(b))(b),
        "central, typical=|x|^(2/3)": lambda f, b: jacfd(f, typical=relative(b) ** (2 / 3))(b),
        "order=4, typical=|x|": lambda f, b: jacfd(f, order=4, typical=relative(b))(b),
    }


def lre(b: np.ndarray, certified: np.ndarray) -> float:
    """Digits that agree with the certified values: min over parameters, in [0, 11]."""
    if not np.all(np.isfinite(b)):
        return 0.0
    with np.errstate(divide="ignore"):
        digits = -np.log10(np.abs(b - certified) / np.abs(certified))
    return float(np.clip(digits, 0.0, 11.0).min())


def solve(problem: Problem, start: np.ndarray, jac: Callable[..., torch.Tensor]) -> float:
    def fun(b: np.ndarray) -> np.ndarray:
        return problem.residual(torch.from_numpy(b)).numpy()

    def jacobian(b: np.ndarray) -> np.ndarray:
        return jac(problem.residual, torch.from_numpy(b.copy())).detach().numpy()

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            result = least_squares(
                fun, start, jac=jacobian, method="lm", ftol=1e-15, xtol=1e-15, gtol=1e-15
            )
    except (ValueError, np.linalg.LinAlgError, RuntimeError):
        return 0.0
    return lre(result.x, problem.certified)


def column_error(jac: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per column: max|J - J_ref| / max|J_ref|."""
    return ((jac - ref).abs().amax(0) / ref.abs().amax(0)).nan_to_num(nan=math.inf)


def runs_table(problems: list[Problem], labels: list[str]) -> str:
    table = methods()
    digits: dict[str, list[float]] = {label: [] for label in ["analytic", *labels]}
    worst: dict[str, list[str]] = {label: [] for label in labels}
    for problem in problems:
        for k, start in enumerate(problem.starts):
            for label in digits:
                digits[label].append(solve(problem, start, table[label]))
            if digits["analytic"][-1] < 4:
                continue
            for label in labels:
                if digits[label][-1] < 4:
                    worst[label].append(f"{problem.name}/{k + 1}")
    solvable = [i for i, d in enumerate(digits["analytic"]) if d >= 4]
    base = [digits["analytic"][i] for i in solvable]
    lines = [
        f"{len(solvable)} of {len(digits['analytic'])} runs solvable (analytic LRE >= 4), "
        f"analytic mean LRE {statistics.mean(base):.1f}.",
        "",
        "| Jacobian | failures (LRE < 4) | mean LRE | digits short of analytic | failed runs |",
        "|---|---:|---:|---:|---|",
    ]
    for label in labels:
        mine = [digits[label][i] for i in solvable]
        short = statistics.mean(a - m for a, m in zip(base, mine))
        lines.append(
            f"| {label} | {len(worst[label])} | {statistics.mean(mine):.1f} | {short:.1f} | "
            f"{', '.join(worst[label]) or '-'} |"
        )
    return "\n".join(lines)


def certified_table(problems: list[Problem], labels: list[str]) -> str:
    """The Jacobian at the certified parameters: worst column error over the problems."""
    table = methods()
    lines = [
        "| Jacobian at the certified parameters | median of worst column error | "
        "problems with a column error > 1e-4 |",
        "|---|---:|---:|",
    ]
    misses, ratios = 0, []
    for label in labels:
        errors, bad = [], []
        for problem in problems:
            b = torch.tensor(problem.certified, dtype=F64)
            ref = torch.func.jacrev(problem.residual)(b)
            err = column_error(table[label](problem.residual, b), ref).max().item()
            errors.append(err)
            if err > 1e-4:
                bad.append(problem.name)
        lines.append(
            f"| {label} | {statistics.median(errors):.1e} | {len(bad)}: {', '.join(bad) or '-'} |"
        )
    total, infinite, pessimism = 0, [], []
    for problem in problems:
        points = {"start 1": problem.starts[0], "start 2": problem.starts[1]}
        for where, point in {**points, "certified": problem.certified}.items():
            b = torch.tensor(point, dtype=F64)
            ref = torch.func.jacrev(problem.residual)(b)
            J, est = jacfd_with_error(problem.residual)(b)
            actual = (J - ref).abs()
            misses += int((actual > est).sum())
            total += actual.numel()
            finite = torch.isfinite(est)
            ratios.append(float((actual / est)[finite].max()))
            pessimism.append((est / actual)[finite & (actual > 0)])
            columns = (~finite).all(0).nonzero().flatten().tolist()
            if columns:
                infinite.append(
                    f"{problem.name} ({where}): b{', b'.join(str(c + 1) for c in columns)}"
                )
    return (
        "\n".join(lines)
        + f"\n\njacfd_with_error at both starts and the certified parameters: {misses} of {total}"
        f" entries above their estimate; worst error / estimate {max(ratios):.2g}; median"
        f" estimate / error {torch.cat(pessimism).median().item():.0f}; columns marked inf (step"
        f" beyond the Taylor region): {'; '.join(infinite) or '-'}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", help="comma-separated labels (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    labels = [m for m in methods() if m != "analytic"]
    if args.methods:
        labels = args.methods.split(",")
    problems = load()
    start = time.perf_counter()
    print(runs_table(problems, labels))
    print()
    print(certified_table(problems, labels))
    print(
        f"\n_Generated by `docs/scripts/nist_least_squares.py` with torch {torch.__version__}"
        f" in {time.perf_counter() - start:.0f} s._"
    )


if __name__ == "__main__":
    main()
