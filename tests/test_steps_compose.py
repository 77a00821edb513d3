"""typical=, noise= and bounds= (issue 15) composed with vmap, grad and torch.compile.

References: under vmap, the same transform called per sample; under grad, the
gradient of the exact torch.func derivative in float64 (within the scheme's
tolerance at the steps the option gives); under torch.compile, the eager call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.func import grad, hessian, jacrev, jvp, vmap

from jacfd import estimate_noise, hessdiagfd, jacfd, jacfd_adaptive, jvpfd

F64 = torch.float64
EPS = torch.finfo(F64).eps

# Rows of points in (0, 2); the first two rows sit within 1e-9 of a bound, where
# bounds=(0, 2) turns or shrinks the steps.
X = torch.tensor(
    [
        [1e-9, 0.5, 1.0, 2 - 1e-9],
        [0.3, 2 - 1e-10, 1e-10, 1.7],
        [0.2, 0.9, 1.4, 1.1],
    ],
    dtype=F64,
)
# Along V the points near a bound have room on the side of positive steps.
V = torch.tensor([0.5, -1.0, 0.25, -1.0], dtype=F64)

OPTIONS: dict[str, dict[str, Any]] = {
    "typical-float": {"typical": 3.0},
    "typical-tensor": {"typical": torch.tensor([3.0, 0.5, 2.0, 4.0], dtype=F64)},
    "noise-float": {"noise": 1e-13},
    "bounds": {"bounds": (0.0, 2.0)},
}


def vector(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * x.sum() + torch.exp(x / 2) ** 2


def scalar(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x).prod() * torch.exp(x / 2).sum() + (x**3).sum() / 3


def tolerance(option: dict[str, Any], derivative: int = 1) -> float:
    """The central scheme's error at the option's steps, with the suite's safety factor
    (a typical size above 1 lengthens the steps, and the truncation error as its square)."""
    precision = max(EPS, option.get("noise", 0.0))
    typical = option.get("typical", 1.0)
    size = float(typical.max()) if isinstance(typical, torch.Tensor) else typical
    return 50.0 * precision ** (2 / (2 + derivative)) * max(1.0, size) ** 2


def assert_equal_to_rounding(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12 * scale)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= tol * scale, f"max error {error:.3e} > {tol * scale:.3e}"


# One function of x per transform: the FD derivative and its exact reference.
TRANSFORMS: dict[str, tuple[Callable[..., Any], Callable[[torch.Tensor], torch.Tensor], int]] = {
    "jacfd": (lambda **kw: jacfd(vector, **kw), jacrev(vector), 1),
    "hessdiagfd": (
        lambda **kw: hessdiagfd(scalar, **kw),
        lambda x: torch.diagonal(hessian(scalar)(x)),
        2,
    ),
    "jvpfd": (
        lambda **kw: lambda x: jvpfd(vector, (x,), (V,), **kw)[1],
        lambda x: jvp(vector, (x,), (V,))[1],
        1,
    ),
}


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_vmap_equals_per_sample_calls(transform: str, option: str) -> None:
    fd = TRANSFORMS[transform][0](**OPTIONS[option])
    expected = torch.stack([fd(x) for x in X])
    assert_equal_to_rounding(vmap(fd)(X), expected)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_grad_through_transform(transform: str, option: str) -> None:
    make, exact, derivative = TRANSFORMS[transform]
    fd = make(**OPTIONS[option])
    tol = tolerance(OPTIONS[option], derivative)
    for x in X:
        actual = grad(lambda x: (fd(x) ** 2).sum())(x)
        expected = grad(lambda x: (exact(x) ** 2).sum())(x)
        # ... and the derivative itself, so that a step that ignores the option fails.
        assert_within(fd(x), exact(x), tol)
        assert_within(actual, expected, tol)


@pytest.mark.parametrize(
    ("transform", "option"),
    # (jvpfd builds its plan per call, which breaks the graph with or without options.)
    [("jacfd", name) for name in OPTIONS] + [("hessdiagfd", "bounds")],
)
def test_compile_equals_eager(transform: str, option: str, fresh_dynamo: None) -> None:
    fd = TRANSFORMS[transform][0](**OPTIONS[option])
    compiled = torch.compile(fd, fullgraph=True, backend="aot_eager")
    for x in X[:2]:
        assert_equal_to_rounding(compiled(x), fd(x))


# --- noise="estimate": a level per sample under vmap; refused by a full graph -----------


def float32_inside(x: torch.Tensor) -> torch.Tensor:
    """func accurate to float32 only: its noise (~6e-8) is what the estimate sees."""
    return (torch.sin(x.float()) * x.float().sum()).double()


def float32_scalar(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x.float()).prod().double() + (x**3).sum() / 3


ESTIMATED: dict[str, Callable[..., Any]] = {
    "jacfd": lambda **kw: jacfd(float32_inside, **kw),
    "hessdiagfd": lambda **kw: hessdiagfd(float32_scalar, **kw),
    "jvpfd": lambda **kw: lambda x: jvpfd(float32_inside, (x,), (V,), **kw)[1],
}


@pytest.mark.parametrize("transform", list(ESTIMATED))
@pytest.mark.parametrize("bounds", [None, (0.0, 2.0)], ids=["free", "bounds"])
def test_noise_estimate_under_vmap(transform: str, bounds: Any) -> None:
    fd = ESTIMATED[transform](noise="estimate", bounds=bounds)
    expected = torch.stack([fd(x) for x in X])
    assert_equal_to_rounding(vmap(fd)(X), expected)
    # The estimate mattered: steps for float64's eps differ.
    assert not torch.equal(
        expected, torch.stack([ESTIMATED[transform](bounds=bounds)(x) for x in X])
    )


def test_noise_estimate_under_vmap_adaptive() -> None:
    fd = jacfd_adaptive(float32_inside, noise="estimate")
    batched, per_sample = vmap(fd)(X), [fd(x) for x in X]
    for i in range(2):  # the Jacobian and its error estimate
        assert_equal_to_rounding(batched[i], torch.stack([r[i] for r in per_sample]))


def test_noise_estimate_under_grad_matches_float_level() -> None:
    x = X[2]
    level = estimate_noise(float32_inside)(x)
    assert 1e-9 < level < 1e-6
    by_estimate = grad(lambda x: jacfd(float32_inside, noise="estimate")(x).sum())(x)
    by_level = grad(lambda x: jacfd(float32_inside, noise=level)(x).sum())(x)
    assert_equal_to_rounding(by_estimate, by_level)


def test_noise_estimate_refused_by_full_graph(fresh_dynamo: None) -> None:
    compiled = torch.compile(
        jacfd(float32_inside, noise="estimate"), fullgraph=True, backend="aot_eager"
    )
    with pytest.raises(Exception, match=r"jacfd\(func, noise='estimate'\) does not compile"):
        compiled(X[2])


def test_batched_typical_and_bounds_tensors() -> None:
    """Per-sample typical and bounds tensors (their values unread under vmap)."""
    typical, lower = X.abs() + 1.0, X - 1e-9

    def per_sample(x: torch.Tensor, t: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        return jacfd(vector, typical=t, bounds=(lo, 2.0))(x)

    expected = torch.stack([per_sample(*row) for row in zip(X, typical, lower)])
    assert_equal_to_rounding(vmap(per_sample)(X, typical, lower), expected)
