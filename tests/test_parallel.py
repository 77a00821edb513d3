"""workers= and process_group=: bitwise equal to serial evaluation with the same chunks."""

from __future__ import annotations

import collections
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

import jacfd
from jacfd._src import _processes

ROOT = Path(__file__).resolve().parent.parent


def vector(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.sin() * x.sum(), (x**2).cumsum(0)])


def with_aux(x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return vector(x), {"norm": x.norm()}


def batched_only(x: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2  # a real batch, never a vmapped point
    return x.sin() * x.sum(1, keepdim=True)


def dropout(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.dropout(x * x.sum(), 0.3)


def failing(x: torch.Tensor) -> torch.Tensor:
    if float(x[2]) > 0.6:  # only at x + h e_2: the stencil point to name
        raise ValueError("the simulator diverged")
    return x.sin()


def per_sample(x: torch.Tensor) -> torch.Tensor:
    return (x**2).sum(1, keepdim=True) * x.tanh()


@pytest.fixture(scope="module")
def pool_map() -> Iterator[Callable[..., Any]]:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        yield pool.map


@pytest.fixture(scope="module")
def thread_map() -> Iterator[Callable[..., Any]]:
    with ThreadPoolExecutor(2) as executor:
        yield executor.map


X = torch.linspace(0.1, 1.0, 6, dtype=torch.float64)


@pytest.mark.parametrize("strategy", ["loop", "vmap", "batched"])
@pytest.mark.parametrize("chunk_size", [None, 5])
def test_strategies_bitwise(
    pool_map: Callable[..., Any],
    thread_map: Callable[..., Any],
    strategy: str,
    chunk_size: int | None,
) -> None:
    func = batched_only if strategy == "batched" else vector
    x = X[None].clone() if strategy == "batched" else X
    options: dict[str, Any] = {"strategy": strategy, "chunk_size": chunk_size}
    if strategy == "batched":
        options["strategy"] = jacfd.Batched(dim=0, existing=True)
    serial = jacfd.jacfd(func, **options)(x)
    for workers in (pool_map, thread_map):
        parallel = jacfd.jacfd(func, workers=workers, **options)(x)
        if chunk_size is not None or strategy == "loop":  # the same chunks: bitwise
            assert torch.equal(parallel, serial)
        else:  # other vmap batches than one call: equal to rounding
            torch.testing.assert_close(parallel, serial, rtol=1e-12, atol=1e-12)


def test_int_workers_and_every_transform(pool_map: Callable[..., Any]) -> None:
    for workers in (2, -1):
        assert torch.equal(
            jacfd.jacfd(vector, strategy="loop", workers=workers)(X),
            jacfd.jacfd(vector, strategy="loop")(X),
        )
    loop: dict[str, Any] = {"strategy": "loop", "workers": pool_map}
    for transform in (jacfd.hessfd, jacfd.hessdiagfd, jacfd.laplacianfd):
        serial = transform(lambda_free_scalar, strategy="loop")(X)
        assert torch.equal(transform(lambda_free_scalar, **loop)(X), serial)
        assert torch.equal(transform(lambda_free_scalar, strategy="loop", workers=2)(X), serial)
    with_error = jacfd.jacfd_with_error(vector, **loop)(X)
    assert all(
        torch.equal(a, b)
        for a, b in zip(with_error, jacfd.jacfd_with_error(vector, strategy="loop")(X))
    )
    second = jacfd.hessfd_with_error(lambda_free_scalar, **loop)(X)
    serial_second = jacfd.hessfd_with_error(lambda_free_scalar, strategy="loop")(X)
    assert all(torch.equal(a, b) for a, b in zip(second, serial_second))
    v = torch.ones_like(X)
    assert torch.equal(
        jacfd.jvpfd(vector, (X,), (v,), **loop)[1],
        jacfd.jvpfd(vector, (X,), (v,), strategy="loop")[1],
    )
    assert jacfd.check_grad(vector, X, workers=pool_map).passed
    assert jacfd.check_sparsity(vector, torch.ones(12, 6, dtype=torch.bool), X, **loop).passed
    x = X.clone().requires_grad_()
    model = jacfd.differentiable(vector, **loop)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(grad, torch.func.grad(lambda t: vector(t).sum())(X))


def lambda_free_scalar(x: torch.Tensor) -> torch.Tensor:
    return (x**3).sum() + x[0] * x[-1]


def test_sparsity_aux_per_sample_and_randomness(pool_map: Callable[..., Any]) -> None:
    pattern = torch.zeros(12, 6, dtype=torch.bool)
    pattern[6:] = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    pattern[:6] = True
    for options in ({"chunk_size": 2}, {"strategy": "loop"}):
        sparse = jacfd.jacfd(vector, sparsity=pattern, workers=pool_map, **options)(X)
        assert torch.equal(sparse, jacfd.jacfd(vector, sparsity=pattern, **options)(X))
    jac, aux = jacfd.jacfd(with_aux, has_aux=True, workers=pool_map, chunk_size=4)(X)
    serial_jac, serial_aux = jacfd.jacfd(with_aux, has_aux=True, chunk_size=4)(X)
    assert torch.equal(jac, serial_jac) and torch.equal(aux["norm"], serial_aux["norm"])
    batch = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(
        jacfd.jacfd(per_sample, batch_dim=0, workers=pool_map, chunk_size=2)(batch),
        jacfd.jacfd(per_sample, batch_dim=0, chunk_size=2)(batch),
    )
    for options in ({"strategy": "loop"}, {"chunk_size": 3}, {}):
        torch.manual_seed(1)
        serial = jacfd.jacfd(dropout, randomness="same", **options)(X)
        after_serial = torch.rand(())
        torch.manual_seed(1)
        parallel = jacfd.jacfd(dropout, randomness="same", workers=pool_map, **options)(X)
        assert torch.equal(parallel, serial) if options else torch.allclose(parallel, serial)
        assert torch.equal(torch.rand(()), after_serial)  # the generator moved on alike


def test_failures_name_the_point(pool_map: Callable[..., Any]) -> None:
    x = torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x \+ h along element 2 .*simulator diverged"):
        jacfd.jacfd(failing, strategy="loop", delta=0.25, workers=pool_map)(x)
    with pytest.raises(TypeError, match=r"lambda.*module level.*ThreadPoolExecutor"):
        jacfd.jacfd(lambda x: x.sin(), workers=2)(X)
    with pytest.raises(TypeError, match="module level"):
        jacfd.jacfd(lambda x: x.sin(), workers=pool_map)(X)
    # A thread pool needs no pickling: closures work.
    with ThreadPoolExecutor(2) as executor:
        torch.testing.assert_close(
            jacfd.jacfd(lambda x: x.sin(), workers=executor.map)(X), torch.diag(X.cos())
        )
    with pytest.raises(TypeError, match=r"jacfd\(func, workers=.*Pass its map method"):
        jacfd.jacfd(vector, workers=ThreadPoolExecutor(1))
    with pytest.raises(ValueError, match="positive, or -1"):
        jacfd.jacfd(vector, workers=0)
    with pytest.raises(TypeError, match="process group"):
        jacfd.hessfd(vector, process_group="world")
    with pytest.raises(ValueError, match=r"torch\.func transform"):
        torch.func.vmap(jacfd.jacfd(vector, workers=pool_map))(X[None])


# ---- workers=n: this process and n - 1 made for the call ----

CALLER = os.getpid()  # the process that calls the transforms (inherited by a fork)
SCALE = 1.0


def slow_scaled(x: torch.Tensor) -> torch.Tensor:
    time.sleep(0.01)  # long enough that the worker evaluates some of the points
    return SCALE * vector(x)


def dies_in_a_worker(x: torch.Tensor) -> torch.Tensor:
    if os.getpid() != CALLER:
        os._exit(3)
    time.sleep(0.1)  # the worker starts, and claims a task, meanwhile
    return x.sin()


def interrupted_in_the_caller(x: torch.Tensor) -> torch.Tensor:
    if os.getpid() == CALLER:
        time.sleep(0.1)  # the worker starts, and is evaluating, meanwhile
        raise KeyboardInterrupt
    time.sleep(0.05)
    return x.sin()


def unpicklable_aux(x: torch.Tensor) -> tuple[torch.Tensor, Any]:
    local = collections.namedtuple("local", "cos")  # a class that pickle cannot find
    return x.sin(), local(x.cos())


WEIGHT = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 36, dtype=torch.float64).reshape(6, 6))


def with_a_parameter(x: torch.Tensor) -> torch.Tensor:
    return WEIGHT @ x.sin()


def _our_workers() -> list[Any]:
    return [p for p in multiprocessing.active_children() if p.name == "jacfd-worker"]


def test_workers_see_each_calls_globals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers are made per call: a module global changed between calls is seen."""
    serial = jacfd.jacfd(slow_scaled, strategy="loop")(X)
    assert torch.equal(jacfd.jacfd(slow_scaled, strategy="loop", workers=2)(X), serial)
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 2.0)
    doubled = jacfd.jacfd(slow_scaled, strategy="loop", workers=2)(X)
    assert torch.equal(doubled, jacfd.jacfd(slow_scaled, strategy="loop")(X))
    assert torch.equal(doubled, 2 * serial)
    assert not _our_workers()


def test_no_worker_outlives_a_failing_call() -> None:
    x = torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"x \+ h along element 2 .*simulator diverged"):
        jacfd.jacfd(failing, strategy="loop", delta=0.25, workers=2)(x)
    assert not _our_workers()
    with pytest.raises(RuntimeError, match=r"workers=2\): at the stencil points from .*exited"):
        jacfd.jacfd(dies_in_a_worker, strategy="loop", workers=2)(X)
    assert not _our_workers()
    with pytest.raises(KeyboardInterrupt):
        jacfd.jacfd(interrupted_in_the_caller, strategy="loop", workers=2)(X)
    assert not _our_workers()
    with pytest.raises(TypeError, match=r"(?s)pickling its result .*class defined inside func"):
        jacfd.jacfd(unpicklable_aux, has_aux=True, strategy="loop", workers=2)(X)
    assert not _our_workers()


def waits_for_a_worker(x: torch.Tensor, flag: str, caller: int) -> torch.Tensor:
    """In the caller, waits until a worker has evaluated a point: so that the spawned
    worker, slow to start, evaluates some of them."""
    if os.getpid() == caller:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        Path(flag).touch()
    return vector(x)


def test_values_come_back_plain(pool_map: Callable[..., Any]) -> None:
    """func using a parameter: every map gives the serial values, without a graph (a
    pickled tensor would come back a leaf that requires grad, its graph cut)."""
    serial = jacfd.jacfd(with_a_parameter, strategy="loop")(X)
    with ThreadPoolExecutor(2) as executor:
        for workers in (2, pool_map, executor.map):
            parallel = jacfd.jacfd(with_a_parameter, strategy="loop", workers=workers)(X)
            assert torch.equal(parallel, serial.detach()) and not parallel.requires_grad


def test_spawned_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The start method once CUDA is initialised (a forked child cannot use CUDA)."""
    monkeypatch.setattr(_processes, "start_method", lambda: "spawn")
    flag = str(tmp_path / "a worker evaluated")
    kwargs = {"flag": flag, "caller": os.getpid()}
    parallel = jacfd.jacfd(waits_for_a_worker, strategy="loop", workers=2)(X, **kwargs)
    assert os.path.exists(flag)
    assert torch.equal(parallel, jacfd.jacfd(waits_for_a_worker, strategy="loop")(X, **kwargs))
    assert not _our_workers()


# ---- torch.distributed: ranks spawned once per world size ----


def _ranks(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    try:
        pattern = torch.zeros(12, 6, dtype=torch.bool)
        pattern[6:] = torch.tril(torch.ones(6, 6, dtype=torch.bool))
        pattern[:6] = True
        batch = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        cases: list[tuple[Callable[..., Any], dict[str, Any], torch.Tensor]] = [
            (jacfd.jacfd, {"func": vector, "strategy": "loop"}, X),  # 13 rows: ranks uneven
            (jacfd.jacfd, {"func": vector, "chunk_size": 5}, X),
            (jacfd.jacfd, {"func": vector, "sparsity": pattern, "chunk_size": 2}, X),
            (jacfd.jacfd, {"func": per_sample, "batch_dim": 0, "chunk_size": 2}, batch),
            (jacfd.hessfd, {"func": lambda_free_scalar, "chunk_size": 7}, X),
        ]
        for transform, options, x in cases:
            serial = transform(**options)(x)
            shared = transform(**options, process_group=group)(x)
            assert torch.equal(shared, serial), (world, options)
        serial_pair = jacfd.hessfd_with_error(lambda_free_scalar, chunk_size=7)(X)
        pair = jacfd.hessfd_with_error(lambda_free_scalar, chunk_size=7, process_group=group)(X)
        assert all(torch.equal(a, b) for a, b in zip(pair, serial_pair))
        torch.manual_seed(rank)  # different generators: rank 0's state is used
        shared = jacfd.jacfd(dropout, randomness="same", chunk_size=4, process_group=group)(X)
        torch.manual_seed(0)
        serial = jacfd.jacfd(dropout, randomness="same", chunk_size=4)(X)
        assert torch.equal(shared, serial)
        jac, aux = jacfd.jacfd(with_aux, has_aux=True, strategy="loop", process_group=group)(X)
        assert torch.equal(jac, jacfd.jacfd(vector, strategy="loop")(X))
        assert torch.equal(aux["norm"], X.norm())
    except BaseException:
        dist.destroy_process_group()
        raise
    dist.destroy_process_group()
    # Every check passed and the group is gone. Skip the interpreter's teardown: after a
    # long pytest session the spawned child sometimes aborts there ("terminate called
    # without an active exception", a C++ thread still joinable at exit), after its
    # work is done and checked.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_gloo(world: int) -> None:
    torch_mp.spawn(_ranks, args=(world, _free_port()), nprocs=world)


def _free_port() -> int:
    """A port no one listens on now (the OS picks it), for the ranks' store."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_torchrun_example() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "docs" / "scripts" / "distributed_example.py"
    port = str(_free_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", port, str(script)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 ranks: Jacobian (8, 16), equal to one process's" in done.stdout


def test_workers_example() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = ROOT / "docs" / "scripts" / "workers_example.py"
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the same Jacobian" in done.stdout


FORK_AFTER_THREADS = """
import torch
from jacfd import jacfd
torch.set_num_threads(2)
big = torch.randn(2000, 2000)
(big @ big).sum()  # the caller's OpenMP threads are up before the fork
weights = torch.randn(200_000, dtype=torch.float64)
def f(x):  # a reduction over 200k elements: a parallel kernel in every evaluation
    return (torch.tanh(weights * x.sum()) * weights).sum().reshape(1) * x
x = torch.linspace(0.1, 0.8, 4, dtype=torch.float64)
shared = jacfd(f, strategy="loop", workers=2)(x)
assert torch.get_num_threads() == 2  # the caller's threads are back
torch.set_num_threads(1)  # every process evaluates with one thread: the same bits
assert torch.equal(shared, jacfd(f, strategy="loop")(x))
print("ok")
"""


def test_forked_workers_after_the_caller_used_threads() -> None:
    """A forked child hangs in its first parallel kernel once the caller has used
    torch's OpenMP threads; every process of the call evaluates with one thread,
    so the values equal serial evaluation with one thread, whichever process took
    which task (in a subprocess, so that a regression fails on the timeout
    instead of hanging the suite)."""
    done = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_THREADS], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
