"""Shared tolerances, derived from the error theory of each scheme.

A stencil of accuracy order p for a derivative of order q, with the automatic
step h = eps**(1/(p+q)) * max(1, |x|), has total error

    E ~ C1 * eps * |f| / h**q + C2 * |f^(p+q)| * h**p  ~  C * eps**(p / (p + q))

where C collects the stencil constants, the size of f and of its derivatives on
the test inputs, and the rounding of f's own evaluation. On the test zoo
(|x| <= 3, derivatives of order <= 3 bounded by ~10, a few dozen operations
per evaluation) C stays below ``SAFETY``. Half precision evaluates f itself
with relative error ~ eps per operation and is checked only on small
functions, with the same formula.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import settings
from torch.utils._pytree import tree_flatten

torch.set_default_dtype(torch.float32)

DEFAULT_ORDER = {"forward": 1, "backward": 1, "central": 2}
SAFETY = 50.0


def fd_tolerance(
    dtype: torch.dtype, scheme: str, derivative: int = 1, order: int | None = None
) -> float:
    """Relative tolerance ``SAFETY * eps**(p / (p + q))`` for one scheme, order and
    dtype; the complex step has no cancellation, so its error is ~eps itself."""
    eps = torch.finfo(dtype).eps
    if scheme == "complex":
        return SAFETY * eps
    p = order or DEFAULT_ORDER[scheme]
    return SAFETY * eps ** (p / (p + derivative))


def assert_jacobian_close(
    actual: Any,
    expected: Any,
    dtype: torch.dtype,
    scheme: str = "central",
    factor: float = 1.0,
    derivative: int = 1,
    order: int | None = None,
) -> None:
    """Same pytree structure, shapes and dtypes; entries within the theoretical
    tolerance, relative to ``max(1, max|expected|)`` over each leaf."""
    actual_leaves, actual_spec = tree_flatten(actual)
    expected_leaves, expected_spec = tree_flatten(expected)
    assert actual_spec == expected_spec, f"structure {actual_spec} != {expected_spec}"
    tol = factor * fd_tolerance(dtype, scheme, derivative, order)
    for a, e in zip(actual_leaves, expected_leaves):
        assert isinstance(a, torch.Tensor)
        assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"dtype {a.dtype} != {e.dtype}"
        if a.numel() == 0:
            continue
        scale = max(1.0, e.abs().max().item())
        wide = torch.promote_types(a.dtype, torch.float64)
        error = (a.to(wide) - e.to(wide)).abs().max().item()
        assert error <= tol * scale, (
            f"max error {error:.3e} > {tol * scale:.3e} ({dtype}, {scheme})"
        )


# Property tests draw the same examples on every run: CI must not turn red by chance.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")
