"""``python -m bench [--quick] [--only SECTION ...] [--no-compile] [--out DIR]``.

Prints the benchmark tables as markdown. A full run (every section, no
``--quick``) also writes ``benchmarks.md`` and ``img/benchmarks.png`` under
``docs/`` (or ``--out DIR``); ``--quick`` is a smoke test (tiny sizes, short
timing, no compile, one memory measurement) that writes its files to a
temporary directory, removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from . import differentiable, gradcheck, overhead, parallel, second, sparse, strategies, suite

OTHERS = {  # name: (module with report(quick) -> markdown, heading in benchmarks.md)
    "strategies": (strategies, "## Evaluation strategies"),
    "second": (second, "## Second derivatives"),
    "sparse": (sparse, "## Sparse and per-sample Jacobians"),
    "gradcheck": (gradcheck, "## Checking hand-written gradients"),
    "overhead": (overhead, "## Per-call overhead"),
    "differentiable": (differentiable, "## Derivative rules"),
    "parallel": (parallel, "## Parallel and distributed evaluation"),
}
SECTIONS = ("suite", *OTHERS)
DOCS = Path(__file__).resolve().parent.parent / "docs"
INTRO = """\
Times are medians of warm calls (`torch.utils.benchmark`'s `blocked_autorange`, after a
warm-up call), ± half the interquartile range in percent, with `torch.set_num_threads(1)`.
Every ratio divides two medians from the same run: the machines are shared, and absolute
times drift from run to run more than ratios do. In the suite, the columns of a case are
timed in three interleaved rounds with their block times pooled, so that a burst of load
from other processes falls on all of them alike.
"""
SUITE_INTRO = """\
**Columns.** *jacfd forward*, *jacfd central*: `jacfd(f, scheme=...)`, eager.
*jacfd forward, compiled*: `torch.compile(jacfd(f, scheme="forward"), backend="inductor")`,
compiled once and timed on warm calls only; *compile (cold)* is its first call, compile
included (the first compile of a run also starts inductor's worker processes). *jacrev*, *jacfwd*: `torch.func`. *autograd.functional*:
`torch.autograd.functional.jacobian(f, x, vectorize=True)`. *limit (n+1)*, *limit (2n)*:
`f` called directly on a batch of random inputs shaped like the stacked stencil points
(`n + 1` of them for forward differences, `2n` for central, where `n` is the number of
differentiated elements): the cost that no finite-difference implementation can beat.
*f, one point*: `f` at the unperturbed input.

**Cases.** MLPs are `in -> hidden -> out` with a tanh. *per-sample conv*: images
`(64, 1, 8, 8)`, a 3x3 conv to 4 channels, tanh, flatten, linear to 10 classes; the
Jacobian columns are `vmap(T(f_one_image))`, autograd.functional differentiates
`f(images).sum(0)` (the samples do not interact), and the limit is the conv net on
`64 (n + 1)` images. *parameters*: the parameter dict of a small classifier through
`torch.func.functional_call`, with the limit `vmap(functional_call)` over stacked parameter
sets (the 128 -> 256 -> 10 classifier has 35,594 parameters: its `n + 1` parameter sets
would take 5 GB). *Hessian*: `T(grad(f))` for a scalar-valued MLP `f`; there the jacfwd
column is `torch.func.hessian(f)`, autograd.functional is
`torch.autograd.functional.hessian(f, x, vectorize=True)`, and the limit is
`grad(lambda X: f(X).sum())` on the stacked batch.

**Grad mode.** Everything runs in the default grad mode. Models are built with
`requires_grad_(False)`, except in the parameter case, which passes
`dict(model.named_parameters())` (tensors that require grad) to every method, as users do;
the limits' stacked batches are fresh tensors that do not require grad.

**Bold ratios** flag where jacfd forward is more than 1.25x its limit (for limits of at
least 1 ms), slower than jacfwd, or slower than jacrev with at least as many outputs as
inputs (where reverse mode has no advantage).

**Memory** (float32; MB = 10^6 bytes): how far one warm call raises the peak resident set
size (`VmHWM`, reset through `/proc/self/clear_refs` just before the call), in a fresh
process per case and method (forked from a server that has only imported torch and the
benchmarks). The limit's call includes building its stacked batch.
*expected*: the stacked batch (`n + 1` points) + `f`'s outputs on it + the Jacobian
(without `f`'s intermediate activations). Rises under about 1 MB are at the resolution
of the measurement (small blocks reuse freed heap), so their ratios are n/a.
"""  # noqa: E501 - markdown text, written out verbatim


def machine() -> str:
    """The CPU model where Linux says it, and the core count."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        name = next(
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name}, {len(os.sched_getaffinity(0))} cores"


def run_sections(options: argparse.Namespace, image: Path) -> dict[str, str]:
    """Each section's markdown, in order; the suite also saves its chart to ``image``."""
    return {
        name: suite.report(options.quick, not options.no_compile, image)
        if name == "suite"
        else OTHERS[name][0].report(options.quick)
        for name in options.only or SECTIONS
    }


def write(out: Path, header: str, reports: dict[str, str], seconds: float) -> None:
    """``out/benchmarks.md``: an introduction, then every section's tables."""
    parts = [
        "---\nhide:\n  - toc\n---\n\n# Benchmarks",  # wide tables: no table of contents
        f"Generated by `python -m bench` ({header}) in {seconds:.0f} s.",
        INTRO.strip(),
    ]
    for name, text in reports.items():
        if name == "suite":
            parts += [
                "## The suite",
                SUITE_INTRO.strip(),
                "![each method's time over jacrev's, float32](img/benchmarks.png)",
            ]
        else:
            parts.append(OTHERS[name][1])
        parts.append(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmarks.md").write_text("\n\n".join(parts) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument(
        "--out", type=Path, help="where to write benchmarks.md and img/ (default: docs/)"
    )
    options = parser.parse_args()
    torch.set_num_threads(1)
    header = (
        f"torch {torch.__version__}, {machine()}, threads={torch.get_num_threads()}"
        f"{', quick' if options.quick else ''}"
    )
    print(header + "\n")
    full = not options.quick and not options.only
    with tempfile.TemporaryDirectory() as scratch:
        out = options.out or (DOCS if full else Path(scratch))
        start = time.perf_counter()
        reports = run_sections(options, out / "img" / "benchmarks.png")
        seconds = time.perf_counter() - start
        for text in reports.values():
            print(text, end="\n\n")
        print(f"Total runtime: {seconds:.0f} s")
        write(out, header, reports, seconds)
        if out != Path(scratch):
            print(
                f"Wrote {out / 'benchmarks.md'}"
                + (" and img/benchmarks.png" if "suite" in reports else "")
            )


if __name__ == "__main__":
    main()
