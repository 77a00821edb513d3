"""Structured Jacobians: per-sample Jacobians of a conv net, a tridiagonal
system, and the memory of a sparse Jacobian."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import jacfwd, jacrev, vmap

from jacfd import banded_pattern, jacfd

from ._timing import format_bytes, measure, table

Candidates = dict[str, tuple[Callable[[], object], "int | None"]]
"""label -> (the call to time, its number of evaluations of f, if it has one)."""


def speedup_rows(candidates: Candidates, baseline: str, quick: bool) -> list[list[object]]:
    """Times every candidate; the last column is the baseline's time over each."""
    times = {label: measure(fn, quick) for label, (fn, _) in candidates.items()}
    return [
        [
            label,
            "-" if calls is None else calls,
            times[label],
            f"{times[baseline].median / times[label].median:.3g}",
        ]
        for label, (_, calls) in candidates.items()
    ]


def per_sample_rows(quick: bool) -> list[list[object]]:
    """(B, 1, 8, 8) images -> (B, 10) logits: per-sample Jacobians (B, 10, 1, 8, 8)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10),
    ).requires_grad_(False)
    batch = 8 if quick else 64
    images = torch.randn(batch, 1, 8, 8)

    def one(image: torch.Tensor) -> torch.Tensor:
        return net(image[None])[0]

    # Transforms are built once, outside the timed calls, as users would.
    per_sample = jacfd(net, batch_dim=0)
    per_sample_batched = jacfd(net, batch_dim=0, strategy="batched")
    dense = jacfd(net, chunk_size=1024)
    reverse, finite = vmap(jacrev(one)), vmap(jacfd(one))
    candidates = {
        "jacfd(net, batch_dim=0)": (lambda: per_sample(images), 2 * 64),
        'jacfd(net, batch_dim=0, strategy="batched")': (
            lambda: per_sample_batched(images),
            2 * 64,
        ),
        "dense jacfd of the whole batch (chunked)": (lambda: dense(images), 2 * 64 * batch),
        "vmap(jacrev(one))": (lambda: reverse(images), None),
        "vmap(jacfd(one))": (lambda: finite(images), 2 * 64),
    }
    return speedup_rows(candidates, "dense jacfd of the whole batch (chunked)", quick)


def tridiagonal_rows(quick: bool) -> list[list[object]]:
    """A 1-D diffusion-reaction residual: 3 colours against n columns."""
    n = 1000 if quick else 10_000

    def residual(u: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(u, (1, 1))
        return padded[:-2] - 2 * padded[1:-1] + padded[2:] - torch.exp(u) * u

    u = torch.rand(n)
    pattern = banded_pattern(n, 1)
    compressed = jacfd(residual, sparsity=pattern)  # colours the pattern once, here
    compressed_sparse = jacfd(residual, sparsity=pattern, sparse_output=True)
    dense = jacfd(residual, chunk_size=2000)
    candidates = {
        "jacfd(sparsity=banded)": (lambda: compressed(u), 6),
        "jacfd(sparsity=banded, sparse_output=True)": (lambda: compressed_sparse(u), 6),
        "dense jacfd (chunk_size=2000)": (lambda: dense(u), 2 * n),
        "jacrev": (lambda: jacrev(residual)(u), None),
        "jacfwd": (lambda: jacfwd(residual)(u), None),
    }
    return speedup_rows(candidates, "dense jacfd (chunk_size=2000)", quick)


def sparse_memory_rows(quick: bool) -> list[list[object]]:
    """The sparse output for n = 10**5 against what a dense Jacobian would need."""
    n = 10_000 if quick else 100_000
    u = torch.rand(n)
    jacobian = jacfd(torch.sin, sparsity=banded_pattern(n, 1), sparse_output=True)(u)
    stored = jacobian.values().numel() * jacobian.values().element_size()
    stored += jacobian.indices().numel() * jacobian.indices().element_size()
    dense = n * n * u.element_size()
    return [[f"{n:,}", f"{jacobian._nnz():,}", format_bytes(stored), format_bytes(dense)]]


def report(quick: bool) -> str:
    return "\n\n".join(
        [
            "### Per-sample Jacobians of a small conv net (float32)",
            table(
                ["method", "evaluations", "time", "speed-up over dense jacfd"],
                per_sample_rows(quick),
            ),
            "### Tridiagonal system (float32)",
            table(
                ["method", "evaluations", "time", "speed-up over dense jacfd"],
                tridiagonal_rows(quick),
            ),
            "### Memory of a sparse (tridiagonal) Jacobian",
            table(["n", "non-zeros", "sparse COO", "dense would need"], sparse_memory_rows(quick)),
        ]
    )
