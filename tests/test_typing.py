"""What a type checker sees of the public API. mypy checks this file in CI (it is in
``[tool.mypy] files``, with ``warn_unused_ignores`` from ``strict``): every
``type: ignore`` below must stay an error, so the misuses stay caught. The tests
also run, checking the same calls at run time."""

from __future__ import annotations

from typing import Any

import torch
from typing_extensions import assert_type

from jacfd import hessfd, hessfd_with_error, jacfd, jacfd_with_error, jvpfd


def scaled_sin(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return torch.sin(x) * scale


def sin_with_aux(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sin(x), x.sum()


X = torch.linspace(0.0, 1.0, 3, dtype=torch.float64)


def test_results_have_the_arity_of_has_aux() -> None:
    pair = assert_type(jacfd_with_error(scaled_sin)(X), tuple[Any, Any])
    triple = assert_type(jacfd_with_error(sin_with_aux, has_aux=True)(X), tuple[Any, Any, Any])
    assert len(pair) == 2 and len(triple) == 3 and float(triple[2]) == float(X.sum())
    pair = assert_type(jvpfd(scaled_sin, (X,), (X,)), tuple[Any, Any])
    triple = assert_type(jvpfd(sin_with_aux, (X,), (X,), has_aux=True), tuple[Any, Any, Any])
    assert len(pair) == 2 and len(triple) == 3
    pair = assert_type(hessfd_with_error(scaled_sin)(X), tuple[Any, Any])
    triple = assert_type(hessfd_with_error(sin_with_aux, has_aux=True)(X), tuple[Any, Any, Any])
    assert len(pair) == 2 and len(triple) == 3
    has_aux: bool = False  # not a literal: the arity is unknown
    assert_type(jacfd_with_error(scaled_sin, has_aux=has_aux)(X), tuple[Any, ...])


def test_transforms_take_funcs_parameters() -> None:
    assert jacfd(scaled_sin)(X, scale=2.0).shape == (3, 3)
    assert hessfd(scaled_sin)(X, 2.0).shape == (3, 3, 3)


def _misuses_a_type_checker_catches() -> None:  # never called
    jacfd(scaled_sin)(X, scale="big")  # type: ignore[arg-type]
    jacfd(scaled_sin)(X, shift=1.0)  # type: ignore[call-arg]
    hessfd(scaled_sin)()  # type: ignore[call-arg]
    _jac, _err, _aux = jacfd_with_error(scaled_sin)(X)  # type: ignore[misc]
    _out, _tangent = jvpfd(sin_with_aux, (X,), (X,), has_aux=True)  # type: ignore[misc]
