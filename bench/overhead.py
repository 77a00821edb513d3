"""Per-call overhead: jacfd's fixed cost where ``f`` itself costs almost nothing.

1. A tiny MLP (8 -> 16 -> 16 -> 8, tanh), against ``f`` and ``vmap(f)`` on a stacked
   batch shaped like the stencil points: whatever jacfd adds on top is overhead.
2. The predecessor's own timing cases (its ``timetest.py``: ``2 * x`` and ``x + y``),
   against a re-implementation of JacrevFinite (``bench/_jacrevfinite.py``).

All candidates of a case are timed in alternation (``measure_alternating``), with one
thread, and every ratio divides two medians from the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import vmap

from jacfd import jacfd

from ._floor import ForwardFloor
from ._jacrevfinite import JacrevFinite
from ._timing import Timing, measure_alternating, table

NOTES = """\
Each transform is built once and timed on warm calls. The stacked batches are random
tensors built beforehand, of the stencil's shape: `n + 1 = 9` points of 8 elements for
the forward scheme, `2n = 16` for central. The predecessor's cases are those of its
`timetest.py`: float64 inputs made with `requires_grad_()`, `JacrevFinite`'s default
step `1e-5` for `2 * x` and `delta=1e-10` for `x + y`; jacfd takes the same step
(`delta=`, forward scheme). Targets are those of issue 11; central rows are for
information."""


@dataclass(frozen=True)
class Row:
    case: str
    candidate: str
    timing: Timing
    baseline: str
    baseline_timing: Timing
    target: float | None = None

    @property
    def ratio(self) -> float:
        return self.timing.median / self.baseline_timing.median

    def cells(self) -> list[str]:
        met = "n/a" if self.target is None else "yes" if self.ratio <= self.target else "**no**"
        return [
            self.case,
            self.candidate,
            microseconds(self.timing),
            self.baseline,
            microseconds(self.baseline_timing),
            f"{self.ratio:.2f}",
            "n/a" if self.target is None else f"≤ {self.target:g}",
            met,
        ]


def microseconds(timing: Timing) -> str:
    """``12.3 ±2%``: the column header carries the unit, so the cells compare at a glance."""
    return f"{timing.median * 1e6:.3g} ±{50 * timing.iqr / timing.median:.0f}%"


def mlp_rows(dtype: torch.dtype, quick: bool) -> list[Row]:
    torch.manual_seed(0)
    n = 8
    model = (
        torch.nn.Sequential(
            torch.nn.Linear(n, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 16),
            torch.nn.Tanh(),
            torch.nn.Linear(16, 8),
        )
        .to(dtype)
        .requires_grad_(False)
    )
    x = torch.randn(n, dtype=dtype)
    points = {
        "forward": torch.randn(n + 1, n, dtype=dtype),
        "central": torch.randn(2 * n, n, dtype=dtype),
    }
    batched_model = vmap(model)
    floor = ForwardFloor(model, x, None)
    check_floor(f"MLP, {dtype}", floor(x), jacfd(model, scheme="forward")(x))
    fns: dict[str, Callable[[], object]] = {"floor": lambda: floor(x)}
    for scheme, stacked in points.items():
        fns[f"f ({scheme} batch)"] = lambda stacked=stacked: model(stacked)
        fns[f"vmap(f) ({scheme} batch)"] = lambda stacked=stacked: batched_model(stacked)
        for strategy in ("batched", "vmap"):
            transform = jacfd(model, scheme=scheme, strategy=strategy)
            fns[f"{scheme} {strategy}"] = lambda transform=transform: transform(x)
    timings = measure_alternating(fns, quick)
    case = f"MLP 8-16-16-8, {str(dtype).removeprefix('torch.')}"
    rows = []
    for scheme, stacked in points.items():
        shape = tuple(stacked.shape)
        forward = scheme == "forward"
        rows += [
            Row(
                case,
                f'jacfd(scheme="{scheme}", strategy="batched")',
                timings[f"{scheme} batched"],
                f"f on the stacked batch {shape}",
                timings[f"f ({scheme} batch)"],
                2.5 if forward else None,
            ),
            *(
                [
                    Row(
                        case,
                        "minimal eager pipeline (bench/_floor.py)",
                        timings["floor"],
                        f"f on the stacked batch {shape}",
                        timings[f"f ({scheme} batch)"],
                    )
                ]
                if forward
                else []
            ),
            Row(
                case,
                f'jacfd(scheme="{scheme}") (vmap)',
                timings[f"{scheme} vmap"],
                f"vmap(f) on the stacked batch {shape}",
                timings[f"vmap(f) ({scheme} batch)"],
                1.3 if forward else None,
            ),
        ]
    return rows


def large_rows(dtype: torch.dtype, quick: bool) -> list[Row]:
    """Issue 11's large case: a square MLP where ``f`` on the stacked batch takes
    milliseconds, so the engine's fixed cost should vanish beside it."""
    torch.manual_seed(0)
    n = 64 if quick else 512
    model = (
        torch.nn.Sequential(torch.nn.Linear(n, n), torch.nn.Tanh(), torch.nn.Linear(n, n))
        .to(dtype)
        .requires_grad_(False)
    )
    x = torch.randn(n, dtype=dtype)
    stacked = torch.randn(n + 1, n, dtype=dtype)
    transform = jacfd(model, scheme="forward", strategy="batched")
    floor = ForwardFloor(model, x, None)
    check_floor(f"square MLP, {dtype}", floor(x), transform(x))
    timings = measure_alternating(
        {"f": lambda: model(stacked), "jacfd": lambda: transform(x), "floor": lambda: floor(x)},
        quick,
    )
    case = f"square MLP {n}-{n}-{n}, {str(dtype).removeprefix('torch.')}"
    baseline = f"f on the stacked batch ({n + 1}, {n})"
    return [
        Row(
            case,
            'jacfd(scheme="forward", strategy="batched")',
            timings["jacfd"],
            baseline,
            timings["f"],
            1.10,
        ),
        Row(
            case,
            "minimal eager pipeline (bench/_floor.py)",
            timings["floor"],
            baseline,
            timings["f"],
        ),
    ]


def predecessor_rows(quick: bool) -> list[Row]:
    """``timetest.py``'s first two functions, at its inputs and steps."""

    def two(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    def add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y

    float64 = torch.float64
    cases = [
        ("2 * x, 2 elements, delta 1e-5", two, 0, 1e-5, (torch.tensor((5, 2), dtype=float64),)),
        (
            "x + y, argnum 1, delta 1e-10",
            add,
            1,
            1e-10,
            (torch.tensor((1, 1), dtype=float64), torch.tensor((2, 3), dtype=float64)),
        ),
    ]
    rows = []
    for case, f, argnum, delta, values in cases:
        args = tuple(value.requires_grad_() for value in values)
        baseline = JacrevFinite(function=f, num_args=argnum, delta=delta)
        batched = jacfd(f, argnum, delta=delta, scheme="forward", strategy="batched")
        vmapped = jacfd(f, argnum, delta=delta, scheme="forward")
        check_agreement(case, f, args, delta, baseline(*args), [batched(*args), vmapped(*args)])
        floor = ForwardFloor(
            lambda t: f(*args[:argnum], t, *args[argnum + 1 :]), args[argnum], delta
        )
        check_floor(case, floor(args[argnum]), batched(*args))
        timings = measure_alternating(
            {
                "floor": lambda: floor(args[argnum]),
                "JacrevFinite": lambda: baseline(*args),
                "batched": lambda: batched(*args),
                "vmap": lambda: vmapped(*args),
            },
            quick,
        )
        for label, name, target in (
            ('jacfd(scheme="forward", strategy="batched")', "batched", 0.6),
            ('jacfd(scheme="forward") (vmap)', "vmap", 1.0),
        ):
            rows.append(
                Row(case, label, timings[name], "JacrevFinite", timings["JacrevFinite"], target)
            )
        rows.append(
            Row(
                case,
                "minimal eager pipeline (bench/_floor.py)",
                timings["floor"],
                "JacrevFinite",
                timings["JacrevFinite"],
            )
        )
    return rows


def check_floor(case: str, floor: torch.Tensor, jacobian: torch.Tensor) -> None:
    """The floor does jacfd's arithmetic: the same Jacobian, bit for bit."""
    if not torch.equal(floor, jacobian.detach()):
        error = (floor - jacobian.detach()).abs().max().item()
        raise RuntimeError(f"{case}: the minimal pipeline and jacfd differ by {error:.1e}")


def check_agreement(
    case: str,
    f: Callable[..., torch.Tensor],
    args: tuple[torch.Tensor, ...],
    delta: float,
    expected: torch.Tensor,
    results: list[torch.Tensor],
) -> None:
    """Both difference ``f(x + h) - f(x)`` over the same ``h``; they may differ by the
    rounding of ``x + h`` and of ``f`` (jacfd rounds ``h`` so that ``x + h`` is exact),
    a few ulps of ``|x| + |f|`` over ``h``: about 1e-5 for ``delta=1e-10``."""
    with torch.no_grad():
        scale = max(t.abs().max().item() for t in (*args, f(*args)))
    tolerance = 8 * torch.finfo(expected.dtype).eps * scale / delta
    for result in results:
        error = (result.detach() - expected.detach()).abs().max().item()
        if error > tolerance:
            raise RuntimeError(
                f"{case}: jacfd and JacrevFinite differ by {error:.1e} (tolerance {tolerance:.1e})"
            )


def report(quick: bool) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # fixed costs are serial: extra threads would only add noise
    try:
        rows = [*mlp_rows(torch.float32, quick), *mlp_rows(torch.float64, quick)]
        rows += predecessor_rows(quick)
        rows += [*large_rows(torch.float32, quick), *large_rows(torch.float64, quick)]
    finally:
        torch.set_num_threads(threads)
    header = [
        "case",
        "candidate",
        "time (µs)",
        "baseline",
        "baseline time (µs)",
        "ratio",
        "target",
        "met",
    ]
    return "\n\n".join([NOTES, table(header, [row.cells() for row in rows])])
