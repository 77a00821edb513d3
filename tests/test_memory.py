"""``chunk_size`` bounds memory in grad mode too, and gradients through jacfd hold.

A module's parameters require grad, so in grad mode every chunk's activations
would stay in the autograd graph until backward. The chunks are evaluated under
activation checkpointing instead: backward evaluates each chunk again. The memory
kept for backward is measured deterministically, as the bytes of the distinct
storages that the graph saves (a saved-tensor hook), and the gradients are
compared with the chunked evaluation without recomputation (exactly), with the
unchunked one, and with ``torch.func`` in float64.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import jacfd._src._driver as driver
from jacfd import hessdiagfd, hessfd, jacfd

DTYPE = torch.float64


class _Saved:
    """A tensor saved for backward, seen through the hook."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def saved_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()`` and the bytes of the distinct storages its graph keeps for backward
    (only what is still alive when it returns: a checkpoint's own hook hides what
    it drops)."""
    live: weakref.WeakSet[_Saved] = weakref.WeakSet()

    def pack(tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor)
        live.add(saved)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        result = fn()
    storages = {s.tensor.untyped_storage().data_ptr(): s.tensor.untyped_storage() for s in live}
    return result, sum(storage.nbytes() for storage in storages.values())


def conv_net(seed: int = 0) -> nn.Module:
    """A small convolutional network of one (1, H, W) image, any size; its
    parameters require grad, as users have them."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(0),
        nn.Linear(4, 3),
    ).to(DTYPE)


@pytest.fixture
def no_recompute(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call to evaluate the chunks as before: every activation kept."""
    return lambda: monkeypatch.setattr(driver, "_can_recompute", lambda: False)


def param_grads(net: nn.Module, loss: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    net.zero_grad()
    loss().backward()
    return [p.grad.clone() for p in net.parameters() if p.grad is not None]


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float) -> None:
    """Within ``rtol`` of the largest entry of them all: the finite differences'
    rounding is relative to the gradients' scale, not to each (possibly zero) entry."""
    assert len(actual) == len(expected)
    scale = max(e.abs().max().item() for e in expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0.0, atol=rtol * scale)


# -------------------------------------------------------------------------- memory


@pytest.mark.parametrize("width", [4, 12])
@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_kept_memory_is_one_chunk_at_most(width: int, strategy: str) -> None:
    net, chunk = conv_net(), 8
    x = torch.randn(1, 4, width, dtype=DTYPE)
    J, kept = saved_bytes(lambda: jacfd(net, chunk_size=chunk, strategy=strategy)(x))
    _, one_chunk = saved_bytes(lambda: vmap(net)(x.expand(chunk, *x.shape)))
    assert J.requires_grad
    assert kept <= one_chunk + J.nbytes
    # The measure sees the activations: without chunking, all of them are kept.
    _, unchunked = saved_bytes(lambda: jacfd(net)(x))
    assert unchunked > 3 * (one_chunk + J.nbytes)


def test_kept_memory_does_not_grow_with_the_chunks() -> None:
    transform = jacfd(conv_net(), chunk_size=8)

    def kept(width: int) -> int:
        x = torch.randn(1, 3, width, dtype=DTYPE)
        J, nbytes = saved_bytes(lambda: transform(x))
        return nbytes - J.nbytes

    assert kept(8) <= kept(4) + 1024  # twice the points, twice the chunks


def test_hessian_kept_memory_is_bounded() -> None:
    net = conv_net()
    x = torch.randn(1, 2, 3, dtype=DTYPE)
    f = lambda z: net(z).sum()  # noqa: E731
    H, kept = saved_bytes(lambda: hessfd(f, chunk_size=8)(x))
    _, one_chunk = saved_bytes(lambda: vmap(f)(x.expand(8, *x.shape)))
    _, unchunked = saved_bytes(lambda: hessfd(f)(x))
    assert kept <= one_chunk + 4 * H.nbytes < unchunked


# ------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_gradients_equal_those_without_recomputation(
    strategy: str, chunk_size: int, no_recompute: Callable[[], None]
) -> None:
    net = conv_net()
    x = torch.randn(1, 2, 3, dtype=DTYPE)
    transform = jacfd(net, chunk_size=chunk_size, strategy=strategy)
    actual = param_grads(net, lambda: transform(x).pow(2).sum())
    unchunked = param_grads(net, lambda: jacfd(net, strategy=strategy)(x).pow(2).sum())
    no_recompute()
    expected = param_grads(net, lambda: transform(x).pow(2).sum())
    assert_same(actual, expected, rtol=0.0)
    # Chunks of other sizes round differently, amplified by 1/h.
    assert_same(actual, unchunked, rtol=1e-8)


@pytest.mark.parametrize("name", ["hessdiagfd", "hessfd"])
def test_second_derivative_gradients(name: str, no_recompute: Callable[[], None]) -> None:
    net = conv_net()
    x = torch.randn(1, 2, 2, dtype=DTYPE)
    transform = {"hessdiagfd": hessdiagfd, "hessfd": hessfd}[name](
        lambda z: net(z).sum(), chunk_size=6
    )
    actual = param_grads(net, lambda: transform(x).sum())
    no_recompute()
    assert_same(actual, param_grads(net, lambda: transform(x).sum()), rtol=0.0)


def test_gradients_match_torch_func_in_float64() -> None:
    net = conv_net()
    x = torch.randn(1, 3, 4, dtype=DTYPE)
    params = {k: v.detach() for k, v in net.named_parameters()}
    exact = grad(lambda p: jacrev(lambda z: functional_call(net, p, (z,)))(x).sum())(params)
    actual = param_grads(net, lambda: jacfd(net, chunk_size=4)(x).sum())
    assert_same(actual, list(exact.values()), rtol=1e-7)
    # torch.func.grad through jacfd (which evaluates without recomputing there).
    through = grad(
        lambda p: jacfd(lambda z: functional_call(net, p, (z,)), chunk_size=4)(x).sum()
    )(params)
    assert_same(list(through.values()), actual, rtol=1e-12)


def test_input_gradients_and_double_backward(no_recompute: Callable[[], None]) -> None:
    net = conv_net()
    weight = net[0].weight

    def gradients() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(1, 2, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
        x.requires_grad_()
        J = jacfd(net, chunk_size=3)(x)
        dx, dw = torch.autograd.grad(J.pow(2).sum(), (x, weight), create_graph=True)
        return dx, torch.autograd.grad(dw.sum(), net[-1].weight)[0]

    actual = gradients()
    no_recompute()
    assert_same(list(actual), list(gradients()), rtol=0.0)


def test_under_vmap_and_jacrev() -> None:
    """Inside torch.func transforms the chunks are evaluated without recomputing
    (the recomputation would run outside them); the gradients still hold."""
    net = conv_net()
    xs = torch.randn(2, 1, 3, 4, dtype=DTYPE)
    transform = jacfd(net, chunk_size=4)
    one = param_grads(net, lambda: transform(xs[0]).sum())
    both = param_grads(net, lambda: transform(xs[0]).sum() + transform(xs[1]).sum())
    # vmap evaluates other batch sizes: rounding differences, amplified by 1/h.
    assert_same(param_grads(net, lambda: vmap(transform)(xs).sum()), both, rtol=1e-9)
    params = {k: v.detach() for k, v in net.named_parameters()}
    by_rows = jacrev(lambda p: jacfd(lambda z: functional_call(net, p, (z,)), chunk_size=4)(xs[0]))
    rows = by_rows(params)
    assert_same([rows[k].sum((0, 1, 2, 3)) for k in params], one, rtol=1e-9)


def test_compiled_gradients() -> None:
    """Under torch.compile the chunks are traced without checkpointing (fullgraph)."""
    net = conv_net()
    x = torch.randn(1, 2, 3, dtype=DTYPE)
    transform = jacfd(net, chunk_size=4)
    expected = param_grads(net, lambda: transform(x).sum())
    torch._dynamo.reset()
    try:
        compiled = torch.compile(transform, fullgraph=True, backend="aot_eager")
        assert_same(param_grads(net, lambda: compiled(x).sum()), expected, rtol=1e-9)
    finally:
        torch._dynamo.reset()


# ----------------------------------------------------------------------- randomness


def dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, 2)).to(DTYPE)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
@pytest.mark.parametrize("randomness", ["same", "different"])
def test_recomputation_replays_the_random_numbers(
    strategy: str, randomness: str, no_recompute: Callable[[], None]
) -> None:
    net, x = dropout_net(), torch.linspace(-1, 1, 6, dtype=DTYPE)

    def run() -> list[torch.Tensor]:
        torch.manual_seed(7)
        J = jacfd(net, chunk_size=3, strategy=strategy, randomness=randomness)(x)
        state = torch.get_rng_state()
        grads = param_grads(net, lambda: J.sum())
        assert torch.equal(torch.get_rng_state(), state)  # backward draws nothing
        return [J.detach(), *grads]

    actual = run()
    no_recompute()
    assert_same(actual, run(), rtol=0.0)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_randomness_error_still_raises(strategy: str) -> None:
    net, x = dropout_net(), torch.linspace(-1, 1, 6, dtype=DTYPE)
    with pytest.raises(RuntimeError, match="random"):
        jacfd(net, chunk_size=3, strategy=strategy)(x)
    net.eval()
    assert jacfd(net, chunk_size=3, strategy=strategy)(x).requires_grad


# ------------------------------------------------------------ when it does not apply


@pytest.fixture
def no_checkpoint(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the chunks evaluated under a checkpoint."""
    calls: list[int] = []
    checkpoint = driver.checkpoint

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(driver, "checkpoint", counted)
    return calls


def test_no_recomputation_without_need(no_checkpoint: list[int]) -> None:
    net = conv_net()
    x = torch.randn(1, 3, 4, dtype=DTYPE)
    expected = jacfd(net)(x).detach()
    with torch.no_grad():
        actual = jacfd(net, chunk_size=4)(x)
    assert not no_checkpoint and not actual.requires_grad
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=0.0)
    jacfd(net, chunk_size=100)(x)  # one chunk
    jacfd(net)(x)
    assert not no_checkpoint
    # Nothing requires grad: only the first chunk tells.
    plain = jacfd(lambda z: z.sin() * z, chunk_size=2)(x)
    assert len(no_checkpoint) == 1 and not plain.requires_grad
    expected = torch.diag((x.sin() + x * x.cos()).flatten())
    torch.testing.assert_close(plain.reshape(12, 12), expected)
