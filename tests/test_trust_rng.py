"""Silent wrong results of issue 12: random numbers, threads, in-place writes,
module buffers, and the hint after a failure under vmap.

References never use jacfd: the Jacobian of the function with the dropout mask
that ``randomness="same"`` draws (the first draw after a seed) fixed, by
torch.func in float64.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch

from jacfd import hessdiagfd, hessfd, jacfd, jacfd_with_error, jvpfd, laplacianfd

F64 = torch.float64
SEED = 3
N = 6
A = torch.linspace(-1.0, 1.0, 4 * N, dtype=F64).reshape(4, N).sin()
X = torch.linspace(-0.8, 0.9, N, dtype=F64)
TOL = {"atol": 1e-6, "rtol": 1e-6}


def dropout(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.dropout(x, 0.5, training=True)


def vector(x: torch.Tensor) -> torch.Tensor:
    return A @ dropout(x.tanh())


def scalar(x: torch.Tensor) -> torch.Tensor:
    return (dropout(x.tanh()) * x.cos()).sum() + (A @ dropout(x.sin())).pow(2).sum() * 0


def mask() -> torch.Tensor:
    """The mask the first draw after ``torch.manual_seed(SEED)`` gives."""
    torch.manual_seed(SEED)
    return dropout(torch.ones(N, dtype=F64))


def fixed_vector(m: torch.Tensor) -> torch.Tensor:
    return lambda x: A @ (x.tanh() * m)  # type: ignore[return-value]


def fixed_scalar(x: torch.Tensor) -> torch.Tensor:
    return (x.tanh() * mask_same * x.cos()).sum()


mask_same = mask()
CASES = [("vmap", None), ("vmap", 1), ("vmap", 3), ("loop", None), ("loop", 1), ("loop", 3)]


@pytest.mark.parametrize(("strategy", "chunk_size"), CASES)
def test_common_random_numbers_every_transform(strategy: str, chunk_size: int | None) -> None:
    """Issue 12: loop without chunk_size returned noise (3e5; hessfd 1e8)."""
    opts = {"randomness": "same", "strategy": strategy, "chunk_size": chunk_size}
    jac = torch.func.jacrev(fixed_vector(mask_same))(X)
    torch.manual_seed(SEED)
    torch.testing.assert_close(jacfd(vector, **opts)(X), jac, **TOL)
    torch.manual_seed(SEED)
    torch.testing.assert_close(jacfd_with_error(vector, **opts)(X)[0], jac, **TOL)
    hess = torch.func.hessian(fixed_scalar)(X)
    torch.manual_seed(SEED)
    torch.testing.assert_close(hessfd(scalar, **opts)(X), hess, atol=1e-4, rtol=1e-4)
    torch.manual_seed(SEED)
    torch.testing.assert_close(hessdiagfd(scalar, **opts)(X), hess.diagonal(), **TOL)
    torch.manual_seed(SEED)
    torch.testing.assert_close(laplacianfd(scalar, **opts)(X), hess.trace(), **TOL)
    v = torch.linspace(1.0, -1.0, N, dtype=F64)
    torch.manual_seed(SEED)
    out, tangent = jvpfd(vector, (X,), (v,), randomness="same", strategy=strategy)
    torch.testing.assert_close(tangent, jac @ v, **TOL)
    torch.testing.assert_close(out, fixed_vector(mask_same)(X), **TOL)


def test_same_moves_the_generator_on_like_one_call() -> None:
    """The next transform draws new numbers, as after one call of func."""
    torch.manual_seed(SEED)
    dropout(torch.ones(N, dtype=F64))
    after_one_call = torch.rand(1)
    torch.manual_seed(SEED)
    jacfd(vector, randomness="same", strategy="loop")(X)
    assert torch.equal(torch.rand(1), after_one_call)


def test_data_dependent_draws_are_an_error() -> None:
    def varying(x: torch.Tensor) -> torch.Tensor:
        draws = 2 if x[0].item() > X[0].item() else 1  # more at some points
        return x * torch.rand(draws, dtype=F64).sum()

    with pytest.raises(RuntimeError, match=r"jacfd\(func, randomness='same'\).*amount"):
        jacfd(varying, randomness="same", strategy="loop")(X)


def _drawing_in_a_thread(stop: threading.Event) -> threading.Thread:
    def draw() -> None:
        while not stop.is_set():
            torch.rand(64)

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("strategy", ["loop", "batched"])
def test_other_threads_drawing_never_fail_a_deterministic_func(strategy: str) -> None:
    """Issue 12: the watch on the process-wide generator blamed func."""
    ref = torch.func.jacrev(torch.sin)(X)
    stop = threading.Event()
    thread = _drawing_in_a_thread(stop)
    try:
        for _ in range(100):
            torch.testing.assert_close(jacfd(torch.sin, strategy=strategy)(X), ref, **TOL)
    finally:
        stop.set()
        thread.join()


def test_same_in_several_threads_never_mixes_masks() -> None:
    """Each result is the Jacobian for one mask: the columns of dropped inputs are
    exactly zero and the others those of the fixed-mask reference."""
    results: list[torch.Tensor] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    drawer = _drawing_in_a_thread(stop)

    def work() -> None:
        try:
            for _ in range(20):
                results.append(jacfd(vector, randomness="same", strategy="loop")(X))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    drawer.join()
    assert not errors, errors
    assert len(results) == 40
    for J in results:
        kept = J.ne(0).any(dim=0).to(F64) * 2  # dropout keeps scaled by 2
        torch.testing.assert_close(J, torch.func.jacrev(fixed_vector(kept))(X), **TOL)


def two_args(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y.mul_(2.0)  # writes into a differentiated argument
    return x * y.sin() + x.pow(2).sum()


def in_dict(d: dict[str, torch.Tensor]) -> torch.Tensor:
    d["b"].add_(1.0)
    return d["a"] * d["b"].cos()


@pytest.mark.parametrize(
    ("strategy", "chunk_size"), [(s, c) for s in ("vmap", "loop") for c in (None, 1, 2)]
)
def test_in_place_write_into_one_of_several_arguments(
    strategy: str, chunk_size: int | None
) -> None:
    """Issue 12: the caller's tensor changed and the Jacobian was garbage."""
    x, y = X[:4].clone(), X[2:].clone()
    x0, y0 = x.clone(), y.clone()
    with pytest.raises(ValueError, match=r"jacfd\(func\): func wrote in place"):
        jacfd(two_args, argnums=(0, 1), strategy=strategy, chunk_size=chunk_size)(x, y)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    d = {"a": x, "b": y}
    with pytest.raises(ValueError, match=r"jacfd\(func\): func wrote in place"):
        jacfd(in_dict, strategy=strategy, chunk_size=chunk_size)(d)
    assert torch.equal(d["a"], x0) and torch.equal(d["b"], y0)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_in_place_write_into_the_only_argument(strategy: str) -> None:
    def scaled(x: torch.Tensor) -> torch.Tensor:
        x.mul_(3.0)
        return x.sin()

    x = X.clone()
    J = jacfd(scaled, strategy=strategy)(x)
    assert torch.equal(x, X)
    torch.testing.assert_close(J, torch.func.jacrev(lambda t: scaled(t.clone()))(X), **TOL)


def _batch_norm_net() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)).to(F64).train()


@pytest.mark.parametrize("form", ["module", "method", "closure"])
def test_train_mode_batch_norm_keeps_its_statistics(form: str) -> None:
    """Issue 12: the running statistics moved once per stencil point."""
    net = _batch_norm_net()
    func = {"module": net, "method": net.forward, "closure": lambda x: net(x)}[form]
    x = torch.linspace(-1.0, 1.0, 12, dtype=F64).reshape(4, 3).cos()
    before = {name: b.clone() for name, b in net.named_buffers()}
    with pytest.warns(UserWarning, match=r"jacfd\(func\): func updated module buffers.*eval"):
        J = jacfd(func, strategy="loop")(x)
    for name, b in net.named_buffers():
        assert torch.equal(b, before[name]), name
    bn = net[1]

    def batch_stats(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.batch_norm(net[0](t), None, None, bn.weight, bn.bias, True)

    torch.testing.assert_close(J, torch.func.jacrev(batch_stats)(x), **TOL)


def test_eval_mode_batch_norm_gives_no_warning() -> None:
    net = _batch_norm_net().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jacfd(net, strategy="loop")(torch.ones(2, 3, dtype=F64))


def test_out_of_memory_under_vmap_points_to_chunk_size() -> None:
    def big_under_vmap(x: torch.Tensor) -> torch.Tensor:
        if torch._C._functorch.is_batchedtensor(x):
            raise torch.OutOfMemoryError("out of memory (simulated)")
        return x.sin()

    with pytest.raises(torch.OutOfMemoryError, match="chunk_size") as caught:
        jacfd(big_under_vmap)(X)
    assert "strategy=" not in str(caught.value)
    # The fix named there works.
    torch.testing.assert_close(jacfd(big_under_vmap, chunk_size=1)(X), torch.diag(X.cos()), **TOL)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_dtype_mismatch_says_so_and_names_no_strategy(strategy: str) -> None:
    w = torch.ones(N, 2, dtype=F64)

    def mixed(x: torch.Tensor) -> torch.Tensor:
        return x @ w  # float32 @ float64

    with pytest.raises(RuntimeError, match="dtype") as caught:
        jacfd(mixed, strategy=strategy)(X.float())
    assert "strategy=" not in str(caught.value) and "vmap" not in str(caught.value)
