"""Accuracy of jacfd against the error theory: the ``order`` option, exactness on
polynomials, the complex step, Richardson extrapolation with its error estimate
(``jacfd_with_error``), and the step of a jacfd nested in another.

References are exact torch.func Jacobians in float64; tolerances come from
``fd_tolerance`` (``SAFETY * eps**(p/(p+q))``, complex step ``SAFETY * eps``), or,
where truncation is absent, from a rounding bound derived in place.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from fractions import Fraction
from math import prod
from typing import Any

import pytest
import torch
from conftest import SAFETY, assert_jacobian_close
from test_reference import ZOO, mlp, reference, uniform
from torch import nn
from torch.func import hessian, jacrev
from torch.utils._pytree import tree_flatten

from jacfd import jacfd, jacfd_with_error

# hessian (through jacfwd) calls the deprecated torch.jit.script internally.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

F32, F64 = torch.float32, torch.float64
SMOOTH = ["tanh", "sin_2d", "exp", "cubic", "tanh_mlp"]
ORDERS = {"forward": (1, 2, 3, 4), "backward": (1, 2, 3, 4), "central": (2, 4, 6, 8)}
SCHEME_ORDERS = [(scheme, order) for scheme, orders in ORDERS.items() for order in orders]


def to_float64(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.double() for a in args)


def offsets(scheme: str, order: int) -> list[int]:
    """The documented stencils: p + 1 points 0, ±1, ..., ±p one-sided, and the
    p + 1 symmetric points -p/2..p/2 for central differences of (even) order p."""
    if scheme == "central":
        return list(range(-(order // 2), order // 2 + 1))
    sign = 1 if scheme == "forward" else -1
    return [sign * k for k in range(order + 1)]


def lagrange_weights(points: list[int]) -> list[Fraction]:
    """First-derivative weights at 0, computed here independently of jacfd as the
    derivatives at 0 of the Lagrange basis polynomials on ``points``."""
    g = [Fraction(p) for p in points]
    weights = []
    for i, gi in enumerate(g):
        total = Fraction(0)
        for j, gj in enumerate(g):
            if j != i:
                others = (-gk / (gi - gk) for k, gk in enumerate(g) if k not in (i, j))
                total += prod(others, start=Fraction(1)) / (gi - gj)
        weights.append(total)
    return weights


# ----------------------------------------------------------------------------- order


@pytest.mark.parametrize(("scheme", "order"), SCHEME_ORDERS, ids=str)
@pytest.mark.parametrize("name", SMOOTH)
def test_order_float64(name: str, scheme: str, order: int) -> None:
    func, args, argnums = ZOO[name](F64)
    actual = jacfd(func, argnums, scheme=scheme, order=order)(*args)
    assert_jacobian_close(actual, reference(func, args, argnums), F64, scheme, order=order)


# Every order in float32 too: the step constant keeps the wide high-order
# stencils (central 8 reaches 4h ~ 0.3 at |x| = 3) inside tanh's analytic strip.
@pytest.mark.parametrize(("scheme", "order"), SCHEME_ORDERS, ids=str)
@pytest.mark.parametrize("name", SMOOTH)
def test_order_float32(name: str, scheme: str, order: int) -> None:
    func, args, argnums = ZOO[name](F32)
    actual = jacfd(func, argnums, scheme=scheme, order=order)(*args)
    assert_jacobian_close(actual, reference(func, args, argnums), F32, scheme, order=order)


def test_higher_order_is_more_accurate_float64() -> None:
    """The orders are not just accepted: on sin the error falls from order to order,
    as the tolerances eps**(p/(p+1)) do."""
    x = uniform((6,), 5, F64)
    expected = torch.diag(torch.cos(x))
    for scheme, orders in ORDERS.items():
        errors = [
            (jacfd(torch.sin, scheme=scheme, order=p)(x) - expected).abs().max().item()
            for p in orders
        ]
        assert max(errors[1:]) < errors[0] / 10, (scheme, errors)


# -------------------------------------------------------------- exact on polynomials
#
# A first-derivative stencil on p + 1 points is exact on polynomials of degree <= p
# (the error is sum_k w_k f(x + g_k h) / h - f'(x), and the weights w interpolate
# by degree-p polynomials). With a large step h = 0.5 any truncation error would be
# of order 0.1; only rounding is left. Each value f(x_k) = sum_j c_j x_k**j is off by
# at most ~(deg + 2) eps F, F = sum_j |c_j| reach**j with reach the largest |x_k|,
# so the quotient is off by at most (deg + 2) eps F sum_k |w_k| / h; we bound
# (deg + 2) by 16 for deg <= 9, which also covers the weighted sum's own rounding.
#
# Central differences of order p are exact up to degree p, NOT p + 1: their error
# is a h**p f^(p+1)(x) M / (p + 1)! with M = sum_k w_k g_k**(p+1) != 0, e.g.
# ((x+h)**3 - (x-h)**3) / 2h = 3x**2 + h**2. On a degree p + 1 polynomial with
# leading coefficient a, every stencil's error is exactly a M h**p (the controls).

H = 0.5


def polynomial(degree: int, seed: int) -> tuple[torch.Tensor, Any, Any]:
    coeffs = uniform((degree + 1,), seed, F64, 1.0)

    def f(x: torch.Tensor) -> torch.Tensor:
        return sum(c * x**j for j, c in enumerate(coeffs)) + 0 * x

    def df(x: torch.Tensor) -> torch.Tensor:
        return sum(j * c * x ** (j - 1) for j, c in enumerate(coeffs) if j) + 0 * x

    return coeffs, f, df


def polynomial_rounding_bound(
    coeffs: torch.Tensor, x: torch.Tensor, scheme: str, order: int
) -> float:
    points = offsets(scheme, order)
    reach = x.abs().max().item() + H * max(abs(g) for g in points)
    magnitude = sum(abs(c.item()) * reach**j for j, c in enumerate(coeffs))
    c1 = sum(abs(float(w)) for w in lagrange_weights(points))
    return 16 * torch.finfo(F64).eps * c1 * magnitude / H


@pytest.mark.parametrize(("scheme", "order"), SCHEME_ORDERS, ids=str)
def test_exact_on_polynomials_up_to_the_order(scheme: str, order: int) -> None:
    x = uniform((5,), 100 + order, F64)
    for degree in range(order + 1):
        coeffs, f, df = polynomial(degree, 200 + 10 * order + degree)
        actual = torch.diagonal(jacfd(f, delta=H, scheme=scheme, order=order)(x))
        bound = polynomial_rounding_bound(coeffs, x, scheme, order)
        error = (actual - df(x)).abs().max().item()
        assert error <= bound, f"degree {degree}: error {error:.3e} > {bound:.3e}"
        # Tight: ~1e-10 relative at worst (degree 8 on |x| + 2 <= 5), mostly ~1e-13.
        assert bound <= 1e-8 * max(1.0, df(x).abs().max().item())


@pytest.mark.parametrize(("scheme", "order"), SCHEME_ORDERS, ids=str)
def test_not_exact_one_degree_higher(scheme: str, order: int) -> None:
    """Control: degree p + 1 leaves exactly the leading truncation term a M h**p
    (central included), so the exactness above is the stencil's, not an accident."""
    x = uniform((5,), 100 + order, F64)
    coeffs, f, df = polynomial(order + 1, 300 + order)
    points = offsets(scheme, order)
    moment = sum(w * Fraction(g) ** (order + 1) for w, g in zip(lagrange_weights(points), points))
    leading = coeffs[-1].item() * float(moment) * H**order
    actual = torch.diagonal(jacfd(f, delta=H, scheme=scheme, order=order)(x))
    bound = polynomial_rounding_bound(coeffs, x, scheme, order)
    assert abs(leading) > 1e6 * bound  # the term is far above rounding...
    torch.testing.assert_close(actual - df(x), torch.full_like(x, leading), rtol=0, atol=bound)


# ----------------------------------------------------------------- invalid orders


@pytest.mark.parametrize(
    ("scheme", "order", "allowed"),
    [
        ("central", 3, "(2, 4, 6, 8)"),
        ("central", 0, "(2, 4, 6, 8)"),
        ("central", True, "(2, 4, 6, 8)"),
        ("forward", 5, "(1, 2, 3, 4)"),
        ("backward", 0, "(1, 2, 3, 4)"),
        ("forward", True, "(1, 2, 3, 4)"),
        ("complex", 4, "(2,)"),
        ("central", 2.0, "(2, 4, 6, 8)"),
    ],
    ids=str,
)
def test_invalid_order(scheme: str, order: Any, allowed: str) -> None:
    with pytest.raises(ValueError) as info:
        jacfd(torch.sin, scheme=scheme, order=order)
    message = str(info.value)
    assert message.startswith("jacfd(func, scheme=")
    assert allowed in message
    with pytest.raises(ValueError, match=r"^jacfd_with_error\(func, scheme="):
        jacfd_with_error(torch.sin, scheme=scheme, order=order)


# ------------------------------------------------------------------------ complex step

ANALYTIC = [
    "tanh",
    "sin_2d",
    "exp",
    "cubic",
    "matmul",
    "to_scalar",
    "scalar_to_vector",
    "multi_in_multi_out",
    "x_matmul_y",
    "x_times_sum_y",
]  # softmax is excluded: torch's complex softmax is not the analytic continuation


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("name", ANALYTIC)
def test_complex_step_on_analytic_functions(name: str, dtype: torch.dtype) -> None:
    func, args, argnums = ZOO[name](dtype)
    actual = jacfd(func, argnums, scheme="complex")(*args)
    # Same dtypes as func's (real) outputs: checked by assert_jacobian_close.
    assert_jacobian_close(actual, reference(func, args, argnums), dtype, "complex")


def test_complex_step_is_exact_to_rounding() -> None:
    """No cancellation: a few eps on exp, where the best central error is ~1e-11."""
    x = uniform((6,), 2, F64)
    expected = torch.diag(torch.exp(x))
    complex_error = (jacfd(torch.exp, scheme="complex")(x) - expected).abs().max().item()
    central_error = (jacfd(torch.exp)(x) - expected).abs().max().item()
    assert complex_error <= 4 * torch.finfo(F64).eps * expected.abs().max().item()
    assert complex_error < 1e-14 and central_error > 100 * complex_error


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature:UserWarning")
@pytest.mark.parametrize(
    ("dtype", "cdtype"), [(F64, torch.complex128), (F32, torch.complex64)], ids=str
)
def test_complex_step_on_a_module_converted_to_complex(
    dtype: torch.dtype, cdtype: torch.dtype
) -> None:
    model = mlp(dtype, nn.Tanh, 4)
    complex_model = copy.deepcopy(model).to(cdtype)
    x = uniform((2, 4), 7, dtype, 1.0)
    actual = jacfd(complex_model, scheme="complex")(x)
    expected = jacrev(copy.deepcopy(model).double())(x.double()).to(dtype)
    assert_jacobian_close(actual, expected, dtype, "complex")


NOT_ANALYTIC: dict[str, Callable[..., Any]] = {
    "relu": torch.relu,
    "comparison": lambda x: torch.where(x > 0, x, x**2),
    "maximum": lambda x: torch.maximum(x, x**2),
    "max": lambda x: x.max() * x,
    "real_linear": nn.Linear(4, 2).double(),
}


@pytest.mark.parametrize("chunk_size", [None, 1])
@pytest.mark.parametrize("name", list(NOT_ANALYTIC))
def test_complex_step_on_unsupported_functions(name: str, chunk_size: int | None) -> None:
    x = uniform((4,), 8, F64)
    with pytest.raises(TypeError) as info:
        jacfd(NOT_ANALYTIC[name], scheme="complex", chunk_size=chunk_size)(x)
    message = str(info.value)
    assert "scheme='complex'" in message and "scheme='central'" in message


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_complex_step_on_real_valued_output(chunk_size: int | None) -> None:
    x = uniform((4,), 9, F64)
    for func in (torch.abs, lambda x: (x**2).abs().sum(), lambda x: torch.sin(x).real):
        with pytest.raises(TypeError, match="not real-analytic"):
            jacfd(func, scheme="complex", chunk_size=chunk_size)(x)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_complex_step_has_aux_at_the_real_point(chunk_size: int | None) -> None:
    def func(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        out = torch.sin(x) * x.sum()
        return out, {"norm": x.norm(), "pair": (x * 2, out)}

    x = uniform((4,), 10, F64)
    jac, aux = jacfd(func, scheme="complex", has_aux=True, chunk_size=chunk_size)(x)
    assert_jacobian_close(jac, jacrev(lambda x: func(x)[0])(x), F64, "complex")
    direct_leaves, direct_spec = tree_flatten(func(x)[1])
    aux_leaves, aux_spec = tree_flatten(aux)
    assert aux_spec == direct_spec
    for a, d in zip(aux_leaves, direct_leaves):
        assert a.dtype == F64 and torch.equal(a, d)


# ------------------------------------------------------------------ jacfd_with_error


@pytest.mark.parametrize("scheme", ["forward", "backward", "central"])
@pytest.mark.parametrize("name", list(ZOO))
def test_with_error_layout(name: str, scheme: str) -> None:
    func, args, argnums = ZOO[name](F64)
    jac, error = jacfd_with_error(func, argnums, scheme=scheme)(*args)
    plain = jacfd(func, argnums, scheme=scheme)(*args)
    spec = tree_flatten(plain)[1]
    assert tree_flatten(jac)[1] == spec and tree_flatten(error)[1] == spec
    for j, e, p in zip(tree_flatten(jac)[0], tree_flatten(error)[0], tree_flatten(plain)[0]):
        assert j.shape == e.shape == p.shape and j.dtype == e.dtype == p.dtype
        assert bool(torch.isfinite(e).all()) and bool((e >= 0).all())


@pytest.mark.parametrize(
    ("scheme", "order"),
    [("forward", 1), ("forward", 2), ("backward", 1), ("central", 2), ("central", 4)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("name", SMOOTH)
def test_with_error_is_as_accurate_as_jacfd(
    name: str, dtype: torch.dtype, scheme: str, order: int
) -> None:
    """The extrapolated Jacobian keeps jacfd's tolerance. It does not reach the
    next order's: the steps are balanced for order p, where rounding is already
    as large as truncation, and cancelling the truncation leaves the rounding."""
    func, args, argnums = ZOO[name](dtype)
    jac, _ = jacfd_with_error(func, argnums, scheme=scheme, order=order)(*args)
    assert_jacobian_close(jac, reference(func, args, argnums), dtype, scheme, order=order)


def test_with_error_cancels_the_leading_term() -> None:
    """With a step large enough for truncation to dominate, the extrapolation is
    visible: central differences of sin err by -cos(x) h**2/6, the extrapolated
    (4 D_h - D_2h)/3 by -cos(x) h**4/30, and the spread estimates the former."""
    x, h = uniform((5,), 11, F64), 1e-2
    cos = torch.cos(x)
    plain = torch.diagonal(jacfd(torch.sin, delta=h)(x))
    jac, error = jacfd_with_error(torch.sin, delta=h)(x)
    jac, error = torch.diagonal(jac), torch.diagonal(error)
    rounding = 16 * torch.finfo(F64).eps / h  # |sin| <= 1, a few weights ~1
    torch.testing.assert_close(plain - cos, -cos * h**2 / 6, rtol=1e-3, atol=rounding)
    torch.testing.assert_close(jac - cos, -cos * h**4 / 30, rtol=1e-3, atol=rounding)
    assert bool(((jac - cos).abs() <= error).all())
    torch.testing.assert_close(error, cos.abs() * h**2 / 6, rtol=1e-2, atol=rounding)


def with_error_honesty(scheme: str, dtype: torch.dtype) -> tuple[float, float]:
    """Over every entry of every ZOO Jacobian: the fraction whose error estimate
    bounds the true error (against jacrev in float64), and the median of
    estimate / true error over the entries with a nonzero true error."""
    bounded, ratios, total = 0, [], 0
    for name in ZOO:
        func, args, argnums = ZOO[name](dtype)
        jac, error = jacfd_with_error(func, argnums, scheme=scheme)(*args)
        exact = jacrev(func, argnums)(*to_float64(args))
        for j, e, r in zip(tree_flatten(jac)[0], tree_flatten(error)[0], tree_flatten(exact)[0]):
            true = (j.double() - r).abs().flatten()
            estimate = e.double().flatten()
            bounded += int((estimate >= true).sum())
            total += true.numel()
            ratios.append(estimate[true > 0] / true[true > 0])
    return bounded / total, torch.cat(ratios).median().item()


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("scheme", ["forward", "backward", "central"])
def test_with_error_estimate_is_honest(scheme: str, dtype: torch.dtype) -> None:
    """The issue's criteria: the estimate bounds the true error for >= 95% of the
    entries, and is not uselessly pessimistic (median ratio <= 100). Measured:
    100% bounded, medians 42-65."""
    fraction, median = with_error_honesty(scheme, dtype)
    assert fraction >= 0.95, f"only {fraction:.3f} of the entries bounded"
    assert median <= 100, f"median estimate / true error {median:.1f}"


@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_with_error_has_aux(scheme: str) -> None:
    def func(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        out = torch.sin(x) * y.sum()
        return out, {"out": out, "norm": [y.norm()]}

    x, y = uniform((3,), 12, F64), uniform((2,), 13, F64)
    result = jacfd_with_error(func, (0, 1), scheme=scheme, has_aux=True)(x, y)
    assert isinstance(result, tuple) and len(result) == 3
    jac, error, aux = result
    expected = jacrev(func, (0, 1), has_aux=True)(x, y)[0]
    assert_jacobian_close(jac, expected, F64, scheme)
    assert tree_flatten(error)[1] == tree_flatten(expected)[1]
    for j, e, r in zip(tree_flatten(jac)[0], tree_flatten(error)[0], tree_flatten(expected)[0]):
        assert j.shape == e.shape == r.shape and bool((e >= 0).all())
    direct = func(x, y)[1]
    assert tree_flatten(aux)[1] == tree_flatten(direct)[1]
    for a, d in zip(tree_flatten(aux)[0], tree_flatten(direct)[0]):
        assert torch.equal(a, d)


# ------------------------------------------------------------------------- nesting


def test_noise_exponent_attribute() -> None:
    assert jacfd(torch.sin, order=4)._jacfd_noise_exponent == 4 / 5
    assert jacfd(torch.sin, scheme="forward", order=3)._jacfd_noise_exponent == 3 / 4
    assert jacfd(torch.sin, scheme="complex")._jacfd_noise_exponent == 1.0


NESTED = {
    "scalar": lambda x: torch.sin(x).prod() * torch.exp(x / 2).sum() + (x**3).sum() / 3,
    "tanh_sum": lambda x: torch.tanh(x).sum() * x.sum() + torch.sin(x).sum(),
    "vector": lambda x: torch.tanh(x) * x.sum(),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(NESTED))
def test_nested_order_4_hessian(name: str, seed: int) -> None:
    """The inner order-4 Jacobian is accurate to ~eps**(4/5); the outer central
    difference balances that noise, for an error ~(eps**(4/5))**(2/3) = eps**(8/15)
    ~ 4.5e-9 (measured 1.4e-9 to 3.2e-8): SAFETY times it, ~2.2e-7, not 1e-5."""
    f, x = NESTED[name], uniform((4,), seed, F64)
    nested = jacfd(jacfd(f, order=4))(x)
    expected = hessian(f)(x)
    tol = SAFETY * (torch.finfo(F64).eps ** (4 / 5)) ** (2 / 3)
    error = (nested - expected).abs().max().item() / max(1.0, expected.abs().max().item())
    assert error <= tol, f"{error:.3e} > {tol:.3e}"
