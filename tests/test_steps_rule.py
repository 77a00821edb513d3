"""typical=, noise= and bounds= (issue 15): steps that fit the function."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp
from scipy.optimize import least_squares
from scipy.optimize._numdiff import approx_derivative

from jacfd import (
    estimate_noise,
    hessdiagfd,
    hessfd,
    jacfd,
    jacfd_with_error,
    jvpfd,
    laplacianfd,
)

F64 = torch.float64


# --- typical: inputs of every scale -------------------------------------------------------

T = torch.linspace(0, 2e5, 50, dtype=F64)
B = torch.tensor([1e-5, 1e3], dtype=F64)


def decay(b: torch.Tensor) -> torch.Tensor:
    return b[1] * torch.exp(-b[0] * T)


def column_errors(jac: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (jac - ref).abs().amax(0) / ref.abs().amax(0)


@pytest.mark.parametrize("kw", [{}, {"order": 4}, {"scheme": "forward"}])
def test_typical_fixes_tiny_parameter(kw: dict[str, object]) -> None:
    ref = torch.func.jacrev(decay)(B)
    default = column_errors(jacfd(decay, **kw)(B), ref)  # type: ignore[arg-type]
    scaled = column_errors(jacfd(decay, typical=B.abs(), **kw)(B), ref)  # type: ignore[arg-type]
    assert default[0] > 1e-3  # the step of 6e-6 (central) is 60% of b0
    bound = 1e-7 if kw.get("scheme") == "forward" else 1e-9
    assert scaled.max() < bound
    # A float typical applies to every element (here the large b1 keeps |x|).
    assert column_errors(jacfd(decay, typical=1e-5)(B), ref).max() < 1e-9


def test_with_error_sees_tiny_parameter() -> None:
    ref = torch.func.jacrev(decay)(B)
    for typical in (None, B.abs()):
        J, err = jacfd_with_error(decay, typical=typical)(B)
        assert bool(((J - ref).abs() <= err).all())


# Hahn1 from NIST's StRD (docs/scripts/nist_strd.json): a cubic/cubic rational model
# whose parameters span 1.2e-7 (b7, multiplying x**3 with x up to 900) to 1.
NIST = json.loads((Path(__file__).parents[1] / "docs/scripts/nist_strd.json").read_text())


def hahn1() -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, list[float]]:
    data = NIST["Hahn1"]
    x = torch.tensor([float(v) for v in data["x"][0].split()], dtype=F64)
    y = torch.tensor([float(v) for v in data["y"].split()], dtype=F64)

    def residual(b: torch.Tensor) -> torch.Tensor:
        num = b[0] + b[1] * x + b[2] * x**2 + b[3] * x**3
        return num / (1 + b[4] * x + b[5] * x**2 + b[6] * x**3) - y

    certified = torch.tensor([float(c) for c in data["certified"]], dtype=F64)
    return residual, certified, data["start1"]


def test_default_step_on_nist_hahn1_and_typical() -> None:
    """The default step stays max(1, |x|) (docs/choosing.md, "Inputs of every scale"):
    on Hahn1 its b7 column is wrong, a relative step fixes it and the solve. If the
    default changes, this test fails: update the tables there."""
    residual, certified, start = hahn1()
    ref = torch.func.jacrev(residual)(certified)
    assert column_errors(jacfd(residual)(certified), ref)[6] > 0.1
    good = column_errors(jacfd(residual, typical=certified.abs())(certified), ref)
    assert good.max() < 1e-7

    def digits(jac: Callable[[torch.Tensor], torch.Tensor]) -> float:
        result = least_squares(
            lambda b: residual(torch.from_numpy(b)).numpy(),
            np.array(start),
            jac=lambda b: jac(torch.from_numpy(b.copy())).numpy(),
            method="lm",
            ftol=1e-15,
            xtol=1e-15,
            gtol=1e-15,
        )
        err = np.abs(result.x - certified.numpy()) / np.abs(certified.numpy())
        return float(-np.log10(err.max()))

    relative = lambda b: b.abs().clamp_min(1e-300)  # noqa: E731
    assert digits(lambda b: jacfd(residual, typical=relative(b))(b)) > 6
    assert digits(torch.func.jacrev(residual)) > 6
    assert digits(jacfd(residual)) < 4


def lanczos1() -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """NIST's Lanczos1: exponentials fitted to 1e-13, so the residual cancels to
    ~1e-13 of the model's terms at the certified parameters."""
    data = NIST["Lanczos1"]
    x = torch.tensor([float(v) for v in data["x"][0].split()], dtype=F64)
    y = torch.tensor([float(v) for v in data["y"].split()], dtype=F64)

    def residual(b: torch.Tensor) -> torch.Tensor:
        terms = b[0::2, None] * torch.exp(-b[1::2, None] * x)
        return terms.sum(0) - y

    return residual, torch.tensor([float(c) for c in data["certified"]], dtype=F64)


def test_with_error_sees_hahn1_b7() -> None:
    """Hahn1's b7 column: the steps h and 2h (50 and 100 times b7) both cross the
    pole of the model, so their spread says nothing; the Taylor check marks the
    column inf, at the start and at the solution. Every other entry is bounded too."""
    residual, certified, start = hahn1()
    for b in (torch.tensor(start, dtype=F64), certified):
        ref = torch.func.jacrev(residual)(b)
        J, err = jacfd_with_error(residual)(b)
        assert bool(((J - ref).abs() <= err).all())
        assert bool(torch.isinf(err[:, 6]).all())
        assert bool(torch.isfinite(err[:, :5]).all())


def test_with_error_rounding_of_a_cancelling_residual() -> None:
    """|f| is ~1e-13 of the terms that cancel in it: the rounding bound counts the
    largest term |x_j J_ij| and the measured 4th differences instead."""
    residual, certified = lanczos1()
    ref = torch.func.jacrev(residual)(certified)
    J, err = jacfd_with_error(residual)(certified)
    assert bool(((J - ref).abs() <= err).all())
    assert bool(torch.isfinite(err).all())
    assert float((err / ref.abs().amax(0)).max()) < 1e-8  # still a useful estimate


@pytest.mark.parametrize(
    ("func", "x"),
    [
        (lambda x: (x**2).sum(), torch.zeros(3, dtype=F64)),  # a minimum: gradient 0
        (lambda x: x**3, torch.zeros(2, dtype=F64)),  # f' = f'' = 0
        (lambda x: x**2 + x[0] * 1e-30, torch.zeros(2, dtype=F64)),
        (lambda x: torch.sin(x) * 1e-20, torch.tensor([0.0, 1.0], dtype=F64)),
    ],
)
def test_with_error_taylor_check_without_false_alarms(
    func: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
) -> None:
    """Vanishing derivatives fail one of the two decay checks, not both: the
    estimate stays finite and bounds the error."""
    J, err = jacfd_with_error(func)(x)
    assert bool(torch.isfinite(err).all())
    assert bool(((J - torch.func.jacrev(func)(x)).abs() <= err).all())


def test_with_error_marks_the_tiny_parameter_inf() -> None:
    """b0 = 1e-5 with t up to 2e5: the default step (0.6 of b0) is beyond the
    Taylor region of exp(-b0 t); with typical= the column is estimated again."""
    J, err = jacfd_with_error(decay)(B)
    assert bool(torch.isinf(err[:, 0]).all()) and bool(torch.isfinite(err[:, 1]).all())
    J, err = jacfd_with_error(decay, typical=B.abs())(B)
    assert bool(torch.isfinite(err).all())
    assert float(err[:, 0].max() / J[:, 0].abs().max()) < 1e-8


def test_typical_pytree_and_errors() -> None:
    f = lambda p: p["a"] * torch.exp(-p["k"] * T)  # noqa: E731
    p = {"a": torch.tensor(1e3, dtype=F64), "k": torch.tensor(1e-5, dtype=F64)}
    ref = torch.func.jacrev(f)(p)
    J = jacfd(f, typical={"a": 1.0, "k": torch.tensor(1e-5, dtype=F64)})(p)
    torch.testing.assert_close(J["k"], ref["k"], rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match=r"jacfd\(func, typical=-1.0\)"):
        jacfd(decay, typical=-1.0)
    with pytest.raises(ValueError, match="structure of typical"):
        jacfd(f, typical={"a": 1.0})(p)


# --- noise ---------------------------------------------------------------------------------


def hash_noise(x: torch.Tensor, level: float) -> torch.Tensor:
    """Deterministic relative noise of standard deviation ``level``: a hash of x's bits."""
    h = x.view(torch.int64) * 6364136223846793005 + 1442695040888963407
    h = h ^ (h >> 29)
    u = (h & 0xFFFFFF).to(F64) / 0xFFFFFF - 0.5
    return u * math.sqrt(12) * level


def test_noise_hash_function() -> None:
    level = 1e-8
    f = lambda x: torch.exp(x) * (1 + hash_noise(x, level))  # noqa: E731
    x = torch.linspace(-1, 1, 6, dtype=F64)
    estimate = estimate_noise(f)(x)
    assert level / 3 < estimate < 3 * level
    ref = torch.diag(torch.exp(x))
    default = (jacfd(f)(x) - ref).abs().max() / ref.abs().max()
    sized = (jacfd(f, noise=level)(x) - ref).abs().max() / ref.abs().max()
    estimated = (jacfd(f, noise="estimate")(x) - ref).abs().max() / ref.abs().max()
    assert default > 3e-4  # steps sized for eps: the noise is divided by 6e-6
    assert sized < 1e-5 and estimated < 1e-5  # ~ level**(2/3)
    J, err = jacfd_with_error(f, noise=level)(x)
    assert bool(((J - ref).abs() <= err).all())


def test_noise_float32_model_behind_casts() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4), torch.nn.Tanh()
    )
    ref = torch.func.jacrev(copy.deepcopy(net).double())(x := torch.randn(8, dtype=F64)).detach()
    f = lambda x: net(x.float()).double()  # noqa: E731
    error = lambda jac: float((jac - ref).abs().max() / ref.abs().max())  # noqa: E731
    assert error(jacfd(f)(x)) > 1e-2
    assert error(jacfd(f, noise=6e-8)(x)) < 5e-4
    assert error(jacfd(f, noise="estimate")(x)) < 5e-4
    assert 1e-8 < estimate_noise(f)(x) < 3e-7


def test_noise_solve_ivp() -> None:
    def exact(p: torch.Tensor) -> torch.Tensor:
        a, b = p[0], p[1]
        return torch.stack(
            [
                torch.exp(-2 * a) + b / (a - b) * (torch.exp(-2 * b) - torch.exp(-2 * a)),
                torch.exp(-2 * b),
            ]
        )

    p = torch.tensor([0.7, 0.3], dtype=F64)
    ref = torch.func.jacrev(exact)(p)
    for rtol in (1e-6, 1e-9):

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

        for noise in (rtol, "estimate"):
            J = jacfd(simulate, strategy="loop", noise=noise)(p)
            # The accuracy the noise allows, ~ rtol**(2/3) at worst.
            assert float((J - ref).abs().max() / ref.abs().max()) < 3 * rtol ** (2 / 3)


def test_noise_errors() -> None:
    with pytest.raises(ValueError, match="noise must be None, a float"):
        jacfd(torch.sin, noise="guess")
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        hessfd(torch.sin, noise=2.0)
    with pytest.raises(TypeError, match="unknown option"):
        estimate_noise(torch.sin, delta=1.0)


# --- bounds --------------------------------------------------------------------------------

X = torch.tensor([0.0, 1e-7, 1e-3, 0.5, 2.0], dtype=F64)


def half_line(x: torch.Tensor) -> torch.Tensor:
    if bool((x < 0).any()):
        raise AssertionError("evaluated outside the bounds")
    return torch.log1p(x) + torch.sqrt(x + 0.1) * x.sum()


@pytest.mark.parametrize("kw", [{}, {"scheme": "forward"}, {"scheme": "backward"}])
def test_bounds_like_scipy(kw: dict[str, object]) -> None:
    ref = torch.func.jacrev(half_line)(X)
    J = jacfd(half_line, bounds=(0.0, math.inf), strategy="loop", **kw)(X)  # type: ignore[arg-type]
    method = "2-point" if "scheme" in kw else "3-point"
    scipy = approx_derivative(
        lambda z: half_line(torch.tensor(z)).numpy(), X.numpy(), method=method, bounds=(0, np.inf)
    )
    ours, theirs = column_errors(J, ref), column_errors(torch.tensor(scipy), ref)
    assert bool((ours <= 3 * theirs + 1e-9).all()), (ours, theirs)


def test_bounds_at_the_bound_every_transform() -> None:
    upper = torch.full_like(X, 3.0)
    bounds = (0.0, upper)
    g = lambda x: (half_line(x) * x.flip(0)).sum()  # noqa: E731
    H = torch.func.hessian(g)(X)
    scale = H.abs().max()
    J, err = jacfd_with_error(half_line, bounds=bounds, strategy="loop")(X)
    assert bool(((J - torch.func.jacrev(half_line)(X)).abs() <= err).all())
    # sqrt(x + 0.1) curves on a scale of 0.1 at the bound: one-sided second
    # differences at h ~ eps**(1/(p+2)) keep ~(h / 0.1)**p of it.
    for order, tol in ((2, 1e-5), (4, 1e-5)):
        Hf = hessfd(g, bounds=bounds, order=order, strategy="loop")(X)
        assert float((Hf - H).abs().max() / scale) < tol
        d = hessdiagfd(g, bounds=bounds, order=order, strategy="loop")(X)
        assert float((d - H.diagonal()).abs().max() / scale) < tol
        lap = laplacianfd(g, bounds=bounds, order=order, strategy="loop")(X)
        assert abs(float(lap - H.diagonal().sum())) / float(scale) < tol
    ref = torch.func.jacrev(half_line)(X)
    for sign in (1.0, -1.0):
        v = sign * torch.ones_like(X)
        _, t = jvpfd(half_line, (X,), (v,), bounds=bounds, strategy="loop")
        assert float((t - ref @ v).abs().max() / (ref @ v).abs().max()) < 1e-6


def test_bounds_errors() -> None:
    with pytest.raises(ValueError, match="outside its bounds"):
        jacfd(torch.log, bounds=(0.0, 1.0))(torch.tensor([0.5, 2.0], dtype=F64))
    with pytest.raises(TypeError, match="must be a pair"):
        jacfd(torch.log, bounds=0.0)
    with pytest.raises(ValueError, match="exceeds the upper"):
        jacfd(torch.log, bounds=(1.0, 0.0))


def test_no_rule_changes_nothing() -> None:
    x = torch.linspace(0.1, 2, 5, dtype=F64)
    free = jacfd(torch.log)(x)
    assert torch.equal(jacfd(torch.log, bounds=(-math.inf, math.inf))(x), free)
    assert torch.equal(jacfd(torch.log, noise=0.0)(x), free)
