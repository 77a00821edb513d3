"""Evaluation strategies for functions vmap cannot trace: loop and real batches.

References are analytic derivatives or float64 autograd on an equivalent
vmappable function; tolerances come from ``fd_tolerance`` (conftest).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import torch
from conftest import assert_jacobian_close
from torch.func import jacrev

from jacfd import Batched, hessfd, jacfd, jvpfd

F64 = torch.float64


def point(n: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=generator, dtype=F64) + 0.5


# ------------------------------------------------------------- black-box functions


def gamma_sin(x: torch.Tensor) -> torch.Tensor:
    """A scipy black box: gamma(x) * sin(x) element-wise, through numpy."""
    values = x.numpy()
    return torch.from_numpy(scipy.special.gamma(values) * np.sin(values))


def gamma_sin_derivative(x: torch.Tensor) -> torch.Tensor:
    v = x.numpy()
    d = scipy.special.gamma(v) * (scipy.special.digamma(v) * np.sin(v) + np.cos(v))
    return torch.diag(torch.from_numpy(d))


def decay(x: torch.Tensor) -> torch.Tensor:
    """y(1) of y' = -k y, y(0) = y0 for rates k = x[:2] and y0 = x[2:], via scipy:
    the analytic answer is y0 * exp(-k)."""
    rates, start = x[:2].numpy(), x[2:].numpy()
    solution = scipy.integrate.solve_ivp(
        lambda t, y: -rates * y, (0.0, 1.0), start, rtol=1e-12, atol=1e-14
    )
    return torch.from_numpy(solution.y[:, -1].copy())


def decay_jacobian(x: torch.Tensor) -> torch.Tensor:
    return jacrev(lambda x: x[2:] * torch.exp(-x[:2]))(x)


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_loop_through_scipy_special(scheme: str, chunk_size: int | None) -> None:
    x = point()
    actual = jacfd(gamma_sin, scheme=scheme, strategy="loop", chunk_size=chunk_size)(x)
    assert_jacobian_close(actual, gamma_sin_derivative(x), F64, scheme)


def test_loop_through_scipy_integrate() -> None:
    """The ODE solver's own error (rtol 1e-12) bounds the differences' noise, so
    the step must be sized for it: delta = (1e-12)**(1/3) * |x|-scale."""
    x = point()
    actual = jacfd(decay, strategy="loop", delta=1e-4)(x)
    # Central differences with h = 1e-4 on values accurate to ~1e-12: error
    # ~ 1e-12 / 1e-4 + h**2 ~ 1e-8.
    torch.testing.assert_close(actual, decay_jacobian(x), rtol=0, atol=1e-7)


def branching(x: torch.Tensor) -> torch.Tensor:
    """Python control flow on tensor values: .item() and a data-dependent branch."""
    if x.sum().item() > 0:
        return torch.sin(x) * x.max().item()
    return torch.cos(x)


def test_item_and_branching_in_a_loop() -> None:
    x = point()
    scale = x.max().item()  # the max is a constant near x (its argmax does not move)
    expected = torch.diag(torch.cos(x) * scale)
    expected[:, int(x.argmax())] += torch.sin(x)
    for transform in (jacfd(branching, strategy="loop"), jacfd(branching, chunk_size=1)):
        assert_jacobian_close(transform(x), expected, F64)


class SinNoBackward(torch.autograd.Function):
    """A custom op whose backward raises, and which has no vmap support."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.sin()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("SinNoBackward has no backward")


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_custom_function_without_backward(strategy: str) -> None:
    x = point()
    actual = jacfd(SinNoBackward.apply, strategy=strategy)(x)
    assert_jacobian_close(actual, torch.diag(torch.cos(x)), F64)
    with pytest.raises(RuntimeError, match="strategy='loop'"):
        jacfd(SinNoBackward.apply)(x)


# ------------------------------------------------------------------ real batches


def batchnorm_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    batchnorm = model[1]
    assert isinstance(batchnorm, torch.nn.BatchNorm1d)
    batchnorm.running_mean.uniform_(-1, 1)
    batchnorm.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("scheme", ["forward", "backward", "central"])
def test_batchnorm_model_in_eval_mode(scheme: str) -> None:
    model, x = batchnorm_model(), point()
    actual = jacfd(model, scheme=scheme, strategy="batched")(x)
    expected = jacrev(lambda v: model(v[None])[0])(x)
    assert_jacobian_close(actual, expected, F64, scheme)


def test_existing_size_one_axis() -> None:
    """The predecessor's ``dim``: stack into the model's own batch axis of size 1."""
    model, x = batchnorm_model(), point()[None]
    actual = jacfd(model, strategy=Batched(existing=True))(x)
    assert actual.shape == (1, 3, 1, 4)
    assert_jacobian_close(actual, jacrev(model)(x), F64)


@pytest.mark.parametrize("dim", [2, -1])
def test_batch_along_a_late_dimension(dim: int) -> None:
    """Stacking along dim >= 2: the predecessor was silently wrong there."""
    weight = torch.linspace(-1, 1, 12, dtype=F64).reshape(4, 3)

    def columns(x: torch.Tensor) -> torch.Tensor:  # x: (2, 4, B) -> (2, 3, B)
        return torch.tanh(torch.einsum("ijb,jk->ikb", x, weight))

    x = torch.linspace(-1, 1, 8, dtype=F64).reshape(2, 4)
    actual = jacfd(columns, strategy=Batched(dim=dim))(x)
    expected = jacrev(lambda v: torch.tanh(v @ weight))(x)
    assert_jacobian_close(actual, expected, F64)


def test_output_batch_axis_elsewhere() -> None:
    """The output's batch axis is where the user says (out_dim), never found by
    size: here an unrelated output axis has the batch size too."""
    x = point(4)  # central: 8 points, and the output has an axis of size 8 first
    basis = torch.linspace(-1, 1, 32, dtype=F64).reshape(8, 4)

    def batch_last(v: torch.Tensor) -> torch.Tensor:  # (B, 4) -> (8, B)
        return torch.sin(basis @ v.T)

    actual = jacfd(batch_last, strategy=Batched(out_dim=-1))(x)
    assert_jacobian_close(actual, jacrev(lambda v: torch.sin(basis @ v))(x), F64)


def test_other_arguments_broadcast_or_repeat() -> None:
    x, y = point(3, 1), point(3, 2)
    seen: list[tuple[int, ...]] = []

    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(b.shape))
        return a * b

    expected = torch.diag(y)
    assert_jacobian_close(jacfd(product, strategy="batched")(x, y), expected, F64)
    assert seen[-1] == (3,)  # broadcast: passed unchanged
    repeated = jacfd(product, strategy=Batched(others="repeat"))(x, y)
    assert_jacobian_close(repeated, expected, F64)
    assert seen[-1] == (6, 3)  # repeated along the batch axis


def test_batched_with_several_argnums_and_chunks() -> None:
    x, y = point(3, 1), point(2, 2)

    def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (B, 3), (B, 2)
        return torch.sin(a[:, :, None] * b[:, None, :])

    expected = jacrev(lambda a, b: torch.sin(a[:, None] * b[None, :]), argnums=(0, 1))(x, y)
    for chunk_size in (None, 1, 3):
        transform = jacfd(outer, argnums=(0, 1), strategy="batched", chunk_size=chunk_size)
        assert_jacobian_close(transform(x, y), expected, F64)


def test_batched_has_aux_takes_the_centre() -> None:
    x = point()
    jac, aux = jacfd(lambda v: (v.sin(), v.sum(-1)), strategy="batched", has_aux=True)(x)
    assert_jacobian_close(jac, torch.diag(x.cos()), F64)
    torch.testing.assert_close(aux, x.sum())


def test_strategies_agree_for_every_transform() -> None:
    x = point(3)

    def f(v: torch.Tensor) -> torch.Tensor:
        return (v.sin() * v.sum(-1, keepdim=True)).sum(-1)

    for strategy in ("loop", "batched"):
        torch.testing.assert_close(
            hessfd(f, strategy=strategy)(x), hessfd(f)(x), rtol=1e-9, atol=1e-9
        )
        torch.testing.assert_close(
            jvpfd(f, (x,), (torch.ones_like(x),), strategy=strategy)[1],
            jvpfd(f, (x,), (torch.ones_like(x),))[1],
        )


# ------------------------------------------------------------------------ errors


def test_wrong_output_batch_is_reported() -> None:
    with pytest.raises(
        ValueError, match=r"returned a tensor of shape \(4,\), which has no axis of size 8"
    ):
        jacfd(lambda v: v.sum(0), strategy="batched")(point())


def test_existing_axis_must_have_size_one() -> None:
    with pytest.raises(ValueError, match=r"has no axis of size 1 at dim 0"):
        jacfd(torch.sin, strategy=Batched(existing=True))(point())


def test_new_axis_dim_out_of_range() -> None:
    with pytest.raises(ValueError, match="dim is out of range"):
        jacfd(torch.sin, strategy=Batched(dim=3))(point())


def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match=r"^jacfd\(func, strategy='batch'\): unknown strategy"):
        jacfd(torch.sin, strategy="batch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="others must be 'broadcast' or 'repeat'"):
        jacfd(torch.sin, strategy=Batched(others="copy"))  # type: ignore[arg-type]


def test_batched_cannot_share_random_numbers() -> None:
    with pytest.raises(ValueError, match="a real batch draws different random numbers"):
        jacfd(torch.sin, strategy="batched", randomness="same")


@pytest.mark.parametrize("strategy", ["batched", "loop"])
def test_randomness_is_detected_without_vmap(strategy: str) -> None:
    with pytest.raises(RuntimeError, match="used the random number generator"):
        jacfd(lambda v: torch.nn.functional.dropout(v, 0.5), strategy=strategy)(point())


def test_loop_evaluates_every_point_once_in_chunks() -> None:
    calls: list[tuple[int, ...]] = []

    def recorded(v: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(v.shape))
        return v.sin()

    x = point(5)
    jacfd(recorded, strategy="loop", chunk_size=4)(x)
    assert calls == [(5,)] * 10  # central: 2 points per coordinate, no batch axis
    calls.clear()
    jacfd(recorded, strategy="batched", chunk_size=4, scheme="forward")(x)
    assert calls == [(4, 5), (2, 5)]  # forward: centre + 5 points in calls of <= 4
