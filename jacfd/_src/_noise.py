"""``noise="estimate"``: the noise level of func's values, by ECnoise.

Moré and Wild, "Estimating computational noise", SIAM J. Sci. Comput. 33(3),
2011. func is evaluated at ``x + i delta p`` for ``i = -4..4`` along a random
direction ``p``; the k-th differences of a smooth function shrink like
``delta**k``, those of noise of standard deviation ``sigma`` stay near
``sqrt((2k)! / (k!)**2) sigma``. The estimate is the first order k at which
three consecutive levels agree within a factor 4 and the differences change
sign, per output element; jacfd then takes the median over output elements of
``sigma / |f(x)|``: the relative noise the steps must balance.

The direction comes from a private generator with a fixed seed: every call
(and every rank of a distributed job) draws the same one, and the user's
random state is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils._pytree import tree_flatten

from ._strategy import evaluate

if TYPE_CHECKING:
    from ._plan import Call, Options

POINTS = 9
"""Evaluations per estimate (Moré and Wild use 7 to 9)."""
SPACING = 1e-6
"""The points' spacing, relative to ``max(|x|, typical)``: small enough that
smooth parts' high differences vanish below the noise, large enough to move x."""
SEED = 20110101


def ecnoise(values: torch.Tensor) -> torch.Tensor:
    """Per column of ``values`` (``POINTS`` rows, equally spaced along a line):
    the noise's standard deviation, NaN where no order qualifies (spacing too
    large or too small)."""
    f = values.to(torch.float64)
    fmin, fmax = f.amin(0), f.amax(0)
    too_wide = (fmax - fmin) > 0.1 * torch.maximum(fmax.abs(), fmin.abs())
    levels, signs = [], []
    gamma = 1.0
    d = f
    for j in range(1, POINTS):
        d = d[1:] - d[:-1]
        gamma *= 0.5 * j / (2 * j - 1)
        levels.append((gamma * d.pow(2).mean(0)).sqrt())
        signs.append(d.amin(0) * d.amax(0) < 0)
    flat = (f[1:] - f[:-1] == 0).sum(0) >= POINTS // 2
    result = torch.full_like(f[0], torch.nan)
    for k in range(POINTS - 4, -1, -1):  # the first qualifying order wins: go backwards
        window = torch.stack(levels[k : k + 3])
        ok = (window.amax(0) <= 4 * window.amin(0)) & signs[k]
        result = torch.where(ok, levels[k], result)
    # All differences zero: no noise above the values' resolution.
    result = torch.where(flat, torch.zeros_like(result), result)
    return torch.where(too_wide & ~flat, torch.full_like(result, torch.nan), result)


def relative_level(values: torch.Tensor) -> torch.Tensor:
    """The median relative noise over output elements (0-dim, float64); 0 if no
    element qualified."""
    sigma = ecnoise(values)
    center = values[POINTS // 2].to(torch.float64).abs()
    relative = torch.where(center > 0, sigma / center, torch.full_like(sigma, torch.nan))
    level = relative.nanmedian() if relative.numel() else relative.new_zeros(())
    return torch.where(torch.isnan(level), torch.zeros_like(level), level)


def _direction(primals: list[torch.Tensor], typical: list[Any]) -> list[torch.Tensor]:
    n = sum(p.numel() for p in primals)
    # The direction is a constant: drawn outside any vmap or grad around the call.
    with torch._C._DisableFuncTorch():
        generator = torch.Generator().manual_seed(SEED)
        u = torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1
    u = u / u.norm().clamp_min(1e-300)
    parts = torch.split(u, [p.numel() for p in primals])
    out = []
    for part, leaf, size in zip(parts, primals, typical):
        x = leaf.detach().reshape(-1)
        part = part.to(device=x.device, dtype=x.dtype)
        if size is None or isinstance(size, (int, float)):
            scale = x.abs().clamp_min(1.0 if size is None else float(size))
        else:
            scale = torch.maximum(x.abs(), size.detach().to(x).expand(leaf.shape).reshape(-1))
        out.append(part * scale * SPACING)
    return out


def _outputs(values: Any, has_aux: bool) -> torch.Tensor:
    out = values[0] if has_aux else values
    leaves = out if isinstance(out, torch.Tensor) else tree_flatten(out)[0]
    if isinstance(leaves, torch.Tensor):
        leaves = [leaves]
    flat = [v.detach().reshape(v.shape[0], -1) for v in leaves]
    real = [v.real if v.is_complex() else v for v in flat]
    return torch.cat(real, 1) if len(real) > 1 else real[0]


def estimate_for_call(call: Call, options: Options) -> float | torch.Tensor:
    """func's relative noise at the call's point, from ``POINTS`` evaluations: a
    float, or under ``vmap`` a 0-dim float64 tensor: each sample's own level."""
    from ._bounds import flat_bound

    if torch.compiler.is_compiling():
        raise ValueError(
            f"{options.name}(func, noise='estimate') does not compile: the estimate's "
            "seeded random direction needs a torch.Generator, which torch.compile cannot "
            "trace. Pass a float noise level instead, measured outside the compiled "
            "function, e.g. noise=jacfd.estimate_noise(func)(x)."
        )
    specs = call.plan.rule_specs
    steps = _direction(call.primals, specs.typical)
    leaves = []
    i = torch.arange(POINTS, dtype=torch.float64) - POINTS // 2
    for k, (leaf, step) in enumerate(zip(call.primals, steps)):
        x = leaf.detach().reshape(-1)
        if options.rule is not None and options.rule.bounds is not None:
            # Coordinates without room for the line's extent do not move.
            lo, hi = flat_bound(specs.lower[k], leaf), flat_bound(specs.upper[k], leaf)
            extent = step.abs() * (POINTS // 2)
            step = torch.where((hi - x >= extent) & (x - lo >= extent), step, 0 * step)
        offsets = i.to(device=x.device, dtype=x.dtype)
        points = x[None, :] + offsets[:, None] * step[None, :]
        leaves.append(points.reshape(POINTS, *leaf.shape))
    values = evaluate(
        options.strategy,
        call.at_point,
        leaves,
        [0] * len(leaves),
        POINTS,
        options.chunk_size,
        None,
        options.randomness,
        options.name,
    )
    level = relative_level(_outputs(values, options.has_aux))
    try:
        return float(level)
    except RuntimeError:  # under vmap: each sample's own level, kept a tensor
        return level


def estimate_noise(
    func: Callable[..., Any], argnums: int | tuple[int, ...] = 0, **options: Any
) -> Callable[..., float]:
    """The relative noise of ``func``'s values near the given arguments (ECnoise).

    This is the level ``noise="estimate"`` measures, from the same 9 evaluations
    along the same (seeded) random direction: it shows what a transform with
    ``noise="estimate"`` used. The level is the median over output elements of
    ``sigma / |f(x)|``, where ``sigma`` is the noise's standard deviation by
    Moré and Wild's ECnoise; 0 means no noise above the values' resolution
    was seen (as for a smooth function in its own dtype, whose rounding the
    default step already balances).

    Args:
        func: As in :func:`jacfd`.
        argnums: The arguments along which the points move, as in :func:`jacfd`.
        **options: :func:`jacfd`'s ``typical``, ``bounds``, ``strategy``,
            ``chunk_size``, ``randomness`` and ``has_aux``.

    Returns:
        A function taking ``func``'s arguments and returning the relative noise
            as a Python float (under ``vmap``, each sample's as a 0-dim tensor).

    Examples:
        >>> import torch
        >>> from jacfd import estimate_noise
        >>> x = torch.linspace(0.5, 1.5, 4, dtype=torch.float64)
        >>> noisy = lambda x: torch.sin(x.float()).double()  # float32 inside
        >>> 1e-9 < estimate_noise(noisy)(x) < 1e-6
        True
    """
    from ._contract import Contraction
    from ._plan import Planner, check_options
    from ._structure import Dense

    known = {"typical", "bounds", "strategy", "chunk_size", "randomness", "has_aux"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(
            f"estimate_noise(func, ...): unknown option(s) {unknown}; the options are "
            f"argnums and {sorted(known)}."
        )
    checked = check_options(
        "estimate_noise",
        func,
        argnums=argnums,
        delta=None,
        scheme="central",
        order=None,
        has_aux=options.get("has_aux", False),
        chunk_size=options.get("chunk_size"),
        randomness=options.get("randomness", "error"),
        strategy=options.get("strategy", "vmap"),
        typical=options.get("typical"),
        noise="estimate",
        bounds=options.get("bounds"),
    )
    # A plan needs a point set; none of its points is evaluated here.
    contraction = Contraction.of(checked.stencil, checked.stencil.shifted_offsets)
    planner = Planner(
        func,
        checked,
        lambda primals: Dense().points(
            checked, primals, checked.stencil.shifted_offsets, [contraction], True
        ),
    )

    def estimate(*args: Any, **kwargs: Any) -> float:
        call = planner.prepare(args, kwargs)
        if checked.rule is not None and checked.rule.bounds is not None:
            from ._bounds import check_inside

            check_inside("estimate_noise", call.primals, call.plan.rule_specs)
        level = estimate_for_call(call, checked)
        # (Under vmap, each sample's level as a 0-dim tensor.)
        return level if isinstance(level, float) else cast(float, level)

    return estimate
