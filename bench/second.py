"""Hessian-like terms for physics-informed losses: the Laplacian of a network
``u(x)`` at a batch of collocation points, by second differences (``2n + 1``
evaluations per point, one vmap call) against autograd's Hessian trace."""

from __future__ import annotations

import torch
from torch.func import hessian, jacfwd, jacrev, vmap

from jacfd import laplacianfd

from ._timing import measure, table


def report(quick: bool) -> str:
    torch.manual_seed(0)
    rows = []
    for dims, points in ((2, 1024), (8, 256)):
        net = (
            torch.nn.Sequential(
                torch.nn.Linear(dims, 64),
                torch.nn.Tanh(),
                torch.nn.Linear(64, 64),
                torch.nn.Tanh(),
                torch.nn.Linear(64, 1),
            )
            .double()
            .requires_grad_(False)
        )

        def u(p: torch.Tensor) -> torch.Tensor:
            return net(p).squeeze(-1)

        x = torch.rand(points, dims, dtype=torch.float64)
        candidates = {
            "vmap(laplacianfd(u))": vmap(laplacianfd(u)),
            "vmap(hessian(u)).trace": lambda p: (
                vmap(hessian(u))(p).diagonal(dim1=-2, dim2=-1).sum(-1)
            ),
            "vmap(jacfwd(jacrev(u))).trace": lambda p: (
                vmap(jacfwd(jacrev(u)))(p).diagonal(dim1=-2, dim2=-1).sum(-1)
            ),
        }
        reference = candidates["vmap(hessian(u)).trace"](x)
        baseline = measure(lambda: candidates["vmap(hessian(u)).trace"](x), quick)
        for label, fn in candidates.items():
            timing = measure(lambda fn=fn: fn(x), quick)
            error = ((fn(x) - reference).abs().max() / reference.abs().max()).item()
            rows.append(
                [
                    f"{dims}-d, {points} points",
                    label,
                    timing,
                    f"{timing.median / baseline.median:.2f}",
                    f"{error:.1e}",
                ]
            )
    return "\n\n".join(
        [
            "### Laplacian of a tanh MLP at collocation points (float64)",
            table(["case", "method", "time", "ratio to hessian", "max rel. difference"], rows),
        ]
    )
