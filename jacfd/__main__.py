"""Demo and smoke check: ``python -m jacfd``.

Builds a small tanh network in float64 and computes Jacobians with
:func:`jacfd.jacfd`, each checked against :mod:`torch.func`:

1. the input Jacobian ``d model(x) / d x`` for every scheme, timed against ``jacrev``;
2. per-sample Jacobians ``vmap(jacfd(model))`` over a batch of 16;
3. the Jacobian with respect to every parameter, through ``functional_call``.

Prints markdown tables and exits with status 1 if any error exceeds its bound,
so CI catches accuracy regressions.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch.func import functional_call, jacrev, vmap

from jacfd import jacfd

# Bounds on max|J - J_ref| / max|J_ref| in float64. Typical errors are ~1e-8
# for one-sided schemes (~eps**(1/2)) and ~1e-11 for central (~eps**(2/3)).
Scheme = Literal["forward", "backward", "central"]
BOUNDS: dict[Scheme, float] = {"forward": 1e-6, "backward": 1e-6, "central": 1e-9}
N_IN, N_HIDDEN, N_OUT, BATCH = 8, 32, 4, 16
Jac = torch.Tensor | dict[str, torch.Tensor]  # a Jacobian, or a dict of them


def row(*cells: object) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |")


def as_dict(jac: Jac) -> dict[str, torch.Tensor]:
    return jac if isinstance(jac, dict) else {"": jac}


def median_ms(fn: Callable[[], object], repeats: int = 25, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds, over warm runs only."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """``--help`` prints the usage and exits 0; an unknown argument exits 2."""
    parser = argparse.ArgumentParser(
        prog="python -m jacfd",
        description=(
            "Demo and smoke check of jacfd: Jacobians of a small float64 tanh network "
            "(input Jacobian for every scheme, timed against jacrev; per-sample Jacobians "
            "under vmap; parameter Jacobians through functional_call), each checked "
            "against torch.func."
        ),
        epilog="Prints markdown tables. Exit status: 0 if every error is within its "
        "bound, 1 otherwise (for CI), 2 for a bad command line.",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    parse_args(argv)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(N_IN, N_HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(N_HIDDEN, N_HIDDEN),
        torch.nn.Tanh(),
        torch.nn.Linear(N_HIDDEN, N_OUT),
    ).double()
    model.requires_grad_(False)  # only Jacobians are wanted: build no autograd graph
    x = torch.randn(N_IN, dtype=torch.float64)
    failures: list[str] = []

    def check(name: str, jac: Jac, ref: Jac, bound: float) -> list[str]:
        """Compare with the torch.func reference; return the table cells."""
        jacs, refs = as_dict(jac), as_dict(ref)
        if jacs.keys() != refs.keys() or any(
            jacs[k].shape != refs[k].shape or jacs[k].dtype != refs[k].dtype for k in refs
        ):
            failures.append(f"{name}: structure, shape or dtype differs from torch.func")
            return ["-", "-", f"{bound:.0e}", "FAIL"]
        abs_err = max((jacs[k] - refs[k]).abs().max().item() for k in refs)
        rel = abs_err / max(r.abs().max().item() for r in refs.values())
        ok = rel <= bound  # False for NaN too
        if not ok:
            failures.append(f"{name}: relative error {rel:.2e} > bound {bound:.0e}")
        return [f"{abs_err:.2e}", f"{rel:.2e}", f"{bound:.0e}", "ok" if ok else "FAIL"]

    print(
        f"jacfd demo: torch {torch.__version__}, MLP {N_IN}->{N_HIDDEN}->{N_HIDDEN}->{N_OUT}"
        f" (tanh, float64), x.shape={tuple(x.shape)}\n"
    )

    # 1. Input Jacobian (N_OUT, N_IN), every scheme, against jacrev.
    j_ref = jacrev(model)(x)
    t_ref = median_ms(lambda: jacrev(model)(x))
    row("scheme", "max abs err", "max rel err", "bound", "status", "time (ms)", "jacrev (ms)")
    row(*["---"] * 7)
    for scheme, bound in BOUNDS.items():
        jac_fn = jacfd(model, scheme=scheme)
        cells = check(f"input/{scheme}", jac_fn(x), j_ref, bound)
        row(scheme, *cells, f"{median_ms(functools.partial(jac_fn, x)):.3f}", f"{t_ref:.3f}")

    # 2. Per-sample Jacobians: vmap over a batch gives (BATCH, N_OUT, N_IN).
    xb = torch.randn(BATCH, N_IN, dtype=torch.float64)
    jb, jb_ref = vmap(jacfd(model))(xb), vmap(jacrev(model))(xb)

    # 3. Parameter Jacobian: a dict of out.shape + param.shape.
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict[str, torch.Tensor], inp: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(model, p, (inp,))
        return out

    jp, jp_ref = jacfd(f)(params, x), jacrev(f)(params, x)
    n_params = sum(p.numel() for p in params.values())

    print()
    bound = BOUNDS["central"]
    row("central", "shape", "max abs err", "max rel err", "bound", "status")
    row(*["---"] * 6)
    row("vmap(jacfd(model))(xb)", tuple(jb.shape), *check("per-sample", jb, jb_ref, bound))
    row(
        "jacfd(functional_call)",
        f"{len(jp)} leaves, {n_params} params",
        *check("parameters", jp, jp_ref, bound),
    )

    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nall Jacobians match torch.func within bounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
