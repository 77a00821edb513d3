"""The benchmark suite: jacfd against torch.func and against its own limit.

Seven cases (MLPs from tiny to decoder-like, per-sample Jacobians of a conv net,
a Jacobian with respect to parameters, a Hessian as ``jacfd(grad(f))``), timed
in float32 and float64, with the peak memory of one call measured in a fresh
process per (case, method), and a ``chunk_size`` sweep. ``python -m bench``
writes the tables, with an introduction to every column, to ``docs/benchmarks.md``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.autograd.functional import hessian as autograd_hessian
from torch.autograd.functional import jacobian as autograd_jacobian
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap
from torch.utils._pytree import tree_leaves

from jacfd import jacfd

from ._memory import in_fresh_processes, peak_rise_mb
from ._timing import Timing, measure, measure_all, table

Call = tuple[Callable[..., Any], tuple[Any, ...]]
"""A function and the arguments to time it on."""
Transform = Callable[[Callable[..., Any]], Callable[..., Any]]
Cell = Timing | str
nn = torch.nn

FORWARD, CENTRAL, COMPILED = "jacfd forward", "jacfd central", "jacfd forward, compiled"
LIMIT, LIMIT_2N, ONE = "limit (n+1)", "limit (2n)", "f, one point"
COLUMNS = (
    FORWARD,
    CENTRAL,
    COMPILED,
    "jacrev",
    "jacfwd",
    "autograd.functional",
    LIMIT,
    LIMIT_2N,
    ONE,
)
TRANSFORMS: dict[str, Transform] = {
    FORWARD: partial(jacfd, scheme="forward"),
    CENTRAL: partial(jacfd, scheme="central"),
    "jacrev": jacrev,
    "jacfwd": jacfwd,
}
MEMORY_METHODS = (FORWARD, "jacrev", LIMIT)
CHUNK_SIZES = (None, 256, 64, 16)
CHART_METHODS = (FORWARD, CENTRAL, COMPILED, "jacfwd", "autograd.functional", LIMIT)


@dataclass(frozen=True)
class Problem:
    """One case at one dtype: how to call every method on it."""

    label: str
    n: int
    """Differentiated elements (per sample)."""
    m: int
    """Output elements (per sample)."""
    jac: Callable[[Transform], Call]
    """``T -> (T(f), args)`` for a Jacobian transform ``T``."""
    stacked: Callable[[int], Call]
    """``points -> f`` on a stacked batch of ``points`` random stencil points."""
    one: Call
    autograd: Call
    special: dict[str, Call] = field(default_factory=dict)
    """Columns computed otherwise (the Hessian's jacfwd column)."""

    def calls(self) -> dict[str, Call]:
        calls = {name: self.jac(transform) for name, transform in TRANSFORMS.items()}
        calls.update(
            {
                "autograd.functional": self.autograd,
                LIMIT: self.stacked(self.n + 1),
                LIMIT_2N: self.stacked(2 * self.n),
                ONE: self.one,
            }
        )
        return {**calls, **self.special}


def mlp(n: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n, hidden), nn.Tanh(), nn.Linear(hidden, out))


def mlp_problem(label: str, dims: tuple[int, int, int], dtype: torch.dtype) -> Problem:
    n, hidden, out = dims
    model = mlp(*dims).to(dtype).requires_grad_(False)
    x = torch.randn(n, dtype=dtype)
    return Problem(
        f"{label} ({n} -> {hidden} -> {out})",
        n,
        out,
        lambda t: (t(model), (x,)),
        lambda points: (model, (torch.randn(points, n, dtype=dtype),)),
        (model, (x,)),
        (partial(autograd_jacobian, model, vectorize=True), (x,)),
    )


def conv_problem(batch: int, dtype: torch.dtype) -> Problem:
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    cnn = cnn.to(dtype).requires_grad_(False)
    images = torch.randn(batch, 1, 8, 8, dtype=dtype)

    def single(image: torch.Tensor) -> torch.Tensor:
        return cnn(image.unsqueeze(0)).squeeze(0)

    def summed(x: torch.Tensor) -> torch.Tensor:
        return cnn(x).sum(0)

    return Problem(
        f"per-sample conv (B={batch}, 1x8x8 -> 10)",
        64,
        10,
        lambda t: (vmap(t(single)), (images,)),
        lambda points: (cnn, (torch.randn(batch * points, 1, 8, 8, dtype=dtype),)),
        (cnn, (images,)),
        (partial(autograd_jacobian, summed, vectorize=True), (images,)),
    )


def params_problem(dims: tuple[int, int, int], dtype: torch.dtype) -> Problem:
    model = mlp(*dims).to(dtype)  # parameters require grad, as dict(named_parameters()) gives
    params = dict(model.named_parameters())
    x = torch.randn(dims[0], dtype=dtype)
    n = sum(p.numel() for p in params.values())

    def call(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x,))

    def of_tuple(*values: torch.Tensor) -> torch.Tensor:
        return call(dict(zip(params, values)), x)

    def stacked(points: int) -> Call:
        batch = {k: torch.randn(points, *p.shape, dtype=dtype) for k, p in params.items()}
        return vmap(call, in_dims=(0, None)), (batch, x)

    return Problem(
        f"parameters ({dims[0]} -> {dims[1]} -> {dims[2]}, {n} params)",
        n,
        dims[2],
        lambda t: (t(call), (params, x)),
        stacked,
        (call, (params, x)),
        (partial(autograd_jacobian, of_tuple, vectorize=True), (tuple(params.values()),)),
    )


def hessian_problem(n: int, hidden: int, dtype: torch.dtype) -> Problem:
    model = mlp(n, hidden, 1).to(dtype).requires_grad_(False)
    x = torch.randn(n, dtype=dtype)

    def f(x: torch.Tensor) -> torch.Tensor:
        return model(x).squeeze(-1)

    def total(x: torch.Tensor) -> torch.Tensor:
        return f(x).sum()

    return Problem(
        f"Hessian, T(grad(f)) ({n} -> {hidden} -> 1)",
        n,
        n,
        lambda t: (t(grad(f)), (x,)),
        lambda points: (grad(total), (torch.randn(points, n, dtype=dtype),)),
        (grad(f), (x,)),
        (partial(autograd_hessian, f, vectorize=True), (x,)),
        {"jacfwd": (hessian(f), (x,))},
    )


def problems(dtype: torch.dtype, quick: bool) -> list[Problem]:
    """The cases, built with the same seed for each dtype; tiny sizes if ``quick``."""
    torch.manual_seed(0)
    return [
        mlp_problem("tiny MLP", (16, 16, 16), dtype),
        mlp_problem("square MLP", (64, 64, 64) if quick else (512, 512, 512), dtype),
        mlp_problem("classifier", (32, 64, 10) if quick else (128, 256, 10), dtype),
        mlp_problem("decoder", (8, 32, 512) if quick else (32, 256, 4096), dtype),
        conv_problem(8 if quick else 64, dtype),
        params_problem((8, 16, 10) if quick else (32, 64, 10), dtype),
        hessian_problem(16 if quick else 64, 32 if quick else 128, dtype),
    ]


def thunk(call: Call) -> Callable[[], object]:
    fn, args = call
    return lambda: fn(*args)


def time_compiled(call: Call, quick: bool) -> tuple[Cell, str]:
    """(warm timing, cold first call) of ``torch.compile(fn)``, or why it failed."""
    fn, args = call
    # jacfd's code objects recur in every case: stay under the recompile limit.
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            start = time.perf_counter()
            compiled(*args)
            cold = time.perf_counter() - start
            return measure(thunk((compiled, args)), quick), f"{cold:.1f} s"
    except Exception as error:
        return f"failed: {type(error).__name__}", "-"


def time_problem(problem: Problem, quick: bool, compiled: bool) -> dict[str, Cell]:
    """Every column's timing (the cold compile time under ``"compile"``)."""
    calls = problem.calls()
    timings = measure_all(
        {name: thunk(call) for name, call in calls.items()}, quick, 1 if quick else 3
    )
    cells: dict[str, Cell] = dict(timings)
    if compiled:
        cells[COMPILED], cells["compile"] = time_compiled(calls[FORWARD], quick)
    else:
        cells[COMPILED] = cells["compile"] = "skipped"
    return cells


def ratio_value(cells: dict[str, Cell], top: str, bottom: str) -> float | None:
    a, b = cells[top], cells[bottom]
    return a.median / b.median if isinstance(a, Timing) and isinstance(b, Timing) else None


def ratio(cells: dict[str, Cell], top: str, bottom: str, above: float | None = None) -> str:
    """The ratio of medians, in bold when it exceeds ``above``."""
    value = ratio_value(cells, top, bottom)
    if value is None:
        return "n/a"
    return f"**{value:.2f}**" if above is not None and value > above else f"{value:.2f}"


def ratio_row(problem: Problem, cells: dict[str, Cell]) -> list[str]:
    limit = cells[LIMIT]
    costly = isinstance(limit, Timing) and limit.median >= 1e-3
    return [
        problem.label,
        ratio(cells, FORWARD, LIMIT, 1.25 if costly else None),
        ratio(cells, CENTRAL, LIMIT_2N),
        ratio(cells, FORWARD, "jacrev", 1.0 if problem.m >= problem.n else None),
        ratio(cells, FORWARD, "jacfwd", 1.0),
        ratio(cells, COMPILED, LIMIT),
    ]


def short(cell: Cell) -> str:
    return cell.short() if isinstance(cell, Timing) else cell


def time_tables(dtype: torch.dtype, results: list[tuple[Problem, dict[str, Cell]]]) -> str:
    name = str(dtype).removeprefix("torch.")
    times = [[p.label, *(short(c[col]) for col in COLUMNS), c["compile"]] for p, c in results]
    ratios = [ratio_row(p, c) for p, c in results]
    return "\n\n".join(
        [
            f"### Times, {name}",
            table(["case", *COLUMNS, "compile (cold)"], times),
            f"### Ratios, {name} (same run)",
            table(
                [
                    "case",
                    "forward / limit (n+1)",
                    "central / limit (2n)",
                    "forward / jacrev",
                    "forward / jacfwd",
                    "compiled / limit (n+1)",
                ],
                ratios,
            ),
        ]
    )


def nbytes(tree: object) -> int:
    return sum(
        t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)
    )


def expected_bytes(problem: Problem) -> int:
    """Stacked batch (n + 1 points) + f's outputs on it + the Jacobian."""
    fn, args = problem.stacked(problem.n + 1)
    jac_fn, jac_args = problem.jac(TRANSFORMS[FORWARD])
    return nbytes(args) + nbytes(fn(*args)) + nbytes(jac_fn(*jac_args))


def _call_for_memory(problem: Problem, method: str, chunk_size: int | None) -> object:
    if method == LIMIT:
        fn, args = problem.stacked(problem.n + 1)  # building the batch counts
    elif chunk_size is not None:
        fn, args = problem.jac(partial(jacfd, scheme="forward", chunk_size=chunk_size))
    else:
        fn, args = problem.jac(TRANSFORMS[method])
    return fn(*args)


def peak_in_child(case: int, method: str, chunk_size: int | None, quick: bool) -> float:
    """Runs in a fresh process: the peak-RSS rise (MB) of one warm float32 call."""
    torch.set_num_threads(1)
    problem = problems(torch.float32, quick)[case]
    return peak_rise_mb(partial(_call_for_memory, problem, method, chunk_size))


def megabytes(value: float | None) -> str:
    return "skipped" if value is None else "n/a" if math.isnan(value) else f"{value:.2f}"


def memory_tables(quick: bool) -> str:
    """Peak memory per case (float32), and the chunk_size sweep on the square MLP."""
    cases = problems(torch.float32, quick)
    jobs: list[tuple[int, str, int | None]] = [
        (i, m, None) for i in range(len(cases)) for m in MEMORY_METHODS
    ]
    jobs += [(1, FORWARD, c) for c in CHUNK_SIZES[1:]]
    if quick:  # one child only: a smoke test of the machinery
        jobs = jobs[:1]
    peaks = dict(zip(jobs, in_fresh_processes(peak_in_child, [(*job, quick) for job in jobs])))
    rows = []
    for i, problem in enumerate(cases):
        expected = expected_bytes(problem) / 1e6
        jacfd_mb, jacrev_mb, limit_mb = (peaks.get((i, m, None)) for m in MEMORY_METHODS)
        shares = [
            f"{jacfd_mb / bottom:.2f}"
            if jacfd_mb is not None and bottom and bottom >= 1
            else "n/a"
            for bottom in (expected, limit_mb)
        ]
        rows.append(
            [
                problem.label,
                *map(megabytes, (jacfd_mb, jacrev_mb, limit_mb)),
                f"{expected:.2f}",
                *shares,
            ]
        )
    square = cases[1]
    timings = measure_all(
        {
            str(c): thunk(square.jac(partial(jacfd, scheme="forward", chunk_size=c)))
            for c in CHUNK_SIZES
        },
        quick,
    )
    sweep = [
        [str(c), timings[str(c)].short(), megabytes(peaks.get((1, FORWARD, c)))]
        for c in CHUNK_SIZES
    ]
    return "\n\n".join(
        [
            "### Peak memory, float32 (MB)",
            table(
                ["case", *MEMORY_METHODS, "expected", "jacfd / expected", "jacfd / limit"], rows
            ),
            f"### chunk_size sweep: jacfd forward on the {square.label}, float32",
            table(["chunk_size", "time", "peak MB"], sweep),
        ]
    )


def chart(results: list[tuple[Problem, dict[str, Cell]]], path: Path) -> None:
    """Grouped bars: each method's time over jacrev's, per case, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.8), layout="constrained")
    axes = figure.subplots()
    width = 0.8 / len(CHART_METHODS)
    for k, method in enumerate(CHART_METHODS):
        heights = [ratio_value(cells, method, "jacrev") or 0.0 for _, cells in results]
        xs = [i + (k - (len(CHART_METHODS) - 1) / 2) * width for i in range(len(results))]
        axes.bar(xs, heights, width, label=method)
    axes.axhline(1.0, color="black", linewidth=1, label="jacrev")
    axes.set_yscale("log")
    axes.set_xticks(range(len(results)), [p.label.split(" (")[0] for p, _ in results], fontsize=8)
    axes.set_ylabel("time / jacrev time (lower is faster)")
    axes.set_title(f"jacfd vs torch.func, float32, {torch.get_num_threads()} thread(s)")
    figure.legend(loc="outside lower center", fontsize=8, ncols=len(CHART_METHODS) + 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def report(quick: bool, compiled: bool = True, image: Path | None = None) -> str:
    """All suite tables as markdown; the float32 chart is saved to ``image``."""
    sections: list[str] = []
    float32: list[tuple[Problem, dict[str, Cell]]] = []
    for dtype in (torch.float32, torch.float64):
        results = [
            (p, time_problem(p, quick, compiled and not quick)) for p in problems(dtype, quick)
        ]
        float32 = float32 or results
        sections.append(time_tables(dtype, results))
    sections.append(memory_tables(quick))
    if image is not None:
        chart(float32, image)
    return "\n\n".join(sections)
