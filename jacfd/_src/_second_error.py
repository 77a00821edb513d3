"""``hessfd_with_error``: second derivatives (the Hessian, its diagonal or the
Laplacian) Richardson-extrapolated from the steps ``h`` and ``2h``, with a
per-entry error estimate, as :func:`jacfd_with_error` does for Jacobians."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._inputs import Argnums, P, normalize_argnums, wraps
from ._second import hessdiagfd, hessfd, laplacianfd
from ._stencil import Scheme, resolve_stencil
from ._steps import exact_steps
from ._with_error import ROUNDING_SAFETY

Part = Literal["full", "diagonal", "laplacian"]
PARTS = {"full": hessfd, "diagonal": hessdiagfd, "laplacian": laplacianfd}
SAFETY = 2.0
"""Factor on the spread ``|H_h - H_2h| / (2**p - 1)``: one sample of the rounding
where rounding dominates, so a margin over it."""


def hessfd_with_error(
    func: Callable[P, Any],
    argnums: Argnums = 0,
    scheme: Scheme = "central",
    *,
    order: int | None = None,
    part: Part = "full",
    chunk_size: int | None = None,
) -> Callable[P, tuple[Any, Any]]:
    """Second derivatives with a per-entry error estimate.

    ``part`` selects :func:`hessfd` (``"full"``), :func:`hessdiagfd`
    (``"diagonal"``) or :func:`laplacianfd` (``"laplacian"``). Each is computed
    at the automatic step ``h`` and at ``2h`` (two batched calls, twice the
    evaluations); the two combine to ``(2**p H_h - H_2h) / (2**p - 1)``, which
    cancels the leading error term. The estimate is ``2 |H_h - H_2h| / (2**p - 1)``
    plus a rounding bound ``4 eps sum|w| |f(x)| / (h_i h_j)``.

    Args:
        func: As in :func:`hessfd`.
        argnums: As in :func:`hessfd`.
        scheme: ``"central"`` (default), ``"forward"`` or ``"backward"``.
        order: As in :func:`hessfd`.
        part: ``"full"`` (default), ``"diagonal"`` or ``"laplacian"``.
        chunk_size: As in :func:`hessfd`.

    Returns:
        A function returning ``(value, error)``, both in the layout of the chosen
            transform, ``error >= 0``.

    Examples:
        >>> import torch
        >>> from jacfd import hessfd_with_error
        >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
        >>> f = lambda x: torch.sin(x[0]) * torch.exp(x[1])
        >>> H, err = hessfd_with_error(f)(x)
        >>> bool(((H - torch.func.hessian(f)(x)).abs() <= err).all())
        True
    """
    name = "hessfd_with_error"
    if part not in PARTS:
        raise ValueError(
            f"{name}(func, part={part!r}): part must be 'full', 'diagonal' or 'laplacian'."
        )
    transform = PARTS[part]
    stencil = resolve_stencil(name, scheme, order, 2)
    transform(func, argnums, None, scheme, order=order)  # validates the options
    gain = 2**stencil.accuracy
    weights = sum(abs(float(w)) for w in stencil.weights)

    @wraps(func)
    def with_error(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        numbers = normalize_argnums(name, argnums, len(args))
        leaves, spec = tree_flatten(tuple(args[i] for i in numbers))
        steps = [
            exact_steps(leaf, None, stencil, torch.finfo(leaf.dtype).eps, name) for leaf in leaves
        ]
        fine = tree_unflatten(steps, spec)
        coarse = tree_unflatten([2 * h for h in steps], spec)
        single = isinstance(argnums, int)
        fine, coarse = (fine[0], coarse[0]) if single else (fine, coarse)
        small = transform(func, argnums, fine, scheme, order=order, chunk_size=chunk_size)
        large = transform(func, argnums, coarse, scheme, order=order, chunk_size=chunk_size)
        h_small, h_large = small(*args, **kwargs), large(*args, **kwargs)
        value = tree_map(lambda a, b: (gain * a - b) / (gain - 1), h_small, h_large)
        spread = tree_map(lambda a, b: SAFETY * (a - b).abs() / (gain - 1), h_small, h_large)
        # The rounding floor, per output element and pair of steps.
        out = func(*args, **kwargs)
        eps = max(torch.finfo(leaf.dtype).eps for leaf in leaves)
        inverse = [1 / s.to(torch.float64) for s in steps]
        # In the order the layout flattens its leaves: input a, then input b.
        if part == "full":
            pairs = torch.cat([torch.outer(a, b).reshape(-1) for a in inverse for b in inverse])
        elif part == "diagonal":
            pairs = torch.cat([a**2 for a in inverse])
        else:
            pairs = sum(((a**2).sum() for a in inverse), torch.zeros(())).reshape(1)
        out_leaves, out_spec = tree_flatten(out)
        spread_leaves = out_spec.flatten_up_to(spread)
        errors = []
        for f, s in zip(out_leaves, spread_leaves):
            s_leaves, s_spec = tree_flatten(s)
            flat = torch.cat([t.reshape(f.numel(), -1) for t in s_leaves], dim=1)
            floor = ROUNDING_SAFETY * eps * weights * f.detach().abs().reshape(-1, 1).double()
            total = flat + (floor * pairs.to(flat.device)).to(flat.dtype)
            parts, first = [], 0
            for t in s_leaves:
                width = t[(0,) * f.dim()].numel() if f.dim() else t.numel()
                parts.append(total[:, first : first + width].reshape(t.shape))
                first += width
            errors.append(tree_unflatten(parts, s_spec))
        return value, tree_unflatten(errors, out_spec)

    return with_error
