"""Issue 12, edges: no silent wrong result and no raw crash at the edges of the inputs.

Steps that do not move x, complex steps with constant real leaves, exact zeros
where an output ignores an input, jvpfd's step per coordinate, zero-size
tensors, sparsity under torch.func, and a fuzz over bad options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.func import hessian, jacfwd, jacrev, vmap

from jacfd import (
    hessdiagfd,
    hessfd,
    hessfd_with_error,
    jacfd,
    jacfd_adaptive,
    jacfd_with_error,
    jvpfd,
    laplacianfd,
)

F64 = torch.float64


def x3(dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor([0.7, -1.3, 2.1], dtype=dtype)


# -- 1. a delta too small to move x ------------------------------------------------


@pytest.mark.parametrize("transform", [jacfd, jacfd_with_error, hessfd, hessdiagfd, laplacianfd])
def test_a_delta_that_does_not_move_x_is_refused(transform: Callable[..., Any]) -> None:
    x = torch.tensor([1.0, 1e10], dtype=F64)
    with pytest.raises(
        ValueError, match=rf"^{transform.__name__}\(func, delta\).*\(1,\) = 1e\+10"
    ):
        transform(lambda x: x.sin().sum() * x, delta=1e-8)(x)


def test_a_delta_that_does_not_move_x_names_the_fix_and_spares_nan_elements() -> None:
    x = torch.tensor([float("nan"), 1.0], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"larger delta .*delta=None"):
        jacfd(torch.sin, delta=1e-9)(x)
    # A NaN element is not "stuck": its column is NaN, as any derivative at NaN.
    J = jacfd(torch.sin, delta=1e-3)(x)
    assert J[0, 0].isnan() and J[1, 1] == pytest.approx(torch.cos(torch.tensor(1.0)), rel=1e-3)


@pytest.mark.parametrize("scheme", ["forward", "backward", "central", "complex"])
@pytest.mark.parametrize("option", ["delta", "typical"])
def test_step_tensors_of_the_caller_are_never_written(scheme: str, option: str) -> None:
    """The steps are computed in place where jacfd owns the buffer, never in the
    caller's ``delta`` or ``typical`` tensor (same dtype: no copy is made for it)."""
    x = torch.tensor([0.5, -2.0, 3.0], dtype=F64)
    given = torch.tensor([1e-4, 2e-4, 3e-4], dtype=F64)
    kept = given.clone()
    J = jacfd(torch.exp, scheme=scheme, **{option: given})(x)
    assert torch.equal(given, kept)
    assert torch.allclose(J, torch.diag(torch.exp(x)), rtol=1e-3)


def test_a_delta_that_moves_no_element_along_the_tangent_is_refused() -> None:
    x = torch.tensor([1e10, 2e10], dtype=F64)
    with pytest.raises(ValueError, match=r"^jvpfd\(.*delta=1e-08\).*moves no element"):
        jvpfd(torch.sin, (x,), (torch.ones(2, dtype=F64),), delta=1e-8)


# -- 2. jvpfd(has_aux=True) with a plain tensor ------------------------------------


def test_jvpfd_has_aux_needs_a_tuple() -> None:
    x = x3()
    with pytest.raises(TypeError, match=r"^jvpfd\(func, has_aux=True\).*tuple \(output, aux\)"):
        jvpfd(torch.sin, (x,), (x,), has_aux=True)


# -- 3. complex step with output leaves that do not depend on x ---------------------


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize(
    "func",
    [
        lambda x: (x**2, torch.ones(3, dtype=F64)),
        lambda x: {"y": torch.exp(x[0] * x), "c": torch.arange(4, dtype=F64) * 2.5},
    ],
)
def test_complex_step_gives_zeros_for_real_leaves_that_ignore_x(
    func: Callable[..., Any], strategy: str
) -> None:
    x = x3()
    got = jacfd(func, scheme="complex", strategy=strategy)(x)
    want = jacfwd(func)(x)
    for g, w in zip(*(torch.utils._pytree.tree_leaves(t) for t in (got, want))):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-14, atol=0)
    _, tangent = jvpfd(func, (x,), (torch.ones(3, dtype=F64),), scheme="complex")
    _, want_tangent = torch.func.jvp(func, (x,), (torch.ones(3, dtype=F64),))
    for g, w in zip(*(torch.utils._pytree.tree_leaves(t) for t in (tangent, want_tangent))):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=0)


def test_complex_step_still_refuses_only_real_or_varying_real_leaves() -> None:
    x = x3()
    with pytest.raises(TypeError, match="only real tensors"):
        jacfd(lambda x: x.abs(), scheme="complex")(x)
    # A real leaf that moves with the imaginary step (here by a step large enough
    # for |x + ih| to change) is not analytic: refused, not taken as zero.
    with pytest.raises(TypeError, match=r"output leaf 1.*changes"):
        jacfd(lambda x: (x * 2, x.abs()), delta=1e-3, scheme="complex")(x)


# -- 4. exact zeros where an output does not depend on an input ----------------------


def _partly_independent(x: torch.Tensor) -> torch.Tensor:
    # Output 0 ignores x[2]; output 1 depends on x[1] only; output 2 on none.
    return torch.stack(
        [torch.sin(x[0]) * torch.exp(x[1]), torch.cos(x[1]) ** 3, torch.ones_like(x[0]) * 0.3]
    )


STENCILS = [("central", p) for p in (2, 4, 6, 8)] + [
    (s, p) for s in ("forward", "backward") for p in (1, 2, 3, 4)
]
JACOBIAN_ZEROS = torch.tensor([[0, 0, 1], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("scheme", "order"), STENCILS)
def test_exact_zeros_of_first_derivatives(scheme: str, order: int, dtype: torch.dtype) -> None:
    x = x3(dtype)
    J = jacfd(_partly_independent, scheme=scheme, order=order)(x)
    assert (J[JACOBIAN_ZEROS] == 0).all()
    J, error = jacfd_with_error(_partly_independent, scheme=scheme, order=order)(x)
    assert (J[JACOBIAN_ZEROS] == 0).all()
    # The error keeps its rounding bound there: a derivative below eps |f| / h
    # would leave every value unchanged too (check_grad relies on it).
    assert (error[JACOBIAN_ZEROS] > 0).all() and torch.isfinite(error).all()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize(("scheme", "order"), STENCILS)
def test_exact_zeros_of_second_derivatives(scheme: str, order: int, dtype: torch.dtype) -> None:
    x = x3(dtype)
    diagonal = hessdiagfd(_partly_independent, scheme=scheme, order=order)(x)
    assert (diagonal[JACOBIAN_ZEROS] == 0).all()
    laplacian = laplacianfd(_partly_independent, scheme=scheme, order=order)(x)
    assert laplacian[2] == 0
    H = hessfd(_partly_independent, scheme=scheme, order=order)(x)
    zeros = hessian(_partly_independent)(x.double()) == 0  # exactly: no term at all
    assert zeros.sum() == 3 * 9 - 4 - 1  # all but H0 on x0, x1 and H1[1, 1]
    assert (H[zeros] == 0).all()


# -- 5. jvpfd: a step per coordinate, and NaN kept where it belongs -----------------


@pytest.mark.parametrize("scheme", ["central", "forward"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_jvpfd_is_as_accurate_as_the_jacobian_times_the_tangent(
    scheme: str, dtype: torch.dtype
) -> None:
    x = torch.tensor([100.0, -0.5], dtype=dtype)
    v = torch.ones(2, dtype=dtype)
    exact = torch.cos(x.double())
    _, tangent = jvpfd(torch.sin, (x,), (v,), scheme=scheme)
    jvp_error = (tangent.double() - exact).abs()
    jac_error = ((jacfd(torch.sin, scheme=scheme)(x) @ v).double() - exact).abs()
    floor = 4 * torch.finfo(dtype).eps
    assert (jvp_error <= 10 * jac_error + floor).all(), (jvp_error, jac_error)


def test_jvpfd_nan_coordinate_poisons_only_its_outputs() -> None:
    x = torch.tensor([float("nan"), 1.0, -2.0, 300.0], dtype=F64)
    _, tangent = jvpfd(torch.sin, (x,), (torch.ones(4, dtype=F64),))
    assert tangent[0].isnan()
    torch.testing.assert_close(tangent[1:], torch.cos(x[1:]), rtol=1e-8, atol=0)


# -- 6. zero-size inputs and outputs --------------------------------------------------


def _assert_like(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want)


EMPTY = torch.zeros(0, dtype=F64)
VEC = x3()


@pytest.mark.parametrize(
    ("func", "x"),
    [
        (lambda x: (x**2).sum(), EMPTY),  # no input
        (lambda x: x[:0] * 2, VEC),  # no output
        (lambda x: x**2, EMPTY),  # neither
    ],
)
def test_zero_size_second_derivatives(func: Callable[..., Any], x: torch.Tensor) -> None:
    _assert_like(hessfd(func)(x), hessian(func)(x))
    _assert_like(hessfd(func, scheme="forward", order=2)(x), hessian(func)(x))
    _assert_like(hessdiagfd(func)(x), jacrev(jacrev(func))(x).diagonal(dim1=-2, dim2=-1))
    lap = jacrev(jacrev(func))(x).diagonal(dim1=-2, dim2=-1).sum(-1)
    _assert_like(laplacianfd(func)(x), lap)
    for part, want in (("full", hessian(func)(x)), ("laplacian", lap)):
        value, error = hessfd_with_error(func, part=part, bounds=(-5.0, 5.0))(x)  # type: ignore[arg-type]
        _assert_like(value, want)
        _assert_like(error, want)


def test_zero_size_hessian_of_one_empty_argument() -> None:
    def f(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x**2).sum() + y.sum()

    got = hessfd(f, argnums=(0, 1))(VEC, EMPTY)
    want = hessian(f, argnums=(0, 1))(VEC, EMPTY)
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        _assert_like(g, w)


@pytest.mark.parametrize(
    ("func", "x", "pattern"),
    [
        (torch.sin, EMPTY, torch.zeros(0, 0, dtype=torch.bool)),
        (lambda x: x[:0], VEC, torch.zeros(0, 3, dtype=torch.bool)),
        (lambda x: torch.ones(2, dtype=F64) + x.sum(), EMPTY, torch.zeros(2, 0, dtype=torch.bool)),
    ],
)
def test_zero_size_sparsity(func: Callable[..., Any], x: torch.Tensor, pattern: Any) -> None:
    _assert_like(jacfd(func, sparsity=pattern)(x), jacrev(func)(x))
    sparse = jacfd(func, sparsity=pattern, sparse_output=True)(x)
    assert sparse.shape == pattern.shape and sparse._nnz() == 0


@pytest.mark.parametrize("strategy", ["vmap", "loop", "batched"])
@pytest.mark.parametrize("shape", [(0, 3), (4, 0), (0, 0)])
def test_zero_size_batch_dim(shape: tuple[int, int], strategy: str) -> None:
    X = torch.rand(shape, dtype=F64)
    got = jacfd(torch.sin, batch_dim=0, strategy=strategy)(X)
    _assert_like(got, vmap(jacrev(torch.sin))(X))
    moved = jacfd(torch.sin, batch_dim=1)(X.T.contiguous())
    _assert_like(moved, vmap(jacrev(torch.sin))(X))


@pytest.mark.parametrize(
    ("func", "x"), [(torch.sin, EMPTY), (lambda x: x[:0], VEC), (lambda x: x.sum(), EMPTY)]
)
def test_zero_size_first_derivatives(func: Callable[..., Any], x: torch.Tensor) -> None:
    want = jacrev(func)(x)
    _assert_like(jacfd(func)(x), want)
    _assert_like(jacfd(func, delta=1e-3)(x), want)
    J, error = jacfd_with_error(func)(x)
    _assert_like(J, want)
    _assert_like(error, want)
    for options in ({}, {"rtol": 1e-3}, {"bounds": (-5.0, 5.0)}):
        J, error, _ = jacfd_adaptive(func, **options)(x)  # type: ignore[arg-type]
        _assert_like(J, want)
        _assert_like(error, want)
    out, tangent = jvpfd(func, (x,), (torch.ones_like(x),))
    want_out, want_tangent = torch.func.jvp(func, (x,), (torch.ones_like(x),))
    _assert_like(out, want_out)
    _assert_like(tangent, want_tangent)


# -- 7. sparsity under torch.func, and deltas that broadcast the wrong way ------------


def test_sparsity_transform_built_inside_grad() -> None:
    x = x3()
    pattern = torch.eye(3, dtype=torch.bool)
    want = torch.func.grad(lambda x: (jacrev(torch.sin)(x) ** 2).sum())(x)
    got = torch.func.grad(lambda x: (jacfd(torch.sin, sparsity=pattern)(x) ** 2).sum())(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    dense_out = jacfd(torch.sin, sparsity=pattern, sparse_output=True)
    got = torch.func.grad(lambda x: (dense_out(x).to_dense() ** 2).sum())(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_sparsity_under_vmap() -> None:
    X = torch.rand(2, 3, dtype=F64)
    pattern = torch.eye(3, dtype=torch.bool)
    got = vmap(lambda x: jacfd(torch.sin, sparsity=pattern)(x))(X)
    torch.testing.assert_close(got, vmap(jacrev(torch.sin))(X), rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match=r"^jacfd\(func, sparsity, sparse_output=True\).*vmap"):
        vmap(jacfd(torch.sin, sparsity=pattern, sparse_output=True))(X)
    with pytest.raises(ValueError, match=r"^jacfd\(func, sparsity\).*differs across"):
        vmap(lambda x: jacfd(torch.sin, sparsity=torch.diag(x > 0))(x))(X)


@pytest.mark.parametrize(
    ("x", "delta"),
    [
        (torch.tensor(0.5, dtype=F64), torch.full((3,), 1e-4, dtype=F64)),
        (VEC, torch.full((2, 3), 1e-4, dtype=F64)),
    ],
)
def test_delta_that_broadcasts_the_wrong_way(x: torch.Tensor, delta: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"^jacfd\(func, delta\).*does not broadcast"):
        jacfd(torch.sin, delta=delta)(x)
    with pytest.raises(TypeError, match=r"^jvpfd\(.*delta must be None or a positive float"):
        jvpfd(torch.sin, (x,), (torch.ones_like(x),), delta=delta)  # type: ignore[arg-type]


# -- 8. bad options of every transform --------------------------------------------------

TRANSFORMS = [jacfd, jacfd_with_error, hessfd, hessdiagfd, laplacianfd]
BAD_OPTIONS: list[dict[str, Any]] = [
    {"argnums": 1.5},
    {"argnums": (0, 0)},
    {"argnums": 5},
    {"argnums": ()},
    {"delta": -1.0},
    {"delta": "small"},
    {"delta": torch.zeros(3, dtype=F64)},
    {"delta": (1e-3, 1e-3)},
    {"delta": 1e-300},
    {"scheme": "fwd"},
    {"scheme": None},
    {"order": 3},
    {"order": 1.5},
    {"has_aux": 1},
    {"has_aux": True},
    {"chunk_size": 0},
    {"chunk_size": "2"},
    {"randomness": "sometimes"},
    {"strategy": "vmaps"},
    {"strategy": object()},
]
JACFD_ONLY: list[dict[str, Any]] = [
    {"sparsity": torch.ones(2, 3, dtype=torch.bool)},
    {"sparsity": torch.full((3, 3), 2.0)},
    {"sparsity": "x"},
    {"sparse_output": 1},
    {"sparse_output": True},
    {"batch_dim": 1.5},
    {"batch_dim": 5},
]


@pytest.mark.parametrize(
    ("transform", "options"),
    [(t, o) for t in TRANSFORMS for o in BAD_OPTIONS] + [(jacfd, o) for o in JACFD_ONLY],
)
def test_bad_options_are_named_errors(
    transform: Callable[..., Any], options: dict[str, Any]
) -> None:
    name = transform.__name__
    with pytest.raises((TypeError, ValueError), match=rf"^{name}\b"):
        transform(torch.sin, **options)(VEC)


def _pair(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x * y


BAD_JVP: list[tuple[Callable[..., Any], Any, Any, type[Exception]]] = [
    (torch.sin, VEC, VEC, TypeError),  # not tuples
    (torch.sin, [VEC], [VEC], TypeError),
    (torch.sin, None, None, TypeError),
    (torch.sin, (VEC,), None, ValueError),
    (torch.sin, (VEC,), (VEC[:2],), ValueError),
    (_pair, (VEC, VEC), (VEC,), ValueError),
    (torch.sin, (VEC,), (torch.ones(3, dtype=torch.long),), TypeError),
    (torch.sin, (torch.ones(3, dtype=torch.long),), (VEC,), TypeError),
    (torch.sin, ("a",), ("b",), TypeError),
    (torch.sin, (), (), ValueError),
    (lambda x: None, (VEC,), (VEC,), TypeError),
    (lambda x: x.long(), (VEC,), (VEC,), TypeError),
]


@pytest.mark.parametrize(("func", "primals", "tangents", "kind"), BAD_JVP)
def test_bad_jvpfd_arguments_are_named_errors(
    func: Callable[..., Any], primals: Any, tangents: Any, kind: type[Exception]
) -> None:
    with pytest.raises(kind, match=r"^jvpfd\b"):
        jvpfd(func, primals, tangents)


@pytest.mark.parametrize(
    "options",
    [
        {"delta": 0.0},
        {"delta": True},
        {"delta": torch.tensor(1e-3)},
        {"scheme": "fwd"},
        {"order": 3},
        {"has_aux": "yes"},
        {"randomness": None},
        {"strategy": "vmaps"},
    ],
)
def test_bad_jvpfd_options_are_named_errors(options: dict[str, Any]) -> None:
    with pytest.raises((TypeError, ValueError), match=r"^jvpfd\("):
        jvpfd(torch.sin, (VEC,), (VEC,), **options)
