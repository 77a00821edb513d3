"""jacfd against torch.func's exact Jacobians (jacrev, jacfwd) computed in float64.

The reference is always evaluated on the float64 version of the very same inputs
(and of the same constants and parameters), then cast to the dtype of the
matching output leaf of ``func``. ``assert_jacobian_close`` then checks the
pytree structure, the shapes, that jacfd's dtype is the output dtype of ``func``,
and the values within the theoretical tolerance of the scheme and dtype.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_jacobian_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacfwd, jacrev
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from jacfd import jacfd

# jacfwd (and hessian) call the deprecated torch.jit.script internally.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning"
)

DTYPES = [torch.float32, torch.float64]
SCHEMES = ["forward", "backward", "central"]


# ----------------------------------------------------------------------------- helpers


def uniform(
    shape: tuple[int, ...], seed: int, dtype: torch.dtype, bound: float = 3.0
) -> torch.Tensor:
    """Reproducible values in [-bound, bound], drawn in float64 and rounded to dtype."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return values.to(dtype)


def to_float64(tree: Any) -> Any:
    """The float64 version of every floating tensor in a pytree (an exact upcast)."""
    return tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.dtype.is_floating_point else t,
        tree,
    )


def reference(
    func: Callable[..., Any], args: tuple[Any, ...], argnums: Any = 0, kwargs: Any = None
) -> Any:
    """jacrev in float64 at the upcast inputs, each leaf cast to the dtype of the
    output leaf of ``func`` (at the original inputs) that it differentiates."""
    kwargs = kwargs or {}
    exact = jacrev(func, argnums)(*to_float64(args), **to_float64(kwargs))
    out_leaves, out_spec = tree_flatten(func(*args, **kwargs))
    per_output = out_spec.flatten_up_to(exact)
    cast = [
        tree_map(lambda t, dtype=out.dtype: t.to(dtype), sub)
        for sub, out in zip(per_output, out_leaves)
    ]
    return tree_unflatten(cast, out_spec)


def relu_pattern_is_constant(model: nn.Sequential, x: torch.Tensor, step: float) -> bool:
    """Whether every ReLU of ``model`` keeps its sign pattern at ``x +- step e_j`` for
    all coordinates j, i.e. no stencil point of size <= step crosses a kink."""

    def pattern(point: torch.Tensor) -> list[torch.Tensor]:
        signs = []
        for layer in model:
            if isinstance(layer, nn.ReLU):
                signs.append(point > 0)
            point = layer(point)
        return signs

    model = copy.deepcopy(model).double()
    with torch.no_grad():
        x64 = x.double()
        base = pattern(x64)
        for j in range(x.numel()):
            for sign in (1.0, -1.0):
                shifted = x64.clone().reshape(-1)
                shifted[j] += sign * step * max(1.0, abs(shifted[j].item()))
                for a, b in zip(base, pattern(shifted.reshape(x.shape))):
                    if not torch.equal(a, b):
                        return False
    return True


def mlp(dtype: torch.dtype, activation: type[nn.Module], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(4, 8), activation(), nn.Linear(8, 6), activation(), nn.Linear(6, 3)
    ).double()
    return model.to(dtype)


def module_function(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` as a function whose parameters follow the dtype of its input, so
    that the float64 reference uses the exactly upcast parameters."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def func(x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, {k: v.to(x.dtype) for k, v in params.items()}, (x,))

    return func


# ------------------------------------------------------------------------------- zoo

Case = Callable[[torch.dtype], tuple[Callable[..., Any], tuple[Any, ...], Any]]


def _matmul(dtype: torch.dtype) -> tuple[Callable[..., Any], tuple[Any, ...], Any]:
    a = uniform((4, 2), 11, dtype)
    return (lambda x: x @ a.to(x.dtype)), (uniform((3, 4), 1, dtype),), 0


def _multi_out(dtype: torch.dtype) -> tuple[Callable[..., Any], tuple[Any, ...], Any]:
    w = uniform((2,), 12, dtype, 1.0)
    return (
        (lambda x: torch.tanh(x)[:, :, None] * w.to(x.dtype) + x.sum() ** 2 / 10),
        (uniform((3, 4), 2, dtype),),
        0,
    )


def _mlp(activation: type[nn.Module], seed: int, batch: tuple[int, ...]) -> Case:
    def case(dtype: torch.dtype) -> tuple[Callable[..., Any], tuple[Any, ...], Any]:
        model = mlp(dtype, activation, seed)
        x = uniform((*batch, 4), seed + 100, dtype, 1.0)
        if activation is nn.ReLU:
            # The largest step any scheme takes here is the float32 one-sided step;
            # twice it bounds every stencil point of every dtype and scheme.
            step = 2 * torch.finfo(torch.float32).eps ** 0.5
            assert relu_pattern_is_constant(model, x, step), "x is next to a ReLU kink"
        return module_function(model), (x,), 0

    return case


ZOO: dict[str, Case] = {
    "tanh": lambda d: (torch.tanh, (uniform((5,), 0, d),), 0),
    "sin_2d": lambda d: (torch.sin, (uniform((3, 4), 1, d),), 0),
    "exp": lambda d: (torch.exp, (uniform((4,), 2, d),), 0),
    "softmax": lambda d: ((lambda x: torch.softmax(x, dim=-1)), (uniform((2, 5), 3, d),), 0),
    "matmul": _matmul,
    "cubic": lambda d: ((lambda x: x**3 - 2 * x), (uniform((2, 3), 4, d),), 0),
    "x_times_sum_y": lambda d: (
        (lambda x, y: x * y.sum()),
        (uniform((3,), 5, d), uniform((2, 2), 6, d)),
        (0, 1),
    ),
    "x_matmul_y": lambda d: (
        (lambda x, y: x @ y),
        (uniform((2, 3), 7, d), uniform((3, 2), 8, d)),
        (0, 1),
    ),
    "to_scalar": lambda d: ((lambda x: (torch.sin(x) * x).sum()), (uniform((3, 2), 9, d),), 0),
    "scalar_to_scalar": lambda d: ((lambda x: x**2 * torch.sin(x)), (uniform((), 10, d),), 0),
    "scalar_to_vector": lambda d: (
        (lambda x: torch.stack([torch.sin(x), torch.cos(x), x**2 / 3])),
        (uniform((), 13, d),),
        0,
    ),
    "multi_in_multi_out": _multi_out,
    "tanh_mlp": _mlp(nn.Tanh, 0, ()),
    "relu_mlp": _mlp(nn.ReLU, 0, ()),
    "relu_mlp_batched": _mlp(nn.ReLU, 1, (2,)),
}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_matches_jacrev(name: str, dtype: torch.dtype, scheme: str) -> None:
    func, args, argnums = ZOO[name](dtype)
    actual = jacfd(func, argnums, scheme=scheme)(*args)
    assert_jacobian_close(actual, reference(func, args, argnums), dtype, scheme)


@pytest.mark.parametrize("name", ["tanh", "cubic", "scalar_to_vector", "multi_in_multi_out"])
def test_zoo_matches_jacfwd(name: str) -> None:
    func, args, argnums = ZOO[name](torch.float64)
    actual = jacfd(func, argnums)(*args)
    assert_jacobian_close(actual, jacfwd(func, argnums)(*args), torch.float64)


def test_output_dtype_not_input_dtype() -> None:
    """The result has the dtype of func's output, even when that differs from the input's."""
    x = uniform((3,), 0, torch.float32)
    func = lambda x: torch.sin(x.double())  # noqa: E731
    actual = jacfd(func)(x)
    assert actual.dtype == torch.float64
    assert_jacobian_close(actual, reference(func, (x,)), torch.float32)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mixed_input_dtypes_follow_the_output_dtype(scheme: str) -> None:
    """Each block has the dtype of the output (as jacfwd; jacrev would give the
    input's); the float32 argument is stepped in float32, so its tolerance applies."""
    x, y = uniform((3,), 14, torch.float32), uniform((2,), 15, torch.float64)
    func = lambda x, y: torch.sin(x)[:, None] * y  # noqa: E731
    actual = jacfd(func, (0, 1), scheme=scheme)(x, y)
    assert [j.dtype for j in actual] == [j.dtype for j in jacfwd(func, (0, 1))(x, y)]
    assert_jacobian_close(actual, reference(func, (x, y), (0, 1)), torch.float32, scheme)
    # A float32 output: both blocks are float32 (values: see the next test).
    lower = lambda x, y: func(x, y).float()  # noqa: E731
    assert [j.dtype for j in jacfd(lower, (0, 1), scheme=scheme)(x, y)] == [torch.float32] * 2


@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_less_precise_than_input(scheme: str) -> None:
    """A float32 computation fed float64 inputs (e.g. a float32 model called on
    x.float()) is only as accurate as float32: jacfd notices the float32 output and
    redoes the differences with the float32 step, whose tolerance then applies."""
    x = uniform((3,), 16, torch.float64)
    func = lambda x: torch.sin(x.float())  # noqa: E731
    actual = jacfd(func, scheme=scheme)(x)
    assert_jacobian_close(actual, reference(func, (x,)), torch.float32, scheme)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "func", [torch.sin, torch.tanh, lambda x: x * x / 2], ids=["sin", "tanh", "square"]
)
def test_half_precision_central(func: Callable[..., Any], dtype: torch.dtype) -> None:
    x = uniform((4,), 20, dtype, 2.0)
    actual = jacfd(func)(x)
    assert actual.dtype == dtype and actual.device == x.device
    assert_jacobian_close(actual, reference(func, (x,)), dtype, "central")


# --------------------------------------------------------------------------- argnums


def three_args(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.sin(x)[:, None] * y.sum() + torch.tanh(z).prod() * x[:, None] ** 2


THREE = (
    uniform((3,), 30, torch.float64),
    uniform((2, 2), 31, torch.float64),
    uniform((), 32, torch.float64),
)


@pytest.mark.parametrize(
    "argnums", [0, 1, 2, -1, -3, (0, 2), (2, 0), (1,), (-1,), (0, -1), (-2, 0, 2)], ids=str
)
def test_argnums_forms(argnums: Any) -> None:
    actual = jacfd(three_args, argnums)(*THREE)
    expected = jacrev(three_args, argnums)(*THREE)
    if isinstance(argnums, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(argnums)
    else:
        assert isinstance(actual, torch.Tensor)
    assert_jacobian_close(actual, expected, torch.float64)


# --------------------------------------------------------------------------- pytrees


def tree_in(p: dict[str, Any]) -> torch.Tensor:
    a, (b, (c,)) = p["a"], p["rest"]
    return torch.sin(a) * b.sum() + torch.tanh(c) * a**2


def tree_out(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    return {
        "a": torch.sin(x) * y.sum(),
        "b": (x.sum() * torch.cos(y), [torch.tanh(x @ y)]),
    }


TREE_ARG = {
    "a": uniform((3,), 40, torch.float64),
    "rest": [uniform((2, 2), 41, torch.float64), (uniform((3,), 42, torch.float64),)],
}
XY = (uniform((2,), 43, torch.float64), uniform((2, 3), 44, torch.float64))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_pytree_input(scheme: str) -> None:
    actual = jacfd(tree_in, scheme=scheme)(TREE_ARG)
    expected = jacrev(tree_in)(TREE_ARG)
    assert tree_flatten(actual)[1] == tree_flatten(expected)[1]
    assert_jacobian_close(actual, expected, torch.float64, scheme)


@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1,), (-1, 0)], ids=str)
def test_pytree_output(argnums: Any) -> None:
    actual = jacfd(tree_out, argnums)(*XY)
    expected = jacrev(tree_out, argnums)(*XY)
    assert tree_flatten(actual)[1] == tree_flatten(expected)[1]
    assert_jacobian_close(actual, expected, torch.float64)


def test_pytree_in_and_out_with_several_argnums() -> None:
    def func(p: dict[str, Any], q: tuple[torch.Tensor, ...], r: torch.Tensor) -> Any:
        s = tree_in(p).sum()
        return (q[0] * s, {"u": [q[1] ** 2 * r], "v": torch.exp(r) * s})

    q = (uniform((2,), 45, torch.float64), uniform((1, 2), 46, torch.float64))
    r = uniform((), 47, torch.float64, 1.0)
    for argnums in [(0, 1, 2), (2, 0), (1,)]:
        actual = jacfd(func, argnums)(TREE_ARG, q, r)
        expected = jacrev(func, argnums)(TREE_ARG, q, r)
        assert tree_flatten(actual)[1] == tree_flatten(expected)[1]
        assert_jacobian_close(actual, expected, torch.float64)


def test_context_example_dict_output_two_argnums() -> None:
    """CONTEXT.md: f(x, y) -> {'a', 'b'} with argnums=(0, 1) gives
    {'a': (J_ax, J_ay), 'b': (J_bx, J_by)}."""
    x, y = uniform((3,), 48, torch.float64), uniform((2,), 49, torch.float64)

    def func(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"a": torch.sin(x) * y.sum(), "b": torch.outer(x, y).tanh()}

    actual = jacfd(func, argnums=(0, 1))(x, y)
    assert set(actual) == {"a", "b"}
    assert isinstance(actual["a"], tuple) and len(actual["a"]) == 2
    assert actual["a"][0].shape == (3, 3) and actual["a"][1].shape == (3, 2)
    assert actual["b"][0].shape == (3, 2, 3) and actual["b"][1].shape == (3, 2, 2)
    assert_jacobian_close(actual, jacrev(func, argnums=(0, 1))(x, y), torch.float64)


# ------------------------------------------------------------------------ parameters


@pytest.mark.parametrize("scheme", SCHEMES)
def test_parameter_jacobian(scheme: str) -> None:
    model = mlp(torch.float64, nn.Tanh, 3)
    params = {name: p.detach() for name, p in model.named_parameters()}
    x = uniform((2, 4), 50, torch.float64, 1.0)

    def func(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x,))

    actual = jacfd(func, scheme=scheme)(params, x)
    expected = jacrev(func)(params, x)
    assert set(actual) == set(params)
    for name, p in params.items():
        assert actual[name].shape == (2, 3, *p.shape)
    assert_jacobian_close(actual, expected, torch.float64, scheme)


# --------------------------------------------------------------------------- has_aux


def with_aux(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    out = torch.sin(x) * y.sum()
    return out, {"out": out, "norm": [x.norm()], "argmax": (torch.argmax(x), y * 2)}


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("argnums", [0, (0, 1)], ids=str)
def test_has_aux(scheme: str, chunk_size: int | None, argnums: Any) -> None:
    x, y = uniform((3,), 60, torch.float64), uniform((2,), 61, torch.float64)
    result = jacfd(with_aux, argnums, scheme=scheme, has_aux=True, chunk_size=chunk_size)(x, y)
    assert isinstance(result, tuple) and len(result) == 2
    jac, aux = result
    expected_jac, expected_aux = jacrev(with_aux, argnums, has_aux=True)(x, y)
    assert_jacobian_close(jac, expected_jac, torch.float64, scheme)
    aux_leaves, aux_spec = tree_flatten(aux)
    direct_leaves, direct_spec = tree_flatten(with_aux(x, y)[1])
    assert aux_spec == direct_spec == tree_flatten(expected_aux)[1]
    for a, d in zip(aux_leaves, direct_leaves):
        assert a.dtype == d.dtype and a.shape == d.shape
        assert torch.equal(a, d)


# ---------------------------------------------------------------------------- kwargs


def test_kwargs_pass_through_and_are_not_differentiated() -> None:
    def func(x: torch.Tensor, *, scale: torch.Tensor, power: int = 1) -> torch.Tensor:
        return torch.sin(x) ** power * scale

    x = uniform((3,), 70, torch.float64)
    scale = uniform((2, 1), 71, torch.float64)
    actual = jacfd(func)(x, scale=scale, power=2)
    expected = jacrev(functools.partial(func, scale=scale, power=2))(x)
    assert isinstance(actual, torch.Tensor)
    assert_jacobian_close(actual, expected, torch.float64)
    # The keyword is really used: another value gives another Jacobian.
    assert not torch.allclose(actual, jacfd(func)(x, scale=scale, power=1))


# ------------------------------------------------------------------------ chunk_size


# Elementwise functions do the same arithmetic in one vmap call, in chunks, or in a
# loop, so the results agree to ~1e-12. A contraction (x @ y) may round differently
# by an ulp of its sum of |terms| F in bmm (all leaves batched), mm (one leaf
# unbatched, as in a chunk that perturbs only the other) or an unbatched matmul, and
# the difference quotient amplifies that by 1/h: such cases get the rounding bound
# 2 k eps F / h of the polynomial tests below.
CHUNK_CASES: dict[str, Callable[..., float] | None] = {
    "sin_2d": None,
    "scalar_to_vector": None,
    "multi_in_multi_out": None,
    "x_matmul_y": lambda x, y: (x.abs() @ y.abs()).max().item(),
}


def assert_same_result(chunked: Any, whole: Any, atol: float | None) -> None:
    assert tree_flatten(chunked)[1] == tree_flatten(whole)[1]
    for a, w in zip(tree_flatten(chunked)[0], tree_flatten(whole)[0]):
        assert a.shape == w.shape and a.dtype == w.dtype
        tol = 1e-12 * max(1.0, w.abs().max().item()) if atol is None else atol
        torch.testing.assert_close(a, w, rtol=0, atol=tol)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("name", list(CHUNK_CASES))
def test_chunk_size_does_not_change_the_result(name: str, scheme: str) -> None:
    func, args, argnums = ZOO[name](torch.float64)
    magnitude = CHUNK_CASES[name]
    atol = None
    if magnitude is not None:
        h = min(automatic_step(a, scheme) for a in args)
        atol = rounding_bound(magnitude(*args), h)
    whole = jacfd(func, argnums, scheme=scheme)(*args)
    for chunk_size in [1, 2, 3, 7, 1000]:
        chunked = jacfd(func, argnums, scheme=scheme, chunk_size=chunk_size)(*args)
        assert_same_result(chunked, whole, atol)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 1000])
def test_chunk_size_with_pytrees(chunk_size: int) -> None:
    x, y = XY
    atol = rounding_bound((x.abs() @ y.abs()).max().item(), automatic_step(y, "central"))
    whole = jacfd(tree_out, (0, 1))(*XY)
    assert_same_result(jacfd(tree_out, (0, 1), chunk_size=chunk_size)(*XY), whole, atol)

    # Without the contraction the arithmetic is the same in every batching.
    def elementwise(x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        return {"a": torch.sin(x) * y.sum(), "b": [x.sum() * torch.cos(y)]}

    whole = jacfd(elementwise, (0, 1))(*XY)
    assert_same_result(jacfd(elementwise, (0, 1), chunk_size=chunk_size)(*XY), whole, None)


# ------------------------------------------------------------------------- decorator


def test_decorator_forms() -> None:
    @jacfd
    def jac_default(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * x

    @functools.partial(jacfd, scheme="forward")
    def jac_forward(x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) * x

    @functools.partial(jacfd, argnums=(0, 1), has_aux=True)
    def jac_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * y, x + y

    x = uniform((4,), 80, torch.float64)
    expected = jacrev(lambda x: torch.sin(x) * x)(x)
    assert_jacobian_close(jac_default(x), expected, torch.float64, "central")
    assert_jacobian_close(jac_forward(x), expected, torch.float64, "forward")
    assert jac_default.__name__ == "jac_default"
    (jx, jy), aux = jac_pair(x, x.flip(0))
    assert_jacobian_close((jx, jy), (torch.diag(x.flip(0)), torch.diag(x)), torch.float64)
    assert torch.equal(aux, x + x.flip(0))


# ---------------------------------------------------------------- exact on polynomials
#
# The truncation error of a stencil of accuracy p vanishes on polynomials of degree
# <= p (central: quadratics; forward/backward: affine maps), so only rounding is
# left: each value f(x + o h e_j) carries an error of at most ~k eps F, where F
# bounds the magnitudes of the terms f sums at the stencil points
# (|a| x^2 + |b| |x| + |c|, or |x|^T |A| |x|, with |x| grown by h) and k the number
# of roundings along the way. The quotient (f(x + h) - f(x - h)) / 2h then errs by
# at most k eps F / h, and (f(x + h) - f(x)) / h by 2 k eps F / h; we bound both by
# 2 k eps F / h_min with k = 8, generous for these few-term polynomials. With the
# automatic step that is ~1e-9 relative (central) or ~1e-7 (one-sided), so we
# also check with a large step (h = 0.5), where any truncation error would be of
# order 0.1 while the rounding bound is ~1e-13.


def rounding_bound(magnitude: float, h_min: float, dtype: torch.dtype = torch.float64) -> float:
    return 2 * 8 * torch.finfo(dtype).eps * magnitude / h_min


def automatic_step(x: torch.Tensor, scheme: str) -> float:
    exponent = 1 / 3 if scheme == "central" else 1 / 2
    eps = torch.finfo(x.dtype).eps
    return eps**exponent * x.abs().clamp_min(1.0).min().item()


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    error = (actual - expected).abs().max().item()
    assert error <= bound, f"error {error:.3e} > {bound:.3e}"


@pytest.mark.parametrize("delta", [None, 0.5], ids=["auto", "h=0.5"])
def test_central_exact_on_elementwise_quadratic(delta: float | None) -> None:
    x = uniform((2, 3), 90, torch.float64)
    a, b, c = 1.5, -2.0, 0.7
    func = lambda x: a * x**2 + b * x + c  # noqa: E731
    actual = jacfd(func, delta=delta)(x)
    h = automatic_step(x, "central") if delta is None else delta
    reach = 3 + (0 if delta is None else delta)  # |x| <= 3, h_auto is negligible
    magnitude = abs(a) * reach**2 + abs(b) * reach + abs(c)
    assert_within(actual, jacrev(func)(x), rounding_bound(magnitude, h))
    # ~1e-9 relative with the automatic step, ~1e-14 with h = 0.5.
    relative = rounding_bound(magnitude, h) / (2 * abs(a) * 3 + abs(b))
    assert relative < (2e-9 if delta is None else 1e-13)


@pytest.mark.parametrize("delta", [None, 0.5], ids=["auto", "h=0.5"])
def test_central_exact_on_quadratic_form(delta: float | None) -> None:
    A = uniform((4, 4), 91, torch.float64)
    x = uniform((4,), 92, torch.float64)
    func = lambda x: x @ A @ x  # noqa: E731
    actual = jacfd(func, delta=delta)(x)
    h = automatic_step(x, "central") if delta is None else delta
    reach = x.abs() + (1e-5 if delta is None else delta)
    magnitude = (reach @ A.abs() @ reach).item()
    assert_within(actual, jacrev(func)(x), rounding_bound(magnitude, h))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("delta", [None, 0.5], ids=["auto", "h=0.5"])
def test_exact_on_affine_maps(scheme: str, delta: float | None) -> None:
    A = uniform((3, 4), 93, torch.float64)
    b = uniform((3,), 94, torch.float64)
    x = uniform((4,), 95, torch.float64)
    func = lambda x: A @ x + b  # noqa: E731
    actual = jacfd(func, delta=delta, scheme=scheme)(x)
    h = automatic_step(x, scheme) if delta is None else delta
    reach = x.abs() + (1e-5 if delta is None else delta)
    magnitude = (A.abs() @ reach + b.abs()).max().item()
    assert_within(actual, A, rounding_bound(magnitude, h))


def test_one_sided_not_exact_on_quadratics() -> None:
    """Control for the tests above: with h = 0.5 a forward difference of a quadratic is
    off by a h = 0.75, so the exactness seen on affine maps is not an accident."""
    x = uniform((3,), 96, torch.float64)
    actual = jacfd(lambda x: 1.5 * x**2, delta=0.5, scheme="forward")(x)
    torch.testing.assert_close(actual, torch.diag(3 * x + 0.75), rtol=0, atol=1e-12)


# -------------------------------------------------------------------------- property


def smooth_of_all(*args: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output j has the shape of argument j and depends on every argument.

    Means, not sums: the tolerance of ``assert_jacobian_close`` assumes derivatives of
    order 1, and with sums the third derivatives grow with the number of elements (a
    (4, 4, 4) argument gave an error of 1.15x the tolerance, at the old engine too)."""
    totals = [torch.sin(a).mean() for a in args]
    mixed = sum((k + 1) * t for k, t in enumerate(totals))
    return tuple(torch.tanh(a) * mixed + torch.cos(a) * totals[j] ** 2 for j, a in enumerate(args))


@st.composite
def calls(draw: st.DrawFn) -> tuple[tuple[torch.Tensor, ...], Any]:
    num_args = draw(st.integers(1, 3))
    args = []
    for k in range(num_args):
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)))
        args.append(uniform(shape, draw(st.integers(0, 2**16)) + 1000 * k, torch.float64))
    indices = draw(
        st.lists(st.integers(0, num_args - 1), min_size=1, max_size=num_args, unique=True)
    )
    negative = draw(st.lists(st.booleans(), min_size=len(indices), max_size=len(indices)))
    wrapped = tuple(i - num_args if neg else i for i, neg in zip(indices, negative))
    argnums = wrapped[0] if len(wrapped) == 1 and draw(st.booleans()) else wrapped
    return tuple(args), argnums


@settings(max_examples=25, deadline=None, derandomize=True)
@given(calls())
def test_property_matches_jacrev(call: tuple[tuple[torch.Tensor, ...], Any]) -> None:
    args, argnums = call
    actual = jacfd(smooth_of_all, argnums)(*args)
    expected = jacrev(smooth_of_all, argnums)(*args)
    assert tree_flatten(actual)[1] == tree_flatten(expected)[1]
    assert_jacobian_close(actual, expected, torch.float64, "central")
