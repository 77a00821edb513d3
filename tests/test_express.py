"""The express path (``_express``): the calls it takes give the general path's bits,
and every check of the general path still fires on it.

The general path is forced by making no signature expressible; results are
compared bit for bit, and with torch.func in float64 where a reference is
needed. Every check is made on a *later* call of a transform, since a new
signature's first call plans it on the general path.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.func import jacrev

from jacfd import Batched, hessdiagfd, jacfd, laplacianfd
from jacfd._src._express import Express

F32, F64 = torch.float32, torch.float64


def planner_of(transform: Any) -> Any:
    return next(
        c.cell_contents
        for c in transform.__closure__
        if type(c.cell_contents).__name__ == "Planner"
    )


def general(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Express, "expressible", staticmethod(lambda *_: False))


def twice(transform: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The second call: the first one plans the signature."""
    transform(*args, **kwargs)
    return transform(*args, **kwargs)


def vector(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * x.sum() + x.pow(3)


def coupled(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of a ``k``-dim tensor that couples its elements, and takes a batch
    along any leading axes (as ``strategy="batched"`` passes it)."""

    def func(x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[: x.dim() - k]
        total = x.reshape(*lead, -1).sum(-1).reshape((*lead, *(1,) * k))
        return torch.sin(x) * total + x.pow(3)

    return func


def elementwise(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + x.pow(3)


def tree_out(x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"a": x.sin(), "b": (x * x).sum()}


def with_aux(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return x.cos() * x.sum(), {"norm": x.norm()}


SHAPES = [(5,), (2, 3), (1,), ()]
CASES = [
    ("forward", None, {}),
    ("backward", None, {}),
    ("central", None, {}),
    ("central", 4, {}),
    ("forward", 2, {}),
    ("forward", None, {"delta": 1e-6}),
    ("backward", None, {"delta": 1e-6}),
    ("central", None, {"strategy": "batched"}),
    ("forward", None, {"strategy": "batched"}),
    ("backward", None, {"strategy": Batched(dim=-1)}),
    ("forward", None, {"randomness": "same"}),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize(("scheme", "order", "options"), CASES, ids=str)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_bitwise_the_general_path(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    scheme: str,
    order: int | None,
    options: dict[str, Any],
    dtype: torch.dtype,
) -> None:
    x = torch.linspace(-0.7, 1.3, max(1, torch.Size(shape).numel()), dtype=dtype).reshape(shape)
    func = elementwise if options.get("strategy") == Batched(dim=-1) else coupled(len(shape))
    transform = jacfd(func, scheme=scheme, order=order, **options)
    express = twice(transform, x)
    assert planner_of(transform)._express, "the call should have taken the express path"
    with monkeypatch.context() as patch:
        general(patch)
        reference = twice(jacfd(func, scheme=scheme, order=order, **options), x)
    assert express.shape == reference.shape == jacrev(func)(x).shape
    assert torch.equal(express, reference)


@pytest.mark.parametrize("scheme", ["forward", "central"])
@pytest.mark.parametrize("func", [tree_out, with_aux], ids=lambda f: f.__name__)
def test_pytree_outputs_and_aux(
    monkeypatch: pytest.MonkeyPatch, scheme: str, func: Callable[..., Any]
) -> None:
    x = torch.linspace(-0.7, 1.3, 4, dtype=F64)
    has_aux = func is with_aux
    express = twice(jacfd(func, scheme=scheme, has_aux=has_aux), x)
    with monkeypatch.context() as patch:
        general(patch)
        reference = twice(jacfd(func, scheme=scheme, has_aux=has_aux), x)
    flat, spec = torch.utils._pytree.tree_flatten(express)
    flat_reference, spec_reference = torch.utils._pytree.tree_flatten(reference)
    assert spec == spec_reference
    assert all(torch.equal(a, b) for a, b in zip(flat, flat_reference))


@pytest.mark.parametrize("strategy", ["batched", "vmap"])
def test_pytree_output_of_a_batched_function(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    func = lambda x: {"a": x.sin(), "b": (x * x).sum(-1)}  # noqa: E731
    x = torch.linspace(-0.7, 1.3, 4, dtype=F64)
    express = twice(jacfd(func, scheme="forward", strategy=strategy), x)
    with monkeypatch.context() as patch:
        general(patch)
        reference = twice(jacfd(func, scheme="forward", strategy=strategy), x)
    assert express.keys() == reference.keys()
    assert all(torch.equal(express[k], reference[k]) for k in express)
    torch.testing.assert_close(express["b"], 2 * x, atol=1e-6, rtol=0)


def test_argnums_tuple_and_other_arguments() -> None:
    """One differentiated tensor among others: jacrev's layout, tuple included."""
    x, y = torch.rand(3, dtype=F64), torch.rand(3, dtype=F64)
    func = lambda x, y, scale=1.0: scale * x * y.exp()  # noqa: E731
    for argnums in (1, (1,)):
        jac = twice(jacfd(func, argnums, scheme="forward"), x, y)
        ref = jacrev(func, argnums)(x, y)
        if isinstance(argnums, tuple):
            assert isinstance(jac, tuple) and len(jac) == 1
            jac, ref = jac[0], ref[0]
        torch.testing.assert_close(jac, ref, atol=1e-6, rtol=1e-6)


def test_output_finer_than_input() -> None:
    """float32 in, float64 out: the steps are cast, the result is float64."""
    func = lambda x: x.double().sin()  # noqa: E731
    x = torch.linspace(-1, 1, 4, dtype=F32)
    jac = twice(jacfd(func, scheme="forward"), x)
    assert jac.dtype == F64
    torch.testing.assert_close(jac, torch.diag(x.double().cos()), atol=1e-3, rtol=0)


def test_output_coarser_than_input_steps_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """func computes in float32 on float64 inputs: every call steps for float32's
    eps (the express path gives the call to the general one)."""
    func = lambda x: x.float().exp()  # noqa: E731
    x = torch.linspace(-1, 1, 4, dtype=F64)
    transform = jacfd(func, scheme="forward")
    results = [transform(x) for _ in range(3)]
    with monkeypatch.context() as patch:
        general(patch)
        reference = jacfd(func, scheme="forward")(x)
    assert all(torch.equal(r, reference) for r in results)
    assert (results[-1] - torch.diag(x.exp())).abs().max() < 1e-3


def test_grad_through_the_express_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.linspace(-0.7, 1.3, 4, dtype=F64, requires_grad=True)
    func = coupled(1)
    for strategy in ("vmap", "batched"):
        transform = jacfd(func, scheme="forward", strategy=strategy)
        transform(x)
        (grad,) = torch.autograd.grad(transform(x).sum(), x)
        with monkeypatch.context() as patch:
            general(patch)
            reference = jacfd(func, scheme="forward", strategy=strategy)(x)
            (expected,) = torch.autograd.grad(reference.sum(), x)
        assert torch.equal(grad, expected)


def test_under_vmap_and_grad() -> None:
    xs = torch.linspace(-0.7, 1.3, 12, dtype=F64).reshape(3, 4)
    transform = jacfd(vector)
    transform(xs[0])
    torch.testing.assert_close(torch.func.vmap(transform)(xs), torch.func.vmap(jacrev(vector))(xs))
    scalar = lambda x: transform(x).sum()  # noqa: E731
    expected = torch.func.grad(lambda x: jacrev(vector)(x).sum())(xs[0])
    torch.testing.assert_close(torch.func.grad(scalar)(xs[0]), expected, atol=1e-6, rtol=1e-6)


def test_randomness_error_on_a_later_call() -> None:
    """A real batch cannot see random ops by itself: the generator watch must run on
    the express path too."""
    state = {"draw": False}

    def func(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rand_like(x) if state["draw"] else x.sin()

    transform = jacfd(func, strategy="batched")
    x = torch.rand(3, dtype=F64)
    twice(transform, x)
    state["draw"] = True
    with pytest.raises(RuntimeError, match=r"jacfd: func used the random number generator"):
        transform(x)


def test_a_step_that_does_not_move_x_on_a_later_call() -> None:
    transform = jacfd(vector, delta=1e-6, scheme="forward")
    transform(torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match=r"jacfd\(func, delta\): the step 1e-06 does not move"):
        transform(torch.full((3,), 1e12, dtype=F64))


def test_wrong_batch_output_on_a_later_call() -> None:
    state = {"drop": False}

    def func(x: torch.Tensor) -> torch.Tensor:
        return x.sum(0) if state["drop"] else x.sin()

    transform = jacfd(func, strategy="batched")
    x = torch.rand(3, dtype=F64)
    twice(transform, x)
    state["drop"] = True
    with pytest.raises(ValueError, match=r"strategy=Batched\(\.\.\.\)\): func was given a batch"):
        transform(x)


def test_train_mode_buffers_are_kept_on_every_call() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).to(F64).train()
    x = torch.linspace(-1.0, 1.0, 3, dtype=F64)  # the points are net's batch
    before = {name: b.clone() for name, b in net.named_buffers()}
    transform = jacfd(net, strategy="batched", scheme="forward")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twice(transform, x)
    with pytest.warns(UserWarning, match=r"func updated module buffers"):
        transform(x)
    for name, b in net.named_buffers():
        assert torch.equal(b, before[name]), name


def test_caller_tensors_are_never_written() -> None:
    x = torch.linspace(-0.7, 1.3, 4, dtype=F64)
    delta = torch.full((4,), 1e-6, dtype=F64)
    copies = x.clone(), delta.clone()
    for options in ({}, {"delta": delta}, {"strategy": "batched", "scheme": "forward"}):
        twice(jacfd(vector, **options), x)
    assert torch.equal(x, copies[0]) and torch.equal(delta, copies[1])


@pytest.mark.parametrize(
    "options",
    [
        {"chunk_size": 2},
        {"strategy": "loop"},
        {"scheme": "complex"},
        {"bounds": (-2.0, 2.0)},
        {"typical": 0.1},
        {"sparsity": torch.eye(4, dtype=torch.bool)},
    ],
    ids=str,
)
def test_what_the_express_path_leaves_to_the_general_one(options: dict[str, Any]) -> None:
    x = torch.linspace(-0.7, 1.3, 4, dtype=F64)
    transform = jacfd(torch.sin, **options)
    twice(transform, x)
    assert not planner_of(transform)._express
    twice(jacfd(lambda x, y: x * y, argnums=(0, 1)), x, x)  # two tensors
    twice(jacfd(lambda d: d["x"].sin()), {"x": x})  # a pytree argument
    assert not planner_of(jacfd(torch.sin))._express


def conv_net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.GELU(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 5 * 5, 4),
    ).to(dtype)


@pytest.mark.parametrize("strategy", ["vmap", Batched(existing=True)], ids=str)
def test_float32_conv_net_with_parameters_that_require_grad(
    monkeypatch: pytest.MonkeyPatch, strategy: Any
) -> None:
    """A user's float32 network in training state (grad mode, parameters requiring
    grad), one image (1, C, H, W): the express path gives the general path's bits, the
    reference is jacrev in float64, and the parameters get their gradient through it."""
    net = conv_net(F32)
    image = torch.linspace(-1, 1, 50).reshape(1, 2, 5, 5)
    transform = jacfd(net, strategy=strategy)
    jac = twice(transform, image)
    assert planner_of(transform)._express
    with monkeypatch.context() as patch:
        general(patch)
        assert torch.equal(jac, twice(jacfd(net, strategy=strategy), image))
    reference = jacrev(conv_net(F64))(image.double())
    error = (jac.double() - reference).abs().max() / reference.abs().max()
    assert error < 1e-3  # float32 smooth networks: 9e-5 to 9e-4 (docs/accuracy.md)
    jac.sum().backward()  # (the last bias does not move J: its gradient is 0)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters())
    assert net[0].weight.grad is not None and net[0].weight.grad.abs().sum() > 0


def test_threads_with_different_signatures() -> None:
    import threading

    transform = jacfd(coupled(1), strategy="batched", scheme="forward")
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for k in range(30):
                x = torch.linspace(-1, 1, n, dtype=F64) * (1 + k / 30)
                torch.testing.assert_close(
                    transform(x), jacrev(coupled(1))(x), atol=1e-6, rtol=1e-6
                )
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(2 + k % 3,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("strategy", ["vmap", "batched"])
def test_non_contiguous_inputs(strategy: str) -> None:
    base = torch.linspace(-1, 1, 24, dtype=F64).reshape(4, 6)
    for x in (base[:, ::2], base.T, base[1]):
        func = coupled(x.dim())
        transform = jacfd(func, strategy=strategy)
        assert torch.equal(twice(transform, x), twice(transform, x.contiguous()))


def test_other_arguments_and_keywords_reach_func() -> None:
    def func(w: torch.Tensor, x: torch.Tensor, *, scale: float) -> torch.Tensor:
        return scale * torch.tanh(x @ w)

    w, x = torch.rand(3, 2, dtype=F64), torch.rand(5, 3, dtype=F64)
    transform = jacfd(func, 1, strategy=Batched(others="broadcast"))
    jac = twice(transform, w, x, scale=2.0)
    reference = jacrev(lambda w, x: func(w, x, scale=2.0), 1)(w, x)
    torch.testing.assert_close(jac, reference, atol=1e-6, rtol=1e-6)


def test_integer_output_on_a_later_call() -> None:
    state = {"int": False}

    def func(x: torch.Tensor) -> torch.Tensor:
        return (x * 10).long() if state["int"] else x.sin()

    x = torch.rand(3, dtype=F64)
    for strategy in ("vmap", "batched"):
        state["int"] = False
        transform = jacfd(func, strategy=strategy)
        twice(transform, x)
        state["int"] = True
        with pytest.raises(TypeError, match=r"^jacfd: func returned a tensor of dtype"):
            transform(x)


@pytest.mark.parametrize("strategy", ["vmap", "batched"])
def test_torch_func_transforms_of_the_express_path(
    monkeypatch: pytest.MonkeyPatch, strategy: str
) -> None:
    """jacrev, jvp and vmap of a jacfd (inside them the express path is taken too)
    give the general path's bits, and jacfd of grad(f) approximates the Hessian."""
    func = coupled(1)
    x = torch.linspace(-0.7, 1.3, 4, dtype=F64)
    v = torch.linspace(1.0, 2.0, 4, dtype=F64)

    def results() -> list[torch.Tensor]:
        transform = jacfd(func, scheme="forward", strategy=strategy)
        transform(x)
        return [
            torch.func.jacrev(transform)(x),
            torch.func.jvp(transform, (x,), (v,))[1],
            torch.func.vmap(transform)(torch.stack([x, 2 * x])),
        ]

    express = results()
    with monkeypatch.context() as patch:
        general(patch)
        reference = results()
    assert all(torch.equal(a, b) for a, b in zip(express, reference))
    # Summed over any batch rows, so that grad(scalar) is per row: batched too.
    scalar = lambda x: (x.sin() * x.sum(-1, keepdim=True)).sum()  # noqa: E731
    hessian_fd = twice(jacfd(torch.func.grad(scalar), strategy=strategy), x)
    torch.testing.assert_close(hessian_fd, torch.func.hessian(scalar)(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("transform", [hessdiagfd, laplacianfd], ids=lambda t: t.__name__)
@pytest.mark.parametrize(
    ("scheme", "order", "strategy"),
    [
        ("central", None, "vmap"),
        ("central", 4, "vmap"),
        ("forward", None, "vmap"),
        ("backward", 2, "batched"),
        ("central", None, "batched"),
    ],
    ids=str,
)
@pytest.mark.parametrize("shape", [(4,), (2, 3), ()], ids=str)
def test_second_derivative_diagonals_take_the_express_path(
    monkeypatch: pytest.MonkeyPatch,
    transform: Callable[..., Any],
    scheme: str,
    order: int | None,
    strategy: str,
    shape: tuple[int, ...],
) -> None:
    """hessdiagfd and laplacianfd: the same bits as the general path, the express path
    taken, and the values of torch.func's Hessian."""
    func = coupled(len(shape))
    x = torch.linspace(-0.7, 1.3, max(1, torch.Size(shape).numel()), dtype=F64).reshape(shape)
    options = {"scheme": scheme, "order": order, "strategy": strategy}
    made = transform(func, **options)
    express = twice(made, x)
    assert planner_of(made)._express
    with monkeypatch.context() as patch:
        general(patch)
        assert torch.equal(express, twice(transform(func, **options), x))
    n, m = x.numel(), func(x).numel()
    hessian = torch.func.hessian(func)(x).reshape(m, n, n).diagonal(dim1=1, dim2=2)
    expected = hessian.reshape((*func(x).shape, *x.shape))
    if transform is laplacianfd:
        expected = hessian.sum(-1).reshape(func(x).shape)
    torch.testing.assert_close(express, expected, atol=2e-4, rtol=2e-4)


def test_laplacian_with_aux_and_a_pytree_output(monkeypatch: pytest.MonkeyPatch) -> None:
    def func(x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"u": x.sin() * x.sum(), "e": (x * x).sum()}, x.norm()

    x = torch.linspace(-0.7, 1.3, 4, dtype=F64)
    (laplacian, aux) = twice(laplacianfd(func, has_aux=True), x)
    with monkeypatch.context() as patch:
        general(patch)
        (reference, reference_aux) = twice(laplacianfd(func, has_aux=True), x)
    assert laplacian.keys() == reference.keys()
    assert all(torch.equal(laplacian[k], reference[k]) for k in laplacian)
    assert torch.equal(aux, reference_aux)
    torch.testing.assert_close(laplacian["e"], torch.tensor(8.0, dtype=F64))
