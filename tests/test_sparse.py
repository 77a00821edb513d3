"""Compressed Jacobians (column colouring) and per-sample Jacobians.

A compressed evaluation perturbs several columns at once; when the pattern is
right, every output sees only one of them move, so the result equals the dense
one to rounding. Per-sample Jacobians are checked against ``vmap(jacrev)``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_jacobian_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacrev, vmap

from jacfd import (
    banded_pattern,
    block_diagonal_pattern,
    check_sparsity,
    diagonal_pattern,
    jacfd,
)

F64 = torch.float64


def patterned(weights: torch.Tensor):
    """A smooth function whose Jacobian has exactly the non-zeros of ``weights``:
    ``f_i(x) = sum_j w_ij sin(x_j + i)``; a zero weight contributes an exact 0."""

    def f(x: torch.Tensor) -> torch.Tensor:
        shift = torch.arange(weights.shape[0], dtype=x.dtype)[:, None]
        return (weights * torch.sin(x[None, :] + shift)).sum(-1)

    return f


def counted(func):
    """``func`` with a count of the stencil points it is evaluated at (chunk_size=1)."""
    calls = []

    def wrapper(*args):
        calls.append(1)
        return func(*args)

    return wrapper, calls


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 12),
    n=st.integers(1, 12),
    density=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**16),
)
def test_compressed_equals_dense_on_random_patterns(
    m: int, n: int, density: float, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, n, generator=generator) < density
    weights = torch.randn(m, n, generator=generator, dtype=F64) * mask
    x = torch.rand(n, generator=generator, dtype=F64)
    f = patterned(weights)
    for pattern in (mask, mask.to_sparse()):
        compressed = jacfd(f, sparsity=pattern)(x)
        torch.testing.assert_close(compressed, jacfd(f)(x), rtol=1e-12, atol=1e-14)
        assert torch.all(compressed[~mask] == 0)


@pytest.mark.parametrize("scheme", ["forward", "central", "complex"])
def test_tridiagonal_system_costs_three_colours(scheme: str) -> None:
    n = 50
    x = torch.linspace(-1, 1, n, dtype=F64)

    def residual(u: torch.Tensor) -> torch.Tensor:  # a 1-D nonlinear diffusion stencil
        padded = torch.nn.functional.pad(u, (1, 1))
        return padded[:-2] - 2 * padded[1:-1] + padded[2:] - torch.exp(u) * u

    f, calls = counted(residual)
    jacobian = jacfd(f, scheme=scheme, sparsity=banded_pattern(n, 1), chunk_size=1)(x)
    assert_jacobian_close(jacobian, jacrev(residual)(x), F64, scheme)
    stencil_points = {"forward": 1, "central": 2, "complex": 1}[scheme]
    centre = 1 if scheme == "forward" else 0
    assert len(calls) == 3 * stencil_points + centre  # 3 colours, whatever n


def test_block_diagonal_and_diagonal_shortcuts() -> None:
    blocks, size = 4, 3
    x = torch.rand(blocks * size, dtype=F64)
    weight = torch.randn(size, size, dtype=F64)

    def per_block(v: torch.Tensor) -> torch.Tensor:
        return torch.tanh(v.reshape(blocks, size) @ weight).reshape(-1)

    pattern = block_diagonal_pattern(blocks, size, size)
    assert_jacobian_close(jacfd(per_block, sparsity=pattern)(x), jacrev(per_block)(x), F64)
    f, calls = counted(torch.sin)
    diagonal = jacfd(f, sparsity=diagonal_pattern(6), chunk_size=1)(x[:6])
    assert_jacobian_close(diagonal, torch.diag(x[:6].cos()), F64)
    assert len(calls) == 2  # one colour: x + h and x - h, for every element at once


def test_sparse_output_matches_dense() -> None:
    n = 30
    x = torch.rand(n, dtype=F64)
    f = patterned(banded_pattern(n, 2).to_dense().to(F64))
    sparse = jacfd(f, sparsity=banded_pattern(n, 2), sparse_output=True)(x)
    assert sparse.is_sparse and sparse.shape == (n, n) and sparse._nnz() == 5 * n - 6
    torch.testing.assert_close(sparse.to_dense(), jacfd(f)(x), rtol=1e-12, atol=1e-14)


def test_pytree_outputs_and_several_inputs_share_one_pattern() -> None:
    """The pattern spans all outputs and inputs, flattened leaf after leaf."""
    x, y = torch.rand(3, dtype=F64), torch.rand(2, dtype=F64)

    def f(a: torch.Tensor, b: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": a.sin(), "b": b.exp() * 2}

    pattern = torch.zeros(5, 5, dtype=torch.bool)
    pattern[:3, :3] = torch.eye(3, dtype=torch.bool)
    pattern[3:, 3:] = torch.eye(2, dtype=torch.bool)
    actual = jacfd(f, argnums=(0, 1), sparsity=pattern)(x, y)
    assert_jacobian_close(actual, jacrev(f, argnums=(0, 1))(x, y), F64)


def test_check_sparsity_reports_missed_entries() -> None:
    x = torch.rand(5, dtype=F64) + 0.1
    assert check_sparsity(torch.sin, diagonal_pattern(5), x).ok
    report = check_sparsity(lambda v: torch.cumsum(v, 0), banded_pattern(5, 1), x)
    assert not report.ok
    missed = {tuple(pair) for pair in report.missed.tolist()}
    assert missed == {(i, j) for i in range(5) for j in range(i - 1)}
    assert "misses 6 entries" in str(report)


# ------------------------------------------------------------ per-sample Jacobians


def small_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return (
        torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        .double()
        .requires_grad_(False)
    )


@pytest.mark.parametrize("strategy", ["vmap", "batched", "loop"])
def test_per_sample_equals_vmap_jacrev(strategy: str) -> None:
    model = small_mlp()
    batch = torch.randn(16, 4, dtype=F64)
    model_f, calls = counted(model)
    actual = jacfd(model_f, batch_dim=0, strategy=strategy, chunk_size=3)(batch)
    assert actual.shape == (16, 3, 4)
    assert_jacobian_close(actual, vmap(jacrev(model))(batch), F64)
    # 4 features x 2 central points, one feature (2 points <= 3) per call, whatever
    # the batch size; the loop calls func once per point.
    assert len(calls) == (8 if strategy == "loop" else 4)


def test_per_sample_conv_net_images() -> None:
    """The forum's layout: (B, C, H, W) -> (B, n_classes, C, H, W)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 4 * 4, 5),
    ).double()
    images = torch.randn(6, 1, 6, 6, dtype=F64)
    actual = jacfd(net, batch_dim=0)(images)
    expected = vmap(jacrev(lambda img: net(img[None])[0]))(images)
    assert actual.shape == (6, 5, 1, 6, 6)
    assert_jacobian_close(actual, expected, F64)


def test_per_sample_batch_along_another_dim_and_two_inputs() -> None:
    weight = torch.randn(3, 2, dtype=F64)

    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x: (3, B), y: (2, B)
        return torch.tanh(x.T @ weight + y.T).T * y  # (2, B)

    x, y = torch.randn(3, 5, dtype=F64), torch.randn(2, 5, dtype=F64)
    actual = jacfd(f, argnums=(0, 1), batch_dim=1)(x, y)
    expected = vmap(jacrev(lambda a, b: torch.tanh(a @ weight + b) * b, argnums=(0, 1)))(x.T, y.T)
    assert [a.shape for a in actual] == [(5, 2, 3), (5, 2, 2)]
    assert_jacobian_close(actual, expected, F64)


def test_per_sample_with_batchnorm_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = (
        torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh())
        .double()
        .eval()
    )
    batch = torch.randn(8, 4, dtype=F64)
    actual = jacfd(model, batch_dim=0, strategy="batched")(batch)
    assert_jacobian_close(actual, vmap(jacrev(lambda v: model(v[None])[0]))(batch), F64)


# ------------------------------------------------------------------------ errors


def test_pattern_shape_must_match() -> None:
    with pytest.raises(
        ValueError, match=r"pattern has shape \(3, 3\), but the Jacobian has 4 input"
    ):
        jacfd(torch.sin, sparsity=diagonal_pattern(3))(torch.rand(4, dtype=F64))
    with pytest.raises(
        ValueError, match=r"pattern has shape \(3, 3\), but the Jacobian has 2 output"
    ):
        jacfd(lambda v: v[:2], sparsity=diagonal_pattern(3))(torch.rand(3, dtype=F64))


@pytest.mark.parametrize(
    ("options", "kind", "phrase"),
    [
        ({"sparse_output": True}, ValueError, "needs a sparsity pattern"),
        ({"sparse_output": 1}, TypeError, "expected a bool"),
        ({"batch_dim": 0, "sparsity": diagonal_pattern(2)}, ValueError, "choose one"),
        ({"batch_dim": 1.0}, TypeError, "expected an int or None"),
    ],
)
def test_structure_option_errors(options: dict, kind: type, phrase: str) -> None:
    with pytest.raises(kind, match=phrase):
        jacfd(torch.sin, **options)


def test_per_sample_errors() -> None:
    with pytest.raises(ValueError, match="different batch sizes"):
        jacfd(lambda a, b: a * b.sum(), argnums=(0, 1), batch_dim=0)(
            torch.rand(3, 2, dtype=F64), torch.rand(4, 2, dtype=F64)
        )
    with pytest.raises(ValueError, match="without the batch of 3 samples"):
        jacfd(lambda a: a.sum(0), batch_dim=0)(torch.rand(3, 2, dtype=F64))
