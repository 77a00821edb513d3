"""Accuracy report for jacfd: Jacobian error against the step, for every scheme.

Sweeps the absolute step ``delta`` of every scheme and order (forward/backward 1-4,
central 2/4/6/8, complex) in float32 and float64 over a log grid, and compares
``jacfd`` with ``torch.func.jacrev`` in float64 on a small zoo of functions; the
default step (``delta=None``) is measured too. Writes ``accuracy.md`` and
``img/accuracy_<dtype>.png`` under ``docs/`` (or ``--out DIR``) and prints the
table. ``--quick`` runs a reduced float64 sweep into a temporary directory: a
smoke test for CI.

Only the sweep is generated. If ``accuracy.md`` exists in the output directory,
its hand-written parts are kept: the note between the ``accuracy-report:note``
markers after the intro, and everything from the line ``## float32 networks`` on
(written by hand and by ``docs/scripts/float32_networks.py``).

Usage: ``python docs/scripts/accuracy_report.py [--quick] [--out DIR]``
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from jacfd import jacfd

# Internal (jacfd._src is private, with no stable API): the step rule's constants, to
# mark the default step on the plots. Update this import if the module changes.
from jacfd._src._stencil import get_stencil

Func = Callable[[torch.Tensor], torch.Tensor]
Scheme = Literal["forward", "backward", "central", "complex"]
DTYPES = {"float64": torch.float64, "float32": torch.float32}
ORDERS: dict[Scheme, tuple[int, ...]] = {  # the complex step takes no order: it is 2nd
    "forward": (1, 2, 3, 4),
    "backward": (1, 2, 3, 4),
    "central": (2, 4, 6, 8),
    "complex": (2,),
}
SCHEMES = [(scheme, order) for scheme, orders in ORDERS.items() for order in orders]
QUICK_SCHEMES: list[tuple[Scheme, int]] = [("forward", 1), ("central", 2), ("complex", 2)]
COLOURS = {"forward": "Blues", "backward": "Greens", "central": "Reds", "complex": "Greys"}


def float32_exact(t: torch.Tensor) -> torch.Tensor:
    """float64 values that float32 holds exactly: both dtypes see the same points."""
    return t.to(torch.float32).to(torch.float64)


def make_zoo(seed: int = 0) -> tuple[dict[str, Func], dict[str, Func], torch.Tensor]:
    """The zoo: (real functions, complex-ready functions, float64 input point).

    Every function looks up its constants by the dtype of its input, so one
    function serves float64, float32 and their complex counterparts.
    """
    gen = torch.Generator().manual_seed(seed)
    x = float32_exact(torch.rand(5, generator=gen, dtype=torch.float64) * 4 - 2)
    a = float32_exact(torch.randn(4, 5, generator=gen, dtype=torch.float64) / math.sqrt(5))
    torch.manual_seed(seed)
    nn = torch.nn
    mlp = nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).to(torch.float64)
    for p in mlp.parameters():
        p.requires_grad_(False).copy_(float32_exact(p))
    with warnings.catch_warnings():  # "complex modules are a new feature"
        warnings.simplefilter("ignore", UserWarning)
        models = {
            dtype: copy.deepcopy(mlp).to(dtype)
            for dtype in (torch.float64, torch.float32, torch.complex128, torch.complex64)
        }
    analytic: dict[str, Func] = {
        "sin": torch.sin,
        "exp": torch.exp,
        "tanh": torch.tanh,
        "x**3-2x": lambda x: x**3 - 2 * x,
        "sin(A@x)": lambda x: torch.sin(a.to(x.dtype) @ x),
        "mlp(tanh)": lambda x: models[x.dtype](x),
    }
    real = {**analytic, "softmax": lambda x: torch.softmax(x, dim=0)}
    return real, analytic, x


ZOO = make_zoo()


@dataclass
class Sweep:
    """Errors of one scheme/order/dtype: per zoo function, per step."""

    scheme: Scheme
    order: int
    dtype: str
    steps: np.ndarray  # (n_steps,)
    errors: np.ndarray  # (n_funcs, n_steps), nan where non-finite
    default: np.ndarray  # (n_funcs,), at delta=None
    names: list[str]

    @property
    def default_error(self) -> float:
        return float(np.max(self.default))

    @property
    def zoo_errors(self) -> np.ndarray:
        worst: np.ndarray = self.errors.max(axis=0)  # nan if any function is non-finite
        return worst

    @property
    def best(self) -> tuple[float, float]:
        """(best zoo error, its step)."""
        i = int(np.nanargmin(self.zoo_errors))
        return float(self.zoo_errors[i]), float(self.steps[i])

    @property
    def default_step(self) -> float:
        """The default step for |x| <= 1: c * eps**(1/(p+1)), eps for complex."""
        eps = float(torch.finfo(DTYPES[self.dtype]).eps)
        stencil = get_stencil(self.scheme, None if self.scheme == "complex" else self.order)
        return stencil.step_constant * eps**stencil.step_exponent

    @property
    def theory(self) -> float:
        """The error order eps**(p/(p+1)), eps for complex."""
        eps = float(torch.finfo(DTYPES[self.dtype]).eps)
        return eps if self.scheme == "complex" else eps ** (self.order / (self.order + 1))


def relative_error(jac: torch.Tensor, ref: torch.Tensor) -> float:
    if not bool(torch.isfinite(jac).all()):
        return math.nan
    diff = (jac.to(torch.float64) - ref).abs().max()
    return float(diff / max(1.0, float(ref.abs().max())))


def run_sweep(scheme: Scheme, order: int, dtype: str, steps: np.ndarray) -> Sweep:
    real, analytic, x64 = ZOO
    zoo = analytic if scheme == "complex" else real
    x = x64.to(DTYPES[dtype])
    errors = np.full((len(zoo), len(steps)), math.nan)
    default = np.full(len(zoo), math.nan)
    for i, func in enumerate(zoo.values()):
        ref = torch.func.jacrev(func)(x64)
        order_arg = None if scheme == "complex" else order
        for j, delta in enumerate(steps):
            try:
                jac = jacfd(func, delta=float(delta), scheme=scheme, order=order_arg)(x)
            except ValueError:  # the step does not move x: jacfd refuses it (no point)
                continue
            errors[i, j] = relative_error(jac, ref)
        default[i] = relative_error(jacfd(func, scheme=scheme, order=order_arg)(x), ref)
    return Sweep(scheme, order, dtype, steps, errors, default, list(zoo))


def step_grid(scheme: str, dtype: str, quick: bool) -> np.ndarray:
    low = -20 if scheme == "complex" else (-16 if dtype == "float64" else -8)
    n = 7 if quick else 3 * (-low) + 1  # three steps per decade
    return 10.0 ** np.linspace(low, 0, n)


def table(sweeps: list[Sweep]) -> str:
    lines = [
        "| scheme | order | dtype | default-step error | best error | step at best "
        "| default/best | theory eps^(p/(p+1)) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in sweeps:
        (best, at), default = s.best, s.default_error
        order = "-" if s.scheme == "complex" else str(s.order)
        lines.append(
            f"| {s.scheme} | {order} | {s.dtype} | {default:.1e} | {best:.1e} "
            f"| {at:.1e} | {default / best:.2g} | {s.theory:.1e} |"
        )
    return "\n".join(lines)


def far_from_best(sweeps: list[Sweep], factor: float = 3.0) -> str:
    """Where the default step is not within ``factor`` of the best: step and culprit."""
    lines = []
    for s in sweeps:
        (best, at), i = s.best, int(np.nanargmin(s.zoo_errors))
        if s.default_error > factor * best:
            lines.append(
                f"{s.scheme} {s.order} {s.dtype}: default {s.default_error:.1e} (worst: "
                f"{s.names[int(np.argmax(s.default))]}), best {best:.1e} at {at:.1e} = "
                f"{at / s.default_step:.2g} x default step {s.default_step:.1e} "
                f"(worst there: {s.names[int(np.argmax(s.errors[:, i]))]})"
            )
    return "\n".join(lines) or "none"


def plot(sweeps: list[Sweep], dtype: str, path: Path) -> None:
    fig = Figure(figsize=(9, 6))
    ax = fig.subplots()
    for s in (s for s in sweeps if s.dtype == dtype):
        shade = 0.4 + 0.15 * (s.order if s.scheme != "central" else s.order / 2)
        colour = matplotlib.colormaps[COLOURS[s.scheme]](min(shade, 1.0))
        style = "--" if s.scheme == "backward" else "-"
        label = s.scheme if s.scheme == "complex" else f"{s.scheme} {s.order}"
        ax.loglog(s.steps, s.zoo_errors, style, color=colour, label=label, lw=1.4)
        ax.plot(s.default_step, s.default_error, "o", color=colour, mec="k", ms=6)
    ax.set_xlabel("step delta (absolute)")
    ax.set_ylabel("max relative error over the zoo")
    ax.set_title(f"jacfd error vs step, {dtype} (dots: default step for |x| <= 1)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


INTRO = """---
hide:
  - toc
---

# Accuracy

How accurate is `jacfd`, and how good is its default step? For every scheme and
order, and for float32 and float64, the absolute step `delta` is swept over a log
grid and the Jacobian is compared with `torch.func.jacrev` in float64. The error is
the worst, over a zoo of smooth functions (sin, exp, tanh, x**3 - 2x, softmax,
sin(A @ x), a 5-16-16-3 tanh MLP; softmax is left out for the complex step), of
`max|J - J_ref| / max(1, max|J_ref|)`, at a fixed point with 5 coordinates in [-2, 2].
Steps where the result is not finite are left out.

"""

THEORY = """A stencil of order p for a first derivative (q = 1) has error
`E(h) ~ C1 eps / h^q + C2 h^p`: rounding, then truncation. The best step is
`h* ~ eps^(1/(p+q))` (times the scale of x), and the best error `~ eps^(p/(p+q))`.
The default step (`delta=None`) is `c * eps^(1/(p+1)) * max(1, |x|)`, where the
constant `c = (q C1 / (p C2))^(1/(p+q))` comes from the stencil's weights (`C1 = sum |w|`,
`C2 = |sum w o^(p+q)|`, assuming derivatives that grow like those of a function analytic
within distance ~1): from 1.4 for forward differences to 0.42 for central of order 8,
whose nine points would otherwise reach past the singularities of functions like tanh.
The complex step
`Im f(x + ih) / h` has no subtraction, so no rounding term: any tiny h works (the
default is `eps * max(1, |x|)`) and the error is `~ eps`.

In the table, the default-step error is that of `delta=None`; the best error is the
smallest over the sweep (three steps per decade, so the default step can beat it),
at the step listed; the last column is the theoretical order `eps^(p/(p+1))`
(complex: `eps`), with no constant. In the plots, the dots mark the default step
where it is `c * eps^(1/(p+1))`, i.e. for `|x| <= 1`.

"""


NOTE_BEGIN = "<!-- accuracy-report:note:begin -->"
NOTE_END = "<!-- accuracy-report:note:end -->"
KEEP_FROM = "## float32 networks"
"""The page's hand-written parts: the note after the intro, between the markers, and
everything from this heading on."""


def hand_written(page: Path) -> tuple[str, str]:
    """(the note with its markers, the tail from ``KEEP_FROM`` on) of an existing
    page; empty strings for what it does not have."""
    if not page.exists():
        return "", ""
    text = page.read_text()
    note = ""
    begin, end = text.find(NOTE_BEGIN), text.find(NOTE_END)
    if 0 <= begin < end:
        note = text[begin : end + len(NOTE_END)]
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip() == KEEP_FROM]
    tail = "".join(lines[starts[0] :]) if starts else ""
    return note, tail


def write_report(sweeps: list[Sweep], out: Path) -> str:
    """Writes ``out/accuracy.md`` and its plots, keeping the page's hand-written parts."""
    text = table(sweeps)
    images = []
    for dtype in DTYPES:
        if any(s.dtype == dtype for s in sweeps):
            plot(sweeps, dtype, out / "img" / f"accuracy_{dtype}.png")
            images.append(f"![error vs step, {dtype}](img/accuracy_{dtype}.png)")
    footer = f"_Generated by `docs/scripts/accuracy_report.py` with torch {torch.__version__}._"
    page = out / "accuracy.md"
    note, tail = hand_written(page)
    intro = INTRO + (note + "\n\n" if note else "") + THEORY
    parts = [intro + text, *images, footer]
    if tail:
        parts.append(tail.rstrip("\n"))
    page.write_text("\n\n".join(parts) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sweep (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="output directory")
    args = parser.parse_args()
    out: Path = args.out or (
        Path(tempfile.mkdtemp(prefix="jacfd_accuracy_"))
        if args.quick
        else Path(__file__).resolve().parents[1]
    )
    schemes = QUICK_SCHEMES if args.quick else SCHEMES
    dtypes = ["float64"] if args.quick else list(DTYPES)
    start = time.perf_counter()
    sweeps = [
        run_sweep(scheme, order, dtype, step_grid(scheme, dtype, args.quick))
        for dtype in dtypes
        for scheme, order in schemes
    ]
    seconds = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    print(write_report(sweeps, out))
    print("\nDefault step not within 3x of the best:\n" + far_from_best(sweeps))
    print(f"\nWrote {out / 'accuracy.md'} in {seconds:.1f} s")


if __name__ == "__main__":
    main()
