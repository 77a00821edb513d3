"""Unusual but valid inputs, caller safety, and the step rule as observed from outside."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_jacobian_close
from torch.func import jacrev

from jacfd import jacfd

torch.manual_seed(0)


def smooth(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * x.sum() + x**2


@pytest.mark.parametrize("scheme", ["forward", "backward", "central"])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_caller_tensors_are_never_mutated(scheme: str, chunk_size: int | None) -> None:
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.randn(3, dtype=torch.float64)
    x_before, y_before = x.clone(), y.clone()
    jacfd(lambda x, y: (x * y).sin(), argnums=(0, 1), scheme=scheme, chunk_size=chunk_size)(x, y)
    assert torch.equal(x, x_before) and torch.equal(y, y_before)
    assert x._version == 0 and y._version == 0


def test_zero_dim_input_and_output() -> None:
    x = torch.tensor(0.7, dtype=torch.float64)
    jacobian = jacfd(lambda x: torch.sin(x) * x)(x)
    assert jacobian.shape == ()
    assert_jacobian_close(jacobian, jacrev(lambda x: torch.sin(x) * x)(x), torch.float64)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(4, 3, dtype=torch.float64).t(),  # non-contiguous
        lambda: torch.randn(3, 1, dtype=torch.float64).expand(3, 4),  # stride 0
        lambda: torch.randn(6, dtype=torch.float64)[::2],  # strided view
        lambda: torch.randn(3, dtype=torch.float64).requires_grad_(),
    ],
    ids=["transposed", "expanded", "strided", "requires_grad"],
)
def test_unusual_layouts(make: object) -> None:
    x = make()  # type: ignore[operator]
    assert_jacobian_close(jacfd(smooth)(x), jacrev(smooth)(x.detach()), torch.float64)


def test_empty_input_gives_empty_jacobian() -> None:
    x = torch.zeros(0, 3, dtype=torch.float64)
    jacobian = jacfd(lambda x, y: y.sin() + x.sum(), argnums=(0, 1))(
        x, torch.ones(2, dtype=torch.float64)
    )
    assert jacobian[0].shape == (2, 0, 3)
    assert_jacobian_close(
        jacobian[1], torch.diag(torch.ones(2, dtype=torch.float64).cos()), torch.float64
    )
    assert jacfd(torch.sin)(torch.zeros(0)).shape == (0, 0)


def test_empty_output_gives_empty_jacobian() -> None:
    x = torch.randn(3, dtype=torch.float64)
    assert jacfd(lambda x: x[:0])(x).shape == (0, 3)


def test_dtype_follows_the_output() -> None:
    x = torch.randn(3, dtype=torch.float32)
    assert jacfd(lambda x: x.double().sin())(x).dtype == torch.float64
    assert jacfd(lambda x: torch.exp(1j * x))(x).dtype == torch.complex64


def test_complex_output_matches_analytic() -> None:
    x = torch.randn(3, dtype=torch.float64)
    expected = torch.diag(1j * torch.exp(1j * x))
    assert_jacobian_close(jacfd(lambda x: torch.exp(1j * x))(x), expected, torch.float64)


def test_returned_function_is_reentrant() -> None:
    """No state is kept between calls: one transform serves different shapes, and
    may call itself (nested) while another call of it is in flight."""
    g = jacfd(smooth)
    for shape in [(3,), (2, 2), ()]:
        x = torch.randn(shape, dtype=torch.float64)
        assert_jacobian_close(g(x), jacrev(smooth)(x), torch.float64)
    x = torch.randn(3, dtype=torch.float64)
    nested = jacfd(lambda x: g(x).sum(0))(x)
    assert nested.shape == (3, 3)


# --- the step rule --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["forward", "backward"])
def test_absolute_delta_is_the_step_taken(dtype: torch.dtype, scheme: str) -> None:
    """Forward differences of x**2 give 2x + h exactly in exact arithmetic, so the
    step that was taken can be read off the result."""
    x = torch.tensor([0.25, 1.5, -3.0], dtype=dtype)
    h = 2.0**-10  # exactly representable, and x + h too
    diagonal = torch.diagonal(jacfd(lambda x: x**2, delta=h, scheme=scheme)(x))
    sign = 1 if scheme == "forward" else -1
    torch.testing.assert_close(diagonal, 2 * x + sign * h, rtol=0, atol=4 * torch.finfo(dtype).eps)


def test_per_element_delta_tensor() -> None:
    x = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    h = torch.tensor([2.0**-8, 2.0**-10, 2.0**-12], dtype=torch.float64)
    diagonal = torch.diagonal(jacfd(lambda x: x**2, delta=h, scheme="forward")(x))
    torch.testing.assert_close(diagonal, 2 * x + h, rtol=0, atol=1e-12)
    # A broadcastable tensor works too.
    scalar = torch.tensor(2.0**-9, dtype=torch.float64)
    diagonal = torch.diagonal(jacfd(lambda x: x**2, delta=scalar, scheme="forward")(x))
    torch.testing.assert_close(diagonal, 2 * x + scalar, rtol=0, atol=1e-12)


def test_pytree_delta_matches_the_arguments() -> None:
    x = {
        "a": torch.tensor([1.0], dtype=torch.float64),
        "b": torch.tensor([2.0], dtype=torch.float64),
    }
    steps = {"a": 2.0**-6, "b": torch.tensor([2.0**-8], dtype=torch.float64)}
    f = jacfd(lambda p: p["a"] ** 2 + p["b"] ** 2, delta=steps, scheme="forward")
    jacobian = f(x)
    torch.testing.assert_close(jacobian["a"], torch.tensor([[2.0 + 2.0**-6]], dtype=torch.float64))
    torch.testing.assert_close(jacobian["b"], torch.tensor([[4.0 + 2.0**-8]], dtype=torch.float64))
    # With an argnums tuple, delta is a tuple over the arguments.
    g = jacfd(lambda x, y: x**2 * y, argnums=(0, 1), delta=(2.0**-6, 2.0**-7), scheme="forward")
    one = torch.ones(1, dtype=torch.float64)
    jx, jy = g(one, one)
    torch.testing.assert_close(jx, torch.tensor([[2.0 + 2.0**-6]], dtype=torch.float64))
    torch.testing.assert_close(jy, torch.tensor([[1.0]], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["forward", "backward", "central"])
def test_automatic_step_is_relative_and_exactly_representable(
    dtype: torch.dtype, scheme: str
) -> None:
    """The automatic step is eps**(1/(p+1)) * max(1, |x|) (to within the rounding
    that makes it exact), read off a quadratic's forward/backward difference."""
    from jacfd._src._stencil import get_stencil
    from jacfd._src._steps import exact_steps

    stencil = get_stencil(scheme)
    x = torch.tensor([0.0, 0.3, -1.0, 7.0, -250.0], dtype=dtype)
    h = exact_steps(x, None, stencil, torch.finfo(dtype).eps)
    ideal = torch.finfo(dtype).eps ** (1 / (stencil.accuracy + 1)) * x.abs().clamp_min(1)
    assert torch.all((h / ideal - 1).abs() < 0.5)
    direction = stencil.leading_direction
    assert torch.equal((x + direction * h) - x, direction * h)
