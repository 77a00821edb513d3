"""Every error jacfd raises: its type, and a message that names jacfd, says what
was wrong, and how to fix it."""

from __future__ import annotations

import pytest
import torch

from jacfd import jacfd

X = torch.linspace(-1.0, 1.0, 3, dtype=torch.float64)


def build_errors() -> list[tuple[dict[str, object], type[Exception], list[str]]]:
    return [
        ({"argnums": [0, 1]}, TypeError, ["argnums must be int or Tuple", "argnums=(0, 1)"]),
        ({"argnums": 1.0}, TypeError, ["argnums must be int or Tuple"]),
        ({"argnums": True}, TypeError, ["argnums must be int or Tuple"]),
        ({"argnums": (0, "1")}, TypeError, ["argnums must be int or Tuple"]),
        ({"argnums": ()}, ValueError, ["argnums must be non-empty"]),
        ({"argnums": (0, 0)}, ValueError, ["argnums elements must be unique"]),
        ({"scheme": "centered"}, ValueError, ["unknown scheme", "'central'"]),
        ({"delta": 0.0}, ValueError, ["finite and positive", "delta=None"]),
        ({"delta": -1e-3}, ValueError, ["finite and positive"]),
        ({"delta": float("nan")}, ValueError, ["finite and positive"]),
        ({"delta": float("inf")}, ValueError, ["finite and positive"]),
        ({"delta": "small"}, TypeError, ["delta must be None, a positive float"]),
        ({"delta": True}, TypeError, ["delta must be None, a positive float"]),
        ({"delta": []}, TypeError, ["delta must be None, a positive float"]),
        ({"delta": torch.tensor([1e-3, 0.0])}, ValueError, ["finite and positive", "0.0"]),
        ({"delta": torch.tensor([1, 2])}, TypeError, ["floating point"]),
        ({"chunk_size": 0}, ValueError, ["chunk_size must be positive", "chunk_size=1"]),
        ({"chunk_size": -2}, ValueError, ["chunk_size must be positive"]),
        ({"chunk_size": 2.0}, TypeError, ["chunk_size must be None or a positive int"]),
        ({"randomness": "random"}, ValueError, ["unknown randomness", "'same'"]),
        ({"has_aux": 1}, TypeError, ["has_aux must be a bool"]),
    ]


@pytest.mark.parametrize(("options", "kind", "phrases"), build_errors())
def test_bad_options_are_rejected_when_the_transform_is_built(
    options: dict[str, object], kind: type[Exception], phrases: list[str]
) -> None:
    with pytest.raises(kind) as info:
        jacfd(torch.sin, **options)  # type: ignore[arg-type]
    assert str(info.value).startswith("jacfd")
    for phrase in phrases:
        assert phrase in str(info.value)


def test_non_callable_func() -> None:
    with pytest.raises(TypeError, match=r"^jacfd\(func\): func must be callable, got Tensor"):
        jacfd(X)  # type: ignore[arg-type]


@pytest.mark.parametrize("argnums", [2, -3, (0, 5)])
def test_argnum_out_of_range(argnums: int | tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="but only 2 positional inputs"):
        jacfd(lambda x, y: x * y, argnums=argnums)(X, X)


def test_argnums_aliasing_after_wrapping() -> None:
    with pytest.raises(ValueError, match="refer to the same argument more than once"):
        jacfd(lambda x, y: x * y, argnums=(0, -2))(X, X)


@pytest.mark.parametrize(
    ("value", "phrases"),
    [
        (torch.arange(3), ["integer or bool tensor", ".double()"]),
        (torch.tensor([True, False]), ["integer or bool tensor"]),
        (torch.ones(3, dtype=torch.complex128), ["complex tensor", "real and imaginary parts"]),
        (1.5, ["must be tensors", "float", "torch.as_tensor"]),
        ({"a": X, "b": 3}, ["must be tensors", "int"]),
    ],
)
def test_differentiated_argument_must_be_a_real_floating_tensor(
    value: object, phrases: list[str]
) -> None:
    with pytest.raises(TypeError) as info:
        jacfd(lambda v: X.sum())(value)
    assert str(info.value).startswith("jacfd")
    for phrase in phrases:
        assert phrase in str(info.value)


@pytest.mark.parametrize(
    ("output", "phrase"),
    [
        (None, "got None. Did func forget a return statement?"),
        (3.0, "got a float in its output"),
        ((X, "label"), "got a str in its output"),
        ([], "non-empty pytree of tensors"),
        (torch.arange(3), "dtype torch.int64"),
    ],
)
def test_func_must_return_floating_tensors(output: object, phrase: str) -> None:
    with pytest.raises(TypeError) as info:
        jacfd(lambda x: output)(X)
    assert str(info.value).startswith("jacfd")
    assert phrase in str(info.value)


@pytest.mark.parametrize("output", [X, (X,), (X, X, X), [X, X]])
def test_has_aux_requires_a_pair(output: object) -> None:
    with pytest.raises(
        TypeError, match=r"has_aux=True\): func must return a tuple \(output, aux\)"
    ):
        jacfd(lambda x: output, has_aux=True)(X)


def test_aux_must_hold_tensors() -> None:
    with pytest.raises(TypeError, match="aux must be a tensor or a pytree of tensors, got a str"):
        jacfd(lambda x: (x.sin(), {"name": "x"}), has_aux=True)(X)


def test_single_delta_tensor_for_several_arguments_is_ambiguous() -> None:
    f = jacfd(lambda x, y: x * y, argnums=(0, 1), delta=torch.full((3,), 1e-6))
    with pytest.raises(ValueError, match="ambiguous for 2 differentiated tensors"):
        f(X, X)


def test_delta_structure_must_match_the_arguments() -> None:
    f = jacfd(lambda x, y: x * y, argnums=(0, 1), delta={"x": 1e-6})
    with pytest.raises(ValueError, match="structure of delta does not match"):
        f(X, X)


def test_delta_shape_must_broadcast() -> None:
    with pytest.raises(
        ValueError, match=r"shape \(2,\) does not broadcast to its argument of shape \(3,\)"
    ):
        jacfd(torch.sin, delta=torch.full((2,), 1e-6, dtype=torch.float64))(X)


@pytest.mark.parametrize(
    "func",
    [
        lambda x: x * x.sum().item(),
        lambda x: x if x.sum() > 0 else -x,
        lambda x: torch.from_numpy(x.numpy() ** 2),
    ],
    ids=["item", "control-flow", "numpy"],
)
def test_vmap_failures_suggest_the_loop_strategy(func: object) -> None:
    with pytest.raises(RuntimeError) as info:
        jacfd(func)(X)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("jacfd: evaluating func under torch.vmap failed")
    assert "pass strategy='loop' (or chunk_size=1)" in message
    assert "strategy='batched'" in message
    # ... and the suggestions work.
    for fixed in (jacfd(func, strategy="loop"), jacfd(func, chunk_size=1)):  # type: ignore[arg-type]
        assert fixed(X).shape == (3, 3)


def test_random_func_under_vmap_suggests_same_randomness() -> None:
    with pytest.raises(RuntimeError, match="randomness='same'"):
        jacfd(lambda x: torch.nn.functional.dropout(x, 0.5))(X)


def test_random_func_in_loop_suggests_same_randomness() -> None:
    with pytest.raises(
        RuntimeError, match="used the random number generator while randomness='error'"
    ):
        jacfd(lambda x: x + torch.rand(()), chunk_size=1)(X)


def test_nested_errors_are_not_wrapped_twice() -> None:
    inner = jacfd(lambda x: x * x.sum().item())
    with pytest.raises(RuntimeError) as info:
        jacfd(lambda x: inner(x).sum(0))(X)
    assert str(info.value).count("evaluating func under torch.vmap failed") == 1
