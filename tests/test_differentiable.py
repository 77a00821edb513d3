"""``jacfd.differentiable``: gradients from finite differences agree with autograd
(float64, to the scheme's accuracy) in every mode, on a zoo of functions."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from jacfd import differentiable, jacfd, jvpfd

F64 = torch.float64
CENTRAL = 1e-8  # relative error of central differences of order 2 in float64
COMPLEX = 1e-14


def close(actual: Any, expected: Any, rtol: float) -> None:
    for a, e in zip(tree_flatten(actual)[0], tree_flatten(expected)[0], strict=True):
        scale = max(e.abs().max().item(), 1.0)
        assert (a - e).abs().max().item() <= rtol * scale, (a, e)


def _gen(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


W = _gen(4, 3, seed=1)

# name: (func, args, options, rtol); every func is differentiable by autograd too.
ZOO: dict[str, tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], float]] = {
    "sin": (torch.sin, (_gen(5),), {}, CENTRAL),
    "matmul": (lambda a, b: a @ b, (_gen(3, 4), _gen(4, 2, seed=2)), {}, CENTRAL),
    "pytree in and out": (
        lambda d, t: {"y": d["a"].exp() * t[0].sum(), "z": (d["b"] @ t[1]).tanh()},
        ({"a": _gen(3), "b": _gen(2, 3, seed=3)}, (_gen(2, seed=4), _gen(3, seed=5))),
        {},
        CENTRAL,
    ),
    "several outputs, one constant in an input": (
        lambda x, y: (x.sin(), y * 2.0, x.sum() * torch.ones(2, dtype=F64)),
        (_gen(3), _gen(2, seed=6)),
        {},
        CENTRAL,
    ),
    "non-tensor args": (
        lambda x, power, name="tanh": getattr(torch, name)(x) ** power,
        (_gen(4), 3),
        {},
        CENTRAL,
    ),
    "batch_dim": (
        lambda x: (x @ W).tanh() * x.sum(1, keepdim=True),
        (_gen(6, 4),),
        {"batch_dim": 0},
        CENTRAL,
    ),
    "batch_dim=1": (lambda x: x.T.sin().T * x[0], (_gen(3, 5),), {"batch_dim": 1}, CENTRAL),
    "sparsity (banded)": (
        lambda x: x[1:] * x[:-1].sin() + x[1:].exp(),
        (_gen(8),),
        {"sparsity": torch.ones(7, 8, dtype=torch.bool).triu().tril(1)},
        CENTRAL,
    ),
    "complex step": (lambda x: x.exp() * x.sin(), (_gen(5),), {"scheme": "complex"}, COMPLEX),
    "order 4, chunked": (
        lambda x: x.cos() * x.prod(),
        (_gen(5),),
        {"order": 4, "chunk_size": 3},
        1e-10,
    ),
    "loop strategy": (lambda x: x.sinh() * x.mean(), (_gen(4),), {"strategy": "loop"}, CENTRAL),
}


def _scalar(out: Any) -> torch.Tensor:
    leaves = tree_flatten(out)[0]
    return sum(
        (leaf * torch.linspace(-1, 2, leaf.numel(), dtype=F64).reshape(leaf.shape)).sum()
        for leaf in leaves
    )


@pytest.mark.parametrize("name", list(ZOO))
def test_backward_agrees_with_autograd(name: str) -> None:
    func, args, options, rtol = ZOO[name]
    f = differentiable(func, **options)
    leaves = lambda a: [x for x in tree_flatten(a)[0] if isinstance(x, torch.Tensor)]  # noqa: E731
    mine = tree_map(
        lambda x: x.clone().requires_grad_() if isinstance(x, torch.Tensor) else x, args
    )
    ref = tree_map(
        lambda x: x.clone().requires_grad_() if isinstance(x, torch.Tensor) else x, args
    )
    out = f(*mine)
    close(out, func(*args), 0.0)  # the values are func's own
    _scalar(out).backward()
    _scalar(func(*ref)).backward()
    close([x.grad for x in leaves(mine)], [x.grad for x in leaves(ref)], rtol)


@pytest.mark.parametrize(
    "name", ["sin", "matmul", "pytree in and out", "batch_dim", "complex step"]
)
def test_torch_func_reverse_and_forward_modes(name: str) -> None:
    func, args, options, rtol = ZOO[name]
    f = differentiable(func, **options)
    argnums = tuple(range(len(args)))
    close(jacrev(f, argnums)(*args), jacrev(func, argnums)(*args), rtol)
    close(
        grad(lambda *a: _scalar(f(*a)), argnums)(*args),
        grad(lambda *a: _scalar(func(*a)), argnums)(*args),
        rtol,
    )
    tangents = tree_map(lambda x: torch.ones_like(x), args)
    out, t_out = jvp(f, args, tangents)
    close(t_out, jvp(func, args, tangents)[1], 1e3 * rtol)  # one step along a direction
    close(out, func(*args), 0.0)
    if name != "pytree in and out":
        close(jacfwd(f, argnums)(*args), jacfwd(func, argnums)(*args), 1e3 * rtol)
    _, pullback = vjp(f, *args)
    cot = tree_map(torch.ones_like, func(*args))
    close(pullback(cot), vjp(func, *args)[1](cot), rtol)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_vmap_and_per_sample_gradients(strategy: str) -> None:
    def func(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (w @ x).tanh() * x.sum()

    f = differentiable(func, strategy=strategy)
    xs, w = _gen(5, 3), _gen(2, 3, seed=7)
    close(vmap(f, (0, None))(xs, w), vmap(func, (0, None))(xs, w), 1e-15)
    per_sample = vmap(grad(lambda x, w: f(x, w).sum(), (0, 1)), (0, None))(xs, w)
    expected = vmap(grad(lambda x, w: func(x, w).sum(), (0, 1)), (0, None))(xs, w)
    close(per_sample, expected, CENTRAL)
    close(
        jacrev(vmap(f, (0, None)), (0, 1))(xs, w),
        jacrev(vmap(func, (0, None)), (0, 1))(xs, w),
        CENTRAL,
    )
    close(
        vmap(jacrev(f))(xs, w.expand(5, 2, 3)), vmap(jacrev(func))(xs, w.expand(5, 2, 3)), CENTRAL
    )


def test_vmap_runs_func_once_on_the_batch() -> None:
    """With strategy="vmap", vmap over a differentiable function vmaps func: the
    backward costs the evaluations of one sample's Jacobian, whatever the batch."""
    calls = []

    def func(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x.sin() * x.sum()

    f = differentiable(func)
    xs = _gen(16, 3).requires_grad_()
    vmap(f)(xs).sum().backward()
    assert len(calls) <= 4  # the value, then the stencil points in one vmap call
    close(xs.grad, vmap(grad(lambda x: func(x).sum()))(xs.detach()), CENTRAL)


def test_black_box_numpy_and_argnums() -> None:
    def simulate(x: torch.Tensor, k: torch.Tensor, steps: int) -> torch.Tensor:
        y, kk = x.numpy().copy(), k.numpy()
        for _ in range(steps):
            y = y + 0.1 * np.sin(kk * y)
        return torch.from_numpy(y)

    def twin(x: torch.Tensor, k: torch.Tensor, steps: int) -> torch.Tensor:
        for _ in range(steps):
            x = x + 0.1 * torch.sin(k * x)
        return x

    x, k = _gen(4).requires_grad_(), _gen(4, seed=8).requires_grad_()
    f = differentiable(simulate, argnums=0, strategy="loop")
    f(x, k, 5).pow(2).sum().backward()
    assert k.grad is None  # not in argnums
    expected = grad(lambda x: twin(x, k.detach(), 5).pow(2).sum())(x.detach())
    close(x.grad, expected, CENTRAL)


def test_no_mutation_and_version_check() -> None:
    x = _gen(4).requires_grad_()
    before = x.detach().clone()
    y = differentiable(lambda x: x)(x)  # an output aliasing its input is copied
    assert y.data_ptr() != x.data_ptr()
    y.sum().backward()
    assert torch.equal(x.detach(), before) and torch.allclose(x.grad, torch.ones(4, dtype=F64))
    z = differentiable(torch.sin)(x)
    with torch.no_grad():
        x.add_(1.0)  # the saved input changed: autograd's version counter says so
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_double_backward_raises() -> None:
    f = differentiable(torch.sin)
    x = _gen(3)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad(grad(lambda x: f(x).sum()))(x[0])
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.func.hessian(lambda x: f(x).sum())(x)


def test_errors_name_differentiable() -> None:
    with pytest.raises(TypeError, match=r"differentiable\(func"):
        differentiable(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"differentiable\(func.*scheme"):
        differentiable(torch.sin, scheme="sideways")
    with pytest.raises(TypeError, match=r"differentiable\(func, \.\.\.\): unknown option"):
        differentiable(torch.sin, steps=3)
    with pytest.raises(TypeError, match="tensor or a pytree of tensors"):
        differentiable(lambda x: float(x.sum()))(_gen(3))


def test_compile_fullgraph() -> None:
    def black_box(d: dict[str, torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        a = d["a"].numpy()
        return torch.from_numpy(np.sin(a) * scale), torch.from_numpy(a.sum(keepdims=True) ** 2)

    f = differentiable(black_box, strategy="loop")

    def loss(x: torch.Tensor) -> torch.Tensor:
        s, q = f({"a": x * 2.0}, 3.0)
        return s.pow(2).sum() + q.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x = _gen(4).requires_grad_()
    compiled(x).backward()
    expected = grad(lambda x: ((3.0 * (2 * x).sin()) ** 2).sum() + (2 * x).sum() ** 2)(x.detach())
    close(x.grad, expected, CENTRAL)


def test_backward_memory_is_bounded_by_chunk_size() -> None:
    """A dense backward contracts each chunk's columns with the cotangent at once:
    no tensor as large as the (outputs x inputs) Jacobian is ever made."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    n_in, n_out, chunk = 64, 500, 8
    weight = torch.randn(n_out, n_in, dtype=torch.float64)
    f = differentiable(lambda x: torch.tanh(weight @ x), chunk_size=chunk)
    x = torch.randn(n_in, dtype=torch.float64, requires_grad=True)
    y = f(x)
    watch = Largest()
    with watch:
        y.sum().backward()
    assert watch.numel <= 2 * chunk * n_out < n_in * n_out
    expected = torch.func.grad(lambda x: torch.tanh(weight @ x).sum())(x.detach())
    torch.testing.assert_close(x.grad, expected, rtol=1e-7, atol=1e-9)


# ----------------------------------------------- tensor and pytree typical and bounds

T = torch.linspace(0, 2e5, 20, dtype=F64)


def decay_and_root(b: torch.Tensor, c: dict[str, torch.Tensor]) -> torch.Tensor:
    """A rate of 1e-5 (typical matters) and square roots at 0 (bounds matter)."""
    return torch.cat([b[1] * torch.exp(-b[0] * T), torch.sqrt(c["s"]) * b[1] / 1e3])


B = torch.tensor([1e-5, 1e3], dtype=F64)
C = {"s": torch.tensor([0.0, 1e-3, 0.5], dtype=F64)}
TYPICAL = (B.abs(), {"s": torch.full((3,), 0.1, dtype=F64)})
BOUNDS = ((0.0, {"s": torch.zeros(3, dtype=F64)}), math.inf)
V = _gen(23, seed=7)


def _leaves(b: torch.Tensor, c: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [b.detach().clone().requires_grad_(), c["s"].detach().clone().requires_grad_()]


def test_compile_fullgraph_two_inputs() -> None:
    """The compiled backward's gradients are views of one buffer in the dense vjp:
    the custom op returns them as separate tensors (it raised before)."""
    f = differentiable(lambda x, y: x.sin() * y.sum())
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, y: f(x, y).sum(), fullgraph=True, backend="aot_eager")
    x, y = _gen(3).requires_grad_(), _gen(2, seed=8).requires_grad_()
    compiled(x, y).backward()
    expected = grad(lambda x, y: (x.sin() * y.sum()).sum(), (0, 1))(x.detach(), y.detach())
    close((x.grad, y.grad), expected, CENTRAL)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_typical_and_bounds_tensors_and_pytrees(compiled: bool) -> None:
    """A per-element typical and tensor bounds (pytrees like the arguments): the
    same v^T J as jacfd's Jacobian with the same options, and the same J t as jvpfd."""
    jac = jacfd(decay_and_root, (0, 1), typical=TYPICAL, bounds=BOUNDS)(B, C)
    expected = (V @ jac[0], V @ jac[1]["s"])
    f = differentiable(decay_and_root, typical=TYPICAL, bounds=BOUNDS)

    def loss(b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (f(b, {"s": s}) * V).sum()

    if compiled:
        torch._dynamo.reset()
        loss = torch.compile(loss, fullgraph=True, backend="aot_eager")
    b, s = _leaves(B, C)
    loss(b, s).backward()
    torch.testing.assert_close((b.grad, s.grad), expected, rtol=1e-13, atol=0)
    # The default step is 60% of the rate: its gradient is off.
    b, s = _leaves(B, C)
    (differentiable(decay_and_root, bounds=BOUNDS)(b, {"s": s}) @ V).backward()
    assert float((b.grad - expected[0]).abs().max() / expected[0].abs().max()) > 1e-2
    if compiled:
        return
    tangents = (_gen(2, seed=9), _gen(3, seed=10).abs())
    _, along = jvp(lambda b, s: f(b, {"s": s}), (B, C["s"]), tangents)
    _, reference = jvpfd(
        decay_and_root, (B, C), (tangents[0], {"s": tangents[1]}), typical=TYPICAL, bounds=BOUNDS
    )
    torch.testing.assert_close(along, reference, rtol=1e-13, atol=0)


def test_delta_as_a_pytree_like_the_arguments() -> None:
    """delta as jacfd takes it (a pytree like the differentiated arguments, here a
    tensor and a dict): the same v^T J as jacfd's Jacobian with that delta."""
    c = {"s": C["s"] + 0.1}  # away from the square root's kink at 0
    delta = (B.abs() * 1e-6, {"s": c["s"] * 1e-6})
    jac = jacfd(decay_and_root, (0, 1), delta=delta)(B, c)
    b, s = _leaves(B, c)
    (differentiable(decay_and_root, delta=delta)(b, {"s": s}) @ V).backward()
    torch.testing.assert_close((b.grad, s.grad), (V @ jac[0], V @ jac[1]["s"]), rtol=1e-13, atol=0)


def test_typical_and_bounds_with_argnums() -> None:
    """argnums=1: a pytree like that argument (bare, as jacfd takes it); one
    differentiated tensor: a tensor. A mismatch names differentiable."""
    typical, bounds = {"s": TYPICAL[1]["s"]}, ({"s": BOUNDS[0][1]["s"]}, 2.0)
    jac = jacfd(decay_and_root, 1, typical=typical, bounds=bounds)(B, C)["s"]
    s = C["s"].clone().requires_grad_()
    (
        differentiable(decay_and_root, argnums=1, typical=typical, bounds=bounds)(B, {"s": s}) @ V
    ).backward()
    torch.testing.assert_close(s.grad, V @ jac, rtol=1e-13, atol=0)
    x = _gen(4).abs().requires_grad_()
    lower = torch.tensor([0.0, -1.0, 0.0, -math.inf], dtype=F64)
    f = differentiable(torch.sqrt, typical=torch.full((4,), 0.5, dtype=F64), bounds=(lower, 5.0))
    f(x).sum().backward()
    jac = jacfd(torch.sqrt, typical=torch.full((4,), 0.5, dtype=F64), bounds=(lower, 5.0))(
        x.detach()
    )
    torch.testing.assert_close(x.grad, jac.sum(0), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match=r"^differentiable\(func, typical\): the structure"):
        differentiable(decay_and_root, typical={"s": 1.0})(B, C)
    with pytest.raises(ValueError, match=r"^differentiable\(func, bounds\): a single bounds"):
        differentiable(decay_and_root, bounds=(torch.zeros(3, dtype=F64), 1.0))(B, C)
