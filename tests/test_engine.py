"""The engine's seams: plans cached per call signature, strategy objects, and
errors that name the transform the user called."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import pytest
import torch
from torch.func import jacrev

from jacfd import Batched, hessdiagfd, hessfd, jacfd, jvpfd, laplacianfd
from jacfd._src._plan import PLAN_CACHE_SIZE
from jacfd._src._strategy import Loop, Vmap

F64 = torch.float64


def smooth(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * x.sum()


def plans_of(transform: Any) -> dict[Any, Any]:
    """The plan cache of a transform made by jacfd (a test-only peek)."""
    planner = next(
        c.cell_contents
        for c in transform.__closure__
        if type(c.cell_contents).__name__ == "Planner"
    )
    plans: dict[Any, Any] = planner._plans
    return plans


def test_one_plan_per_signature_and_reused() -> None:
    transform = jacfd(smooth)
    x = torch.rand(3, dtype=F64)
    for _ in range(3):
        transform(x)
    transform(torch.rand(3, dtype=F64))
    assert len(plans_of(transform)) == 1
    transform(torch.rand(4, dtype=F64))  # another shape
    transform(torch.rand(3, dtype=torch.float32))  # another dtype
    transform(torch.rand(3, dtype=F64, requires_grad=True))  # another requires_grad
    assert len(plans_of(transform)) == 4


def test_plan_cache_is_bounded() -> None:
    transform = jacfd(smooth)
    for n in range(1, PLAN_CACHE_SIZE + 10):
        x = torch.rand(n, dtype=F64)
        assert torch.allclose(transform(x), jacrev(smooth)(x), atol=1e-8)
    assert len(plans_of(transform)) == PLAN_CACHE_SIZE


def test_plans_hold_no_user_tensor() -> None:
    transform = jacfd(lambda x, y: x * y, argnums=(0, 1), delta=1e-6)
    x, y = torch.rand(3, dtype=F64), torch.rand(3, dtype=F64)
    refs = [weakref.ref(x), weakref.ref(y)]
    transform(x, y)
    del x, y
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_plans_are_shared_safely_between_threads() -> None:
    transform = jacfd(smooth)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(20):
                x = torch.rand(n, dtype=F64)
                torch.testing.assert_close(transform(x), jacrev(smooth)(x), atol=1e-7, rtol=1e-7)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(2 + k % 3,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_chunk_size_one_is_the_loop_strategy() -> None:
    from jacfd._src._plan import check_options

    def options(**kw: Any) -> Any:
        base = dict(argnums=0, delta=None, scheme="central", order=None, has_aux=False)
        base |= dict(chunk_size=None, randomness="error", strategy="vmap") | kw
        return check_options("jacfd", smooth, **base)

    assert isinstance(options().strategy, Vmap)
    assert isinstance(options(chunk_size=1).strategy, Loop)
    assert isinstance(options(strategy="loop").strategy, Loop)
    assert options(strategy="batched").strategy == Batched()


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"dim": "a"}, TypeError, r"Batched\(dim='a'\)"),
        ({"dim": 1.0}, TypeError, r"Batched\(dim=1.0\)"),
        ({"out_dim": "0"}, TypeError, r"Batched\(out_dim='0'\)"),
        ({"existing": "yes"}, TypeError, r"Batched\(existing='yes'\)"),
        ({"others": "copy"}, ValueError, r"Batched\(others='copy'\)"),
    ],
)
def test_batched_checks_its_fields_when_made(
    fields: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Batched(**fields)


def item_inside(x: torch.Tensor) -> torch.Tensor:
    return x * x.sum().item()


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("hessfd", lambda x: hessfd(lambda x: item_inside(x).sum())(x)),
        ("hessdiagfd", lambda x: hessdiagfd(lambda x: item_inside(x).sum())(x)),
        ("laplacianfd", lambda x: laplacianfd(lambda x: item_inside(x).sum())(x)),
        ("jvpfd", lambda x: jvpfd(item_inside, (x,), (x,))),
    ],
)
def test_vmap_errors_name_the_transform_called(name: str, call: Any) -> None:
    with pytest.raises(RuntimeError, match=rf"^{name}: evaluating func under torch.vmap"):
        call(torch.rand(3, dtype=F64))


def test_random_errors_name_the_transform_called() -> None:
    def noisy(x: torch.Tensor) -> torch.Tensor:
        return (x * torch.rand_like(x)).sum()

    with pytest.raises(RuntimeError, match=r"^hessfd: func used the random number generator"):
        hessfd(noisy, strategy="loop")(torch.rand(2, dtype=F64))


def test_coarser_output_is_remembered_by_the_plan() -> None:
    """float32 arithmetic on float64 inputs: the first call redoes its first chunk
    with float32-sized steps; later calls step for float32 at once."""
    calls = [0]

    def f(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return torch.sin(x.float())

    transform = jacfd(f, strategy="loop")
    x = torch.rand(4, dtype=F64)
    first = transform(x)
    assert calls[0] == 2 * 8  # central: 8 points, evaluated twice
    calls[0] = 0
    again = transform(x)
    assert calls[0] == 8
    assert torch.equal(first, again)
    torch.testing.assert_close(first, torch.diag(torch.cos(x)).float(), atol=1e-4, rtol=0)
