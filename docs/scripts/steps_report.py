"""Measurements behind "Steps that fit the function" in docs/choosing.md (issue 15).

Run: PYTHONPATH=. python docs/scripts/steps_report.py
"""

import copy

import torch
from scipy.integrate import solve_ivp

from jacfd import estimate_noise, jacfd, jacfd_with_error


def typical_table() -> None:
    t = torch.linspace(0, 2e5, 50, dtype=torch.float64)
    b = torch.tensor([1e-5, 1e3], dtype=torch.float64)

    def decay(b: torch.Tensor) -> torch.Tensor:
        return b[1] * torch.exp(-b[0] * t)

    ref = torch.func.jacrev(decay)(b)
    for kw in [{}, {"order": 4}, {"scheme": "forward"}]:
        for typical in (None, b.abs()):
            jac = jacfd(decay, typical=typical, **kw)(b)  # type: ignore[arg-type]
            err = ((jac - ref).abs().amax(0) / ref.abs().amax(0))[0].item()
            print(f"typical={typical is not None} {kw}: column b0 {err:.2g}")
    for typical in (None, b.abs()):
        jac, est = jacfd_with_error(decay, typical=typical)(b)
        err = ((jac - ref).abs().amax(0) / ref.abs().amax(0))[0].item()
        bound = (est.amax(0) / ref.abs().amax(0))[0].item()
        print(f"with_error typical={typical is not None}: {err:.2g} (estimate {bound:.2g})")


def noise_table() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 4),
    )
    x = torch.randn(8, dtype=torch.float64)
    ref = torch.func.jacrev(copy.deepcopy(net).double())(x).detach()

    def cast(x: torch.Tensor) -> torch.Tensor:
        return net(x.float()).double()

    for noise in (None, 6e-8, "estimate"):
        jac = jacfd(cast, noise=noise)(x)
        err = ((jac - ref).abs().max() / ref.abs().max()).item()
        print(f"float32 behind casts, noise={noise}: {err:.2g}")
    print(f"  estimate_noise: {estimate_noise(cast)(x):.2g}")

    def exact(p: torch.Tensor) -> torch.Tensor:
        a, b = p[0], p[1]
        y1 = torch.exp(-2 * a) + b / (a - b) * (torch.exp(-2 * b) - torch.exp(-2 * a))
        return torch.stack([y1, torch.exp(-2 * b)])

    p = torch.tensor([0.7, 0.3], dtype=torch.float64)
    ref = torch.func.jacrev(exact)(p)
    for rtol in (1e-6, 1e-8, 1e-10):

        def simulate(q: torch.Tensor, rtol: float = rtol) -> torch.Tensor:
            a, b = q.tolist()
            sol = solve_ivp(
                lambda t, y: [-a * y[0] + b * y[1], -b * y[1]],
                (0, 2),
                [1.0, 1.0],
                rtol=rtol,
                atol=1e-12,
            )
            return torch.tensor(sol.y[:, -1])

        level = estimate_noise(simulate, strategy="loop")(p)
        for noise in (None, rtol, "estimate"):
            jac = jacfd(simulate, strategy="loop", noise=noise)(p)
            err = ((jac - ref).abs().max() / ref.abs().max()).item()
            print(f"solve_ivp rtol={rtol} noise={noise}: {err:.2g} (estimate {level:.2g})")


if __name__ == "__main__":
    typical_table()
    noise_table()
