"""What jacfd's accuracy is on the float32 networks users have, and when jacrev is better.

Measures, for a zoo of float32 networks in eval mode whose parameters require grad
(as users have them):

1. the error of the input Jacobian from ``jacfd`` with the default options (central,
   order 2), ``scheme="forward"``, ``order=4`` (central) and ``jacfd_with_error``
   (with how its error estimate compares with the actual error), against
   ``torch.func.jacrev`` of the same network converted to float64
   (``deepcopy().double()``) at the same input, as
   ``max|J_fd - J_ref| / max|J_ref|``, over a few seeds (median and max);
2. a float32 model called behind float64 casts, ``lambda x: model(x.float()).double()``
   with x float64, and the fixes;
3. the step: central with the step scale ``max(|x|, typical)`` for ``typical`` 1 (the
   default), 2 and 4 (steps 2x and 4x the default for ``|x| <= 1``), ``order=4`` and
   ``order=4, typical=3`` (issue 15: would a larger default step hold across them?);
4. the time of a classifier's input Jacobian (10 outputs, 3x32x32 = 3072 inputs) with
   ``jacfd`` and with ``jacrev`` / ``vmap(jacrev)``.

Prints markdown tables; ``--write`` also puts them into ``docs/accuracy.md`` between
the ``float32-networks`` markers. ``--quick`` uses fewer seeds and timing runs.

Usage: ``python docs/scripts/float32_networks.py [--quick] [--write]``
"""

from __future__ import annotations

import argparse
import copy
import re
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import jacrev, vmap

from jacfd import jacfd, jacfd_with_error

Func = Callable[[torch.Tensor], torch.Tensor]
DOCS = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- float32-networks:begin -->", "<!-- float32-networks:end -->"


def mlp(act: type[nn.Module]) -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 8))


def smooth_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GELU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def relu_pool_conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def decoder() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 256), nn.Sigmoid())


def classifier() -> nn.Module:
    """A small CIFAR-size classifier: 3x32x32 -> 10."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


# name -> (builder, shape of one input sample)
NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "tanh MLP 16-64-64-8": (lambda: mlp(nn.Tanh), (16,)),
    "GELU MLP 16-64-64-8": (lambda: mlp(nn.GELU), (16,)),
    "ReLU MLP 16-64-64-8": (lambda: mlp(nn.ReLU), (16,)),
    "smooth conv (tanh, GELU), 3x8x8 -> 10": (smooth_conv, (3, 8, 8)),
    "ReLU + max-pool conv, 3x8x8 -> 10": (relu_pool_conv, (3, 8, 8)),
    "smooth decoder (GELU, sigmoid), 8 -> 256": (decoder, (8,)),
}
# (label, jacfd options); jacfd_with_error is measured separately
SCHEMES: dict[str, dict[str, object]] = {
    "central (default)": {},
    "forward": {"scheme": "forward"},
    "central, order=4": {"order": 4},
}


# Networks built from analytic operations only, for the complex step (GELU's erf,
# ReLU and max-pool are not analytic).
ANALYTIC = {"tanh MLP 16-64-64-8"}
COMPLEX = "complex (`model.to(torch.complex64)`)"

LABELS = [*SCHEMES, COMPLEX, "jacfd_with_error"]


def build(name: str, seed: int) -> tuple[Func, Func, torch.Tensor, Func | None]:
    """(float32 network on one sample, its float64 copy, float32 input, its complex64
    copy if the network is analytic).

    The network is in eval mode with parameters requiring grad, as users have it;
    the copies have the same (float32-representable) weights.
    """
    builder, shape = NETWORKS[name]
    torch.manual_seed(seed)
    model = builder().eval()
    model64 = copy.deepcopy(model).double()
    x = torch.randn(shape)

    def one(m: nn.Module) -> Func:  # the models expect a batch dimension
        return lambda x: m(x.unsqueeze(0)).squeeze(0)

    with warnings.catch_warnings():  # "complex modules are a new feature"
        warnings.simplefilter("ignore", UserWarning)
        complex_model = copy.deepcopy(model).to(torch.complex64) if name in ANALYTIC else None
    fc = None if complex_model is None else one(complex_model)
    return one(model), one(model64), x, fc


def rel_error(jac: torch.Tensor, ref: torch.Tensor) -> float:
    """max|J - J_ref| / max|J_ref|: one number per Jacobian, relative to its largest entry."""
    # Both results carry the parameters' autograd graph (they require grad): detach.
    jac, ref = jac.detach().double(), ref.detach()
    return float((jac - ref).abs().max() / ref.abs().max())


@dataclass
class Row:
    name: str
    errors: dict[str, list[float]]  # scheme label -> one error per seed
    estimate_ratio: list[float]  # jacfd_with_error: max estimate / max actual error


def measure_network(name: str, seeds: range) -> Row:
    errors: dict[str, list[float]] = {label: [] for label in LABELS}
    ratios = []
    for seed in seeds:
        f32, f64, x, fc = build(name, seed)
        ref = jacrev(f64)(x.double()).detach()
        for label, options in SCHEMES.items():
            errors[label].append(rel_error(jacfd(f32, **options)(x), ref))  # type: ignore[arg-type]
        if fc is not None:
            errors[COMPLEX].append(rel_error(jacfd(fc, scheme="complex")(x), ref))
        J, estimate = jacfd_with_error(f32)(x)
        errors["jacfd_with_error"].append(rel_error(J, ref))
        ratios.append(
            float(estimate.detach().max()) / (rel_error(J, ref) * float(ref.abs().max()))
        )
    return Row(name, errors, ratios)


def fmt(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{min(values):.0e} / {statistics.median(values):.0e} / {max(values):.0e}"


def network_table(rows: list[Row], n_seeds: int) -> str:
    labels = LABELS
    head = "| network | " + " | ".join(labels) + " | estimate / actual error |"
    lines = [head, "|---|" + "---:|" * (len(labels) + 1)]
    for row in rows:
        cells = [fmt(row.errors[label]) for label in labels]
        ratio = f"{min(row.estimate_ratio):.2g} to {max(row.estimate_ratio):.2g}"
        lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {ratio} |")
    return (
        f"Min / median / max over {n_seeds} seeds (weights and input) of "
        "`max|J_fd - J_ref| / max|J_ref|`.\n\n" + "\n".join(lines)
    )


def measure_casts(seeds: range) -> str:
    """A float32 model called behind float64 casts, and what fixes it."""
    cases: dict[str, list[float]] = {}
    warned = 0  # warnings jacfd gives in the trap
    for seed in seeds:
        f32, f64, x32, _ = build("tanh MLP 16-64-64-8", seed)
        x = x32.double()
        ref = jacrev(f64)(x).detach()

        def cast(x: torch.Tensor, f32: Func = f32) -> torch.Tensor:
            return f32(x.float()).double()

        # jacfd sizes the step from the dtypes it sees: float64 in and out, so
        # eps**(1/3) ~ 6e-6, which float32 rounds to a few ulps of x.
        step32 = 4e-3 * x.abs().clamp(min=1)  # the float32 default step, 0.79 * eps32**(1/3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trap = jacfd(cast)(x)
        warned += len(caught)
        results = {
            "`jacfd(cast)(x)` (x float64): the trap": trap,
            "`jacfd(cast, delta=4e-3 * x.abs().clamp(min=1))(x)`": jacfd(cast, delta=step32)(x),
            "`jacfd(f32)(x.float())`: differentiate at the model's dtype": jacfd(f32)(x.float()),
            # a float32 output tells jacfd to size the step for float32
            "`jacfd(lambda x: model(x.float()))(x)`: no cast back": jacfd(
                lambda x, f32=f32: f32(x.float())
            )(x),
            "`jacfd(model.double())(x)`: the model in float64": jacfd(f64)(x),
        }
        for label, J in results.items():
            cases.setdefault(label, []).append(rel_error(J, ref))
    lines = ["| call (tanh MLP 16-64-64-8) | error, min / median / max |", "|---|---:|"]
    lines += [f"| {label} | {fmt(values)} |" for label, values in cases.items()]
    return f"jacfd gave {warned} warning(s) in the trap.\n\n" + "\n".join(lines)


# (label, jacfd options) of the step table
STEPS: dict[str, dict[str, object]] = {
    "central (default)": {},
    "`typical=2`": {"typical": 2.0},
    "`typical=4`": {"typical": 4.0},
    "`order=4`": {"order": 4},
    "`order=4, typical=3`": {"order": 4, "typical": 3.0},
    # smaller floors of the step scale, as candidate defaults (issue 15, item 5)
    "`typical=0.1`": {"typical": 0.1},
    "`typical=0.01`": {"typical": 0.01},
    "relative, `typical=|x|`": {"typical": "relative"},
}


def step_options(options: dict[str, object], x: torch.Tensor) -> dict[str, object]:
    if options.get("typical") == "relative":  # |x|, and 1 where x = 0
        return {**options, "typical": torch.where(x == 0, 1.0, x.abs())}
    return options


def measure_steps(seeds: range) -> str:
    """Median (max) error over the seeds, per network and step rule."""
    lines = [
        "| network | " + " | ".join(STEPS) + " |",
        "|---|" + "---:|" * len(STEPS),
    ]
    for name in NETWORKS:
        errors: dict[str, list[float]] = {label: [] for label in STEPS}
        for seed in seeds:
            f32, f64, x, _ = build(name, seed)
            ref = jacrev(f64)(x.double()).detach()
            for label, options in STEPS.items():
                jac = jacfd(f32, **step_options(options, x))(x)  # type: ignore[arg-type]
                errors[label].append(rel_error(jac, ref))
        cells = [f"{statistics.median(v):.0e} ({max(v):.0e})" for v in errors.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    kinks = [
        "| ReLU network, 20 seeds | default: median, seeds > 1e-3 | `typical=2`: median, "
        "seeds > 1e-3 |",
        "|---|---:|---:|",
    ]
    for name in ("ReLU MLP 16-64-64-8", "ReLU + max-pool conv, 3x8x8 -> 10"):
        cells = []
        for options in ({}, {"typical": 2.0}):
            errs = []
            for seed in range(20):
                f32, f64, x, _ = build(name, seed)
                ref = jacrev(f64)(x.double()).detach()
                errs.append(rel_error(jacfd(f32, **options)(x), ref))  # type: ignore[arg-type]
            cells.append(f"{statistics.median(errs):.0e}, {sum(e > 1e-3 for e in errs)}")
        kinks.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *kinks]
    return (
        f"Median (max) over {len(seeds)} seeds of `max|J_fd - J_ref| / max|J_ref|`; the "
        "inputs are `randn`, so `typical=k` makes the step k times the default for "
        "`|x| <= 1`, and `typical=f` < 1 is a smaller floor of the step scale (candidate "
        "defaults for inputs of tiny size).\n\n" + "\n".join(lines)
    )


def timed(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_classifier(runs: int, batch: int) -> str:
    torch.manual_seed(0)
    model = classifier().eval()  # parameters require grad, as users have them
    model64 = copy.deepcopy(model).double()
    xs = torch.randn(batch, 3, 32, 32)

    def f(x: torch.Tensor) -> torch.Tensor:
        return model(x.unsqueeze(0)).squeeze(0)

    def f64(x: torch.Tensor) -> torch.Tensor:
        return model64(x.unsqueeze(0)).squeeze(0)

    x = xs[0]
    ref = jacrev(f64)(x.double()).detach()
    err_fd = rel_error(jacfd(f)(x), ref)
    err_rev = rel_error(jacrev(f)(x), ref)

    def no_grad_jacfd() -> torch.Tensor:
        with torch.no_grad():
            return jacfd(f)(x)

    one = {
        "`jacrev(f)(x)`": timed(lambda: jacrev(f)(x), runs),
        "`jacfd(f)(x)`": timed(lambda: jacfd(f)(x), runs),
        "`jacfd(f)(x)` under `torch.no_grad()`": timed(no_grad_jacfd, runs),
    }
    many = {
        "`vmap(jacrev(f))(xs)`": timed(lambda: vmap(jacrev(f))(xs), runs),
        "`jacfd(model, batch_dim=0)(xs)`": timed(lambda: jacfd(model, batch_dim=0)(xs), runs),
    }
    lines = ["| call | time (ms) | over jacrev's |", "|---|---:|---:|"]
    base = one["`jacrev(f)(x)`"]
    lines += [f"| {k} | {v * 1e3:.0f} | {v / base:.1f}x |" for k, v in one.items()]
    base = many["`vmap(jacrev(f))(xs)`"]
    lines += [
        f"| {k}, {batch} images | {v * 1e3:.0f} | {v / base:.1f}x |" for k, v in many.items()
    ]
    return (
        f"Median of {runs} runs after a warm-up, {torch.get_num_threads()} thread(s). "
        f"Error of one image's Jacobian: jacfd {err_fd:.0e}, jacrev (float32) {err_rev:.0e}.\n\n"
        + "\n".join(lines)
    )


def write(text: str) -> None:
    page = DOCS / "accuracy.md"
    old = page.read_text()
    if BEGIN not in old:
        raise SystemExit(f"{page} has no {BEGIN} marker")
    block = f"{BEGIN}\n{text}\n{END}"
    page.write_text(
        re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, old, flags=re.S)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds and timing runs")
    parser.add_argument("--write", action="store_true", help="update docs/accuracy.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # comparable timings on a shared machine
    seeds = range(3 if args.quick else 5)
    start = time.perf_counter()
    rows = [measure_network(name, seeds) for name in NETWORKS]
    sections = [
        "#### Errors on float32 networks\n\n" + network_table(rows, len(seeds)),
        "#### A larger step, or order 4\n\n" + measure_steps(seeds),
        "#### A float32 model behind float64 casts\n\n" + measure_casts(seeds),
        "#### A classifier's input Jacobian: jacfd against jacrev\n\n"
        + measure_classifier(runs=3 if args.quick else 5, batch=4),
    ]
    footer = (
        f"_Generated by `docs/scripts/float32_networks.py` with torch {torch.__version__}"
        f" in {time.perf_counter() - start:.0f} s._"
    )
    text = "\n\n".join([*sections, footer])
    print(text)
    if args.write:
        write(text)


if __name__ == "__main__":
    main()
