"""Second derivatives (``hessfd``, ``hessdiagfd``, ``laplacianfd``) and directional
derivatives (``jvpfd``) against torch.func's exact ``hessian`` and ``jvp`` in float64,
with the tolerances of ``fd_tolerance`` for the derivative and scheme at hand.

Note: on torch 2.13 ``torch.func.jacfwd`` (and so ``hessian``) silently returns
zeros for a negative ``argnums``; references for negative argnums therefore use
the equivalent non-negative ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import assert_jacobian_close, fd_tolerance
from test_reference import uniform
from torch.func import hessian, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from jacfd import hessdiagfd, hessfd, jvpfd, laplacianfd

# hessian (through jacfwd) calls the deprecated torch.jit.script internally.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

F32, F64 = torch.float32, torch.float64
SCHEMES = ["forward", "backward", "central"]


def scalar(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x).prod() * torch.exp(x / 2).sum() + (x**3).sum() / 3


def vector(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) * x.sum() + torch.sin(x).prod()


def two_args(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (torch.sin(x)[:, None] * torch.exp(y / 2)).sum(0) + (x**2).sum() * torch.tanh(y)


def assert_same_layout(actual: Any, expected: Any) -> None:
    """Exactly torch.func.hessian's nesting, shapes and dtypes."""
    assert tree_flatten(actual)[1] == tree_flatten(expected)[1]
    for a, e in zip(tree_flatten(actual)[0], tree_flatten(expected)[0]):
        assert a.shape == e.shape and a.dtype == e.dtype


def counting(func: Callable[..., Any]) -> tuple[Callable[..., Any], list[int]]:
    calls = [0]

    def counted(*args: Any) -> Any:
        calls[0] += 1
        return func(*args)

    return counted, calls


# ----------------------------------------------------------------------------- hessfd


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("func", [scalar, vector], ids=["scalar", "vector"])
def test_hessfd_matches_hessian(func: Callable[..., Any], scheme: str) -> None:
    x = uniform((4,), 0, F64)
    actual = hessfd(func, scheme=scheme)(x)
    expected = hessian(func)(x)
    assert actual.shape == func(x).shape + x.shape + x.shape
    assert_jacobian_close(actual, expected, F64, scheme, derivative=2)


def test_hessfd_float32() -> None:
    x = uniform((4,), 1, F32)
    actual = hessfd(scalar)(x)
    assert_jacobian_close(actual, hessian(scalar)(x.double()).float(), F32, derivative=2)


@pytest.mark.parametrize(
    ("argnums", "positive"),
    [
        (0, 0),
        (1, 1),
        (-1, 1),
        (-2, 0),
        ((0, 1), (0, 1)),
        ((1, 0), (1, 0)),
        ((1,), (1,)),
        ((-1, 0), (1, 0)),
    ],
    ids=str,
)
def test_hessfd_argnums(argnums: Any, positive: Any) -> None:
    x, y = uniform((3,), 2, F64), uniform((2,), 3, F64)
    actual = hessfd(two_args, argnums)(x, y)
    expected = hessian(two_args, positive)(x, y)
    assert_same_layout(actual, expected)
    if isinstance(argnums, tuple):  # ((H_aa, H_ab), (H_ba, H_bb)) per output
        assert isinstance(actual, tuple) and len(actual) == len(argnums)
        assert all(isinstance(row, tuple) and len(row) == len(argnums) for row in actual)
    assert_jacobian_close(actual, expected, F64, derivative=2)


def test_hessfd_pytree_input_and_dict_output() -> None:
    def func(p: dict[str, Any]) -> dict[str, torch.Tensor]:
        u, v = p["u"], p["v"]
        return {"a": (torch.sin(u) * v.sum()).sum(), "b": torch.tanh(u).prod() * v}

    p = {"u": uniform((2,), 4, F64), "v": uniform((2, 2), 5, F64)}
    actual = hessfd(func)(p)
    expected = hessian(func)(p)
    assert_same_layout(actual, expected)
    assert_jacobian_close(actual, expected, F64, derivative=2)


@pytest.mark.parametrize("shape", [(), (2, 3)], ids=str)
def test_hessfd_input_shapes(shape: tuple[int, ...]) -> None:
    x = uniform(shape, 6, F64)
    func = lambda x: (torch.sin(x) * x).sum() + torch.tanh(x).prod()  # noqa: E731
    actual = hessfd(func)(x)
    expected = hessian(func)(x)
    assert actual.shape == shape + shape
    assert_jacobian_close(actual, expected, F64, derivative=2)


def test_hessfd_has_aux() -> None:
    def func(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        out = scalar(x)
        return out, {"out": out, "norm": [x.norm()]}

    x = uniform((3,), 7, F64)
    result = hessfd(func, has_aux=True)(x)
    assert isinstance(result, tuple) and len(result) == 2
    hess, aux = result
    assert_jacobian_close(hess, hessian(scalar)(x), F64, derivative=2)
    direct = func(x)[1]
    assert tree_flatten(aux)[1] == tree_flatten(direct)[1]
    for a, d in zip(tree_flatten(aux)[0], tree_flatten(direct)[0]):
        assert torch.equal(a, d)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_hessfd_chunk_size(scheme: str) -> None:
    """Elementwise arithmetic is the same in any batching: identical to rounding."""
    x = uniform((4,), 8, F64)
    whole = hessfd(vector, scheme=scheme)(x)
    for chunk_size in (1, 5):
        chunked = hessfd(vector, scheme=scheme, chunk_size=chunk_size)(x)
        torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12 * whole.abs().max().item())


def test_hessfd_under_vmap() -> None:
    X = uniform((5, 3), 9, F64)
    actual = vmap(hessfd(scalar))(X)
    expected = vmap(hessian(scalar))(X)
    assert actual.shape == (5, 3, 3)
    assert_jacobian_close(actual, expected, F64, derivative=2)


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_hessfd_compiles(fresh_dynamo: None) -> None:
    x = uniform((3,), 10, F64)
    transform = hessfd(scalar)
    actual = torch.compile(transform, fullgraph=True, backend="aot_eager")(x)
    eager = transform(x)
    torch.testing.assert_close(actual, eager, rtol=0, atol=1e-12 * eager.abs().max().item())
    assert_jacobian_close(actual, hessian(scalar)(x), F64, derivative=2)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_hessfd_number_of_evaluations(n: int, scheme: str) -> None:
    func, calls = counting(scalar)
    hessfd(func, scheme=scheme, chunk_size=1)(uniform((n,), 11, F64))
    expected = 2 * n * n + 1 if scheme == "central" else (n + 1) * (n + 2) // 2
    assert calls[0] == expected


ORDERS = {"central": [2, 4, 6, 8], "forward": [1, 2, 3, 4], "backward": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    ("scheme", "order"), [(s, o) for s, orders in ORDERS.items() for o in orders]
)
def test_hessfd_order_matches_hessian(scheme: str, order: int) -> None:
    x = uniform((4,), 2, F64)
    actual = hessfd(scalar, scheme=scheme, order=order)(x)
    assert_jacobian_close(actual, hessian(scalar)(x), F64, scheme, derivative=2, order=order)


SMOOTH = {
    "sin-exp": lambda x: torch.sin(x[0]) * torch.exp(0.5 * x[1]) + torch.cos(x[1] * x[2]),
    "rosenbrock": lambda x: ((1 - x[:-1]) ** 2 + 100 * (x[1:] - x[:-1] ** 2) ** 2).sum(),
    "tanh": lambda x: torch.tanh(x).sum() * torch.sin(x).sum(),
}


@pytest.mark.parametrize("func", SMOOTH.values(), ids=SMOOTH.keys())
def test_hessfd_order_4_is_100x_more_accurate(func: Callable[..., Any]) -> None:
    """The issue-11 target: on smooth functions in float64, order 4's product
    stencil gains at least two digits over order 2 (measured 141x to 4400x here;
    logsumexp, whose higher derivatives are larger, gains 73x to 170x)."""
    x = uniform((3,), 5, F64) * 0.5
    expected = hessian(func)(x)
    errors = [(hessfd(func, order=o)(x) - expected).abs().max().item() for o in (2, 4)]
    assert errors[1] * 100 <= errors[0]


@pytest.mark.parametrize("order", [4, 6])
def test_hessfd_order_number_of_evaluations(order: int) -> None:
    """Central order p: the centre, p points per axis, and p**2 per pair i < j."""
    n = 3
    func, calls = counting(scalar)
    hessfd(func, order=order, chunk_size=1)(uniform((n,), 11, F64))
    assert calls[0] == 1 + order * n + order**2 * n * (n - 1) // 2


def test_hessfd_rejects_the_complex_step() -> None:
    with pytest.raises(ValueError, match="first derivatives only"):
        hessfd(scalar, scheme="complex")
    for transform in (hessdiagfd, laplacianfd):
        with pytest.raises(ValueError, match="first derivatives only"):
            transform(scalar, scheme="complex")


# -------------------------------------------------------- hessdiagfd and laplacianfd


def exact_diagonal(func: Callable[..., Any], x: torch.Tensor) -> torch.Tensor:
    """(out..., n) diagonal of the (out..., n, n) Hessian of a function of a vector."""
    return torch.diagonal(hessian(func)(x), dim1=-2, dim2=-1)


def assert_trace_close(
    actual: torch.Tensor,
    diagonal: torch.Tensor,
    dtype: torch.dtype,
    scheme: str,
    order: int | None,
) -> None:
    """A sum of n diagonal entries, each within tol * max(1, max|diagonal|), is
    within n times that: the bound for a Laplacian from its n second differences."""
    n = diagonal.shape[-1]
    expected = diagonal.sum(-1)
    assert actual.shape == expected.shape and actual.dtype == dtype
    bound = n * fd_tolerance(dtype, scheme, 2, order) * max(1.0, diagonal.abs().max().item())
    error = (actual.double() - expected.double()).abs().max().item()
    assert error <= bound, f"{error:.3e} > {bound:.3e}"


DIAGONAL_CASES = [("central", 2), ("central", 4), ("forward", 1), ("forward", 2), ("backward", 1)]


@pytest.mark.parametrize(("scheme", "order"), DIAGONAL_CASES, ids=str)
@pytest.mark.parametrize("func", [scalar, vector], ids=["scalar", "vector"])
def test_hessdiagfd_and_laplacianfd(func: Callable[..., Any], scheme: str, order: int) -> None:
    x = uniform((4,), 12, F64)
    diagonal = exact_diagonal(func, x)
    actual = hessdiagfd(func, scheme=scheme, order=order)(x)
    assert actual.shape == func(x).shape + x.shape
    assert_jacobian_close(actual, diagonal, F64, scheme, derivative=2, order=order)
    # For a vector-valued func, one Laplacian per output element.
    laplacian = laplacianfd(func, scheme=scheme, order=order)(x)
    assert_trace_close(laplacian, diagonal, F64, scheme, order)


def test_hessdiagfd_and_laplacianfd_float32() -> None:
    x = uniform((4,), 13, F32)
    diagonal = exact_diagonal(vector, x.double())
    assert_jacobian_close(hessdiagfd(vector)(x), diagonal.float(), F32, derivative=2)
    assert_trace_close(laplacianfd(vector)(x), diagonal, F32, "central", None)


def test_laplacianfd_sums_over_all_argnums() -> None:
    x, y = uniform((3,), 14, F64), uniform((2,), 15, F64)
    (hxx, _), (_, hyy) = hessian(two_args, (0, 1))(x, y)
    diagonal = torch.cat(
        [torch.diagonal(hxx, dim1=-2, dim2=-1), torch.diagonal(hyy, dim1=-2, dim2=-1)], -1
    )
    actual = laplacianfd(two_args, (0, 1))(x, y)
    assert_trace_close(actual, diagonal, F64, "central", None)
    # hessdiagfd keeps the argnums level: (d_xx, d_yy).
    dx, dy = hessdiagfd(two_args, (0, 1))(x, y)
    assert_jacobian_close((dx, dy), (diagonal[:, :3], diagonal[:, 3:]), F64, derivative=2)


def test_laplacianfd_pinn_collocation_points() -> None:
    """u = sin(pi x) sinh(y) at 64 collocation points: Laplacian (1 - pi**2) u."""

    def u(p: torch.Tensor) -> torch.Tensor:
        return torch.sin(math.pi * p[0]) * torch.sinh(p[1])

    points = uniform((64, 2), 16, F64, 1.0)
    actual = vmap(laplacianfd(u))(points)
    exact_u = torch.sin(math.pi * points[:, 0]) * torch.sinh(points[:, 1])
    diagonal = torch.stack([-(math.pi**2) * exact_u, exact_u], -1)
    assert actual.shape == (64,)
    assert_trace_close(actual, diagonal, F64, "central", None)


@pytest.mark.parametrize(("order", "points"), [(2, 2), (4, 4)])
@pytest.mark.parametrize("n", [1, 3, 5])
def test_diagonal_number_of_evaluations(n: int, order: int, points: int) -> None:
    """Central second differences: the centre and `points` shifted points per
    coordinate, 2n + 1 at order 2 (4n + 1 at order 4)."""
    for transform in (hessdiagfd, laplacianfd):
        func, calls = counting(scalar)
        transform(func, order=order, chunk_size=1)(uniform((n,), 17, F64))
        assert calls[0] == points * n + 1


# ------------------------------------------------------------------------------ jvpfd


def tree_func(x: torch.Tensor, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "u": torch.sin(x) * p["a"].sum() + torch.tanh(p["b"]).prod() * x**2,
        "v": torch.exp(p["b"] / 3) * x.sum(),
    }


def tree_point(dtype: torch.dtype, seed: int) -> tuple[Any, ...]:
    return (
        uniform((3,), seed, dtype),
        {"a": uniform((2,), seed + 1, dtype), "b": uniform((2, 2), seed + 2, dtype)},
    )


def exact_jvp(
    func: Callable[..., Any], primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> Any:
    """torch.func.jvp at the float64 point, cast to the primals' dtype."""
    dtype = tree_flatten(primals)[0][0].dtype
    up = lambda tree: tree_map(lambda t: t.double(), tree)  # noqa: E731
    _, tangent_out = jvp(func, up(primals), up(tangents))
    return tree_map(lambda t: t.to(dtype), tangent_out)


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("scheme", [*SCHEMES, "complex"])
def test_jvpfd_matches_jvp(scheme: str, dtype: torch.dtype) -> None:
    primals, tangents = tree_point(dtype, 20), tree_point(dtype, 30)
    out, tangent_out = jvpfd(tree_func, primals, tangents, scheme=scheme)
    direct = tree_func(*primals)
    assert tree_flatten(out)[1] == tree_flatten(direct)[1]
    for o, d in zip(tree_flatten(out)[0], tree_flatten(direct)[0]):
        assert torch.equal(o, d)  # func(*primals) itself, not an estimate
    assert_jacobian_close(tangent_out, exact_jvp(tree_func, primals, tangents), dtype, scheme)


@pytest.mark.parametrize("scheme", [*SCHEMES, "complex"])
@pytest.mark.parametrize("scale", [1e-6, 1e6], ids=str)
def test_jvpfd_step_follows_the_tangent_scale(scale: float, scheme: str) -> None:
    """J (s v) / s is as accurate as J v for tangents far smaller or larger than x:
    the step is scaled to the tangent. (Compared after dividing by s, so that the
    tolerance stays relative.)"""
    primals, tangents = tree_point(F64, 40), tree_point(F64, 50)
    scaled = tree_map(lambda t: t * scale, tangents)
    _, tangent_out = jvpfd(tree_func, primals, scaled, scheme=scheme)
    unscaled = tree_map(lambda t: t / scale, tangent_out)
    assert_jacobian_close(unscaled, exact_jvp(tree_func, primals, tangents), F64, scheme)


@pytest.mark.parametrize("scheme", ["central", "complex"])
def test_jvpfd_has_aux(scheme: str) -> None:
    def func(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        out = torch.sin(x) * y.sum()
        return out, {"norm": x.norm(), "out": out}

    primals = (uniform((3,), 60, F64), uniform((2,), 61, F64))
    tangents = (uniform((3,), 62, F64), uniform((2,), 63, F64))
    result = jvpfd(func, primals, tangents, scheme=scheme, has_aux=True)
    assert isinstance(result, tuple) and len(result) == 3
    out, tangent_out, aux = result
    direct_out, direct_aux = func(*primals)
    assert torch.equal(out, direct_out)
    _, expected = jvp(lambda x, y: func(x, y)[0], primals, tangents)
    assert_jacobian_close(tangent_out, expected, F64, scheme)
    assert tree_flatten(aux)[1] == tree_flatten(direct_aux)[1]
    for a, d in zip(tree_flatten(aux)[0], tree_flatten(direct_aux)[0]):
        assert a.dtype == d.dtype and torch.equal(a, d)


def test_jvpfd_under_vmap() -> None:
    X, V = uniform((6, 3), 70, F64), uniform((6, 3), 71, F64)
    func = lambda x: torch.tanh(x) * x.sum()  # noqa: E731
    out, tangent_out = vmap(lambda x, v: jvpfd(func, (x,), (v,)))(X, V)
    expected_out, expected = vmap(lambda x, v: jvp(func, (x,), (v,)))(X, V)
    assert torch.equal(out, expected_out)
    assert_jacobian_close(tangent_out, expected, F64)


@pytest.mark.parametrize("scheme", [*SCHEMES, "complex"])
def test_jvpfd_zero_tangent(scheme: str) -> None:
    primals = tree_point(F64, 80)
    zeros = tree_map(torch.zeros_like, primals)
    _, tangent_out = jvpfd(tree_func, primals, zeros, scheme=scheme)
    for t in tree_flatten(tangent_out)[0]:
        assert torch.equal(t, torch.zeros_like(t))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_jvpfd_one_vmap_call(scheme: str) -> None:
    """All stencil points go to func in one vmap call: func runs once in Python."""
    func, calls = counting(tree_func)
    jvpfd(func, tree_point(F64, 90), tree_point(F64, 91), scheme=scheme)
    assert calls[0] == 1


def test_jvpfd_errors() -> None:
    x = uniform((3,), 92, F64)
    with pytest.raises(TypeError, match=r"^jvpfd\(func, primals, tangents\)"):
        jvpfd(torch.sin, x, (x,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="same structure"):
        jvpfd(torch.sin, (x,), (x, x))
    with pytest.raises(ValueError, match="same structure"):
        jvpfd(lambda p: p["a"], ({"a": x},), ({"b": x},))
    with pytest.raises(ValueError, match=r"shape \(2,\) does not match .* shape \(3,\)"):
        jvpfd(torch.sin, (x,), (x[:2],))
