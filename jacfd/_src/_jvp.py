"""``jvpfd``: a directional derivative by finite differences, in ``torch.func.jvp`` form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ._bounds import OneSided, flat_bound
from ._contract import Contraction
from ._driver import run_points
from ._plan import Options, Planner, check_options
from ._random import Randomness
from ._rule import check_rule
from ._stencil import Scheme, get_stencil
from ._steps import match_delta
from ._strategy import Batched
from ._strategy import StrategyOption as Strategy
from ._structure import Dense
from ._workers import Workers


@overload
def jvpfd(
    func: Callable[..., Any],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    delta: float | None = None,
    scheme: Scheme = "central",
    order: int | None = None,
    has_aux: Literal[False] = False,
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
    workers: Workers = None,
    process_group: Any = None,
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> tuple[Any, Any]: ...


@overload
def jvpfd(
    func: Callable[..., Any],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    delta: float | None = None,
    scheme: Scheme = "central",
    order: int | None = None,
    has_aux: Literal[True],
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
    workers: Workers = None,
    process_group: Any = None,
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> tuple[Any, Any, Any]: ...


@overload
def jvpfd(
    func: Callable[..., Any],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    delta: float | None = None,
    scheme: Scheme = "central",
    order: int | None = None,
    has_aux: bool = False,
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
    workers: Workers = None,
    process_group: Any = None,
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> tuple[Any, ...]: ...


def jvpfd(
    func: Callable[..., Any],
    primals: tuple[Any, ...],
    tangents: tuple[Any, ...],
    *,
    delta: float | None = None,
    scheme: Scheme = "central",
    order: int | None = None,
    has_aux: bool = False,
    randomness: Randomness = "error",
    strategy: Strategy = "vmap",
    workers: Workers = None,
    process_group: Any = None,
    typical: Any = None,
    noise: float | str | None = None,
    bounds: Any = None,
) -> tuple[Any, ...]:
    """``(func(*primals), J @ tangents)`` by finite differences along ``tangents``.

    The derivative of ``t -> func(primals + t * tangents)`` at 0, from
    ``func(x)`` and one point (``"forward"``) or two (``"central"``) along the
    tangent, all in one vmap call. The automatic step is the scheme's relative
    step ``r`` scaled to the tangent: ``t = r * min_k max(1, |x_k|) / |v_k|``, so
    that every coordinate moves by at most ``r * max(1, |x_k|)`` and the one that
    limits the step by exactly that (coordinates that are NaN or infinite, or
    have a zero tangent, are ignored).

    Args:
        func: A function of the primals returning a tensor or a pytree of
            tensors (and ``aux`` if ``has_aux``).
        primals: The point: a tuple of arguments, each a floating tensor or a
            pytree of them, so that ``func(*primals)`` is valid.
        tangents: The direction: the same structure and shapes as ``primals``.
        delta: ``None`` (default) for the automatic step, or a positive float
            ``h``: the points are then ``primals + o * h * tangents``. A step
            that moves no element is refused.
        scheme: ``"central"`` (default), ``"forward"``, ``"backward"`` or
            ``"complex"`` (``Im func(x + i h v) / h``).
        order: The power of h in the truncation error, as in :func:`jacfd`.
        has_aux: ``func`` returns ``(output, aux)``; ``aux`` is taken at ``primals``.
        randomness: As in :func:`jacfd`.
        strategy: As in :func:`jacfd`.
        workers: As in :func:`jacfd`.
        process_group: As in :func:`jacfd`.
        typical: A positive float or a pytree like ``primals``: the automatic
            step uses ``max(|x_k|, typical_k)`` in place of ``max(1, |x_k|)``.
        noise: As in :func:`jacfd` (the estimate moves along the tangent).
        bounds: ``(lower, upper)``, each a float or a pytree like ``primals``:
            no point leaves them. The step along the tangent shrinks to the
            room, and a central stencil without room on one side becomes a
            one-sided one of the same order (at most 4).

    Returns:
        ``(output, tangent_out)``, or ``(output, tangent_out, aux)`` with
            ``has_aux``: ``output`` is ``func(*primals)`` exactly, ``tangent_out``
            has its structure, shapes and dtypes.

    Examples:
        >>> import torch
        >>> from jacfd import jvpfd
        >>> x = torch.tensor([1.0, 2.0], dtype=torch.float64)
        >>> v = torch.ones(2, dtype=torch.float64)
        >>> out, tangent_out = jvpfd(torch.sin, (x,), (v,))
        >>> torch.allclose(tangent_out, torch.cos(x))
        True
    """
    if not isinstance(primals, tuple):
        raise TypeError(
            f"jvpfd(func, primals, tangents): primals must be a tuple of arguments, got "
            f"{type(primals).__name__}; write jvpfd(f, (x,), (v,)) for one argument."
        )
    flat_primals, spec = tree_flatten(primals)
    flat_tangents, tangent_spec = tree_flatten(tangents)
    if tangent_spec != spec:
        raise ValueError(
            "jvpfd(func, primals, tangents): tangents must have the same structure as "
            f"primals.\n  primals:  {spec}\n  tangents: {tangent_spec}"
        )
    for p, v in zip(flat_primals, flat_tangents):
        if not (isinstance(p, torch.Tensor) and isinstance(v, torch.Tensor)):
            raise TypeError(
                "jvpfd(func, primals, tangents): primals and tangents must hold tensors, "
                f"got {type(p).__name__} and {type(v).__name__}."
            )
        if p.shape != v.shape:
            raise ValueError(
                f"jvpfd(func, primals, tangents): a tangent of shape {tuple(v.shape)} "
                f"does not match its primal of shape {tuple(p.shape)}."
            )
    if not flat_primals:
        raise ValueError("jvpfd(func, primals, tangents): primals hold no tensor.")

    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float))):
        raise TypeError(
            "jvpfd(func, primals, tangents, delta): delta must be None or a positive float "
            f"(the step along the tangent), got {type(delta).__name__}. Per-element steps "
            "have no meaning along one direction: scale the tangent instead."
        )
    for p, v in zip(flat_primals, flat_tangents):
        if not (p.dtype.is_floating_point and v.dtype.is_floating_point):
            raise TypeError(
                "jvpfd(func, primals, tangents): every primal and tangent must be a real "
                f"floating tensor, got dtypes {p.dtype} and {v.dtype}. Convert them, e.g. "
                "x.double()."
            )
    # Differentiate along the direction scaled so that s = 1 moves no coordinate
    # by more than max(1, |x_k|): the automatic step in s is then the scheme's
    # relative step, and every coordinate moves by at most its own relative step
    # (the one scaling by max|x| moved small coordinates far too far). The
    # coarsest input dtype sets the precision.
    dtype = flat_primals[0].dtype
    for p in flat_primals[1:]:  # (max with a key does not trace under torch.compile)
        if torch.finfo(p.dtype).eps > torch.finfo(dtype).eps:
            dtype = p.dtype
    typicals: list[Any] = [None] * len(flat_primals)
    if typical is not None:
        check_rule("jvpfd", typical, None, None, get_stencil("central"))
        typicals = match_delta("jvpfd", typical, flat_primals, spec, "typical")
    scale = _scale(flat_primals, flat_tangents, dtype, typicals)
    if delta is not None:
        scale = torch.ones_like(scale)
        _check_moves(delta, flat_primals, flat_tangents)

    along = _Along(func, flat_primals, flat_tangents, scale, spec)

    s_bounds = None
    if bounds is not None:
        s_bounds = _along_bounds(bounds, flat_primals, flat_tangents, spec, scale)
    options = check_options(
        "jvpfd",
        func,
        argnums=0,
        delta=delta,
        scheme=scheme,
        order=order,
        has_aux=has_aux,
        chunk_size=None,
        randomness=randomness,
        strategy=strategy,
        workers=workers,
        process_group=process_group,
        noise=noise,
        bounds=s_bounds,
    )
    if isinstance(options.strategy, Batched) and (
        options.strategy.dim != 0 or options.strategy.existing
    ):
        raise ValueError(
            "jvpfd(func, primals, tangents, strategy=Batched(...)): the points along the "
            "tangent are stacked along a new leading axis of every primal; use "
            "Batched(dim=0) (out_dim may differ)."
        )
    stencil = options.stencil
    s0 = torch.zeros((), dtype=dtype, device=flat_primals[0].device)
    if options.rule is not None:  # under vmap the steps may depend on the sample: so does s0
        s0 = torch.zeros_like(scale).to(dtype)

    def build(options: Options) -> Planner:
        offsets = options.stencil.shifted_offsets
        contraction = Contraction.of(options.stencil, offsets)
        # The centre is always evaluated: jvpfd returns func(*primals) itself.
        return Planner(
            along,
            options,
            lambda leaves: Dense().points(options, leaves, offsets, [contraction], True),
        )

    call = build(options).prepare((s0,), {})
    columns = run_points(call, options)
    one_sided = OneSided.of(options, build)
    if one_sided is not None:
        columns = one_sided.merge(call, columns, (s0,), {})
    center = columns.center
    if center is None:
        raise AssertionError("the centre point was not evaluated")
    out = tree_unflatten(center, columns.out_spec)
    if stencil.imaginary:  # the complex points carry complex values: f at the real point
        out = _real_value(func, primals, has_aux)
    derivative = tree_unflatten(
        [d[0] / scale.to(d.dtype) for d in columns.blocks[0]], columns.out_spec
    )
    return (out, derivative, columns.aux) if has_aux else (out, derivative)


@dataclass(frozen=True)
class _Along:
    """``s -> func(primals + s * scale * tangents)``: a class, not a closure, so that
    workers in other processes can be sent it."""

    func: Callable[..., Any]
    primals: list[torch.Tensor]
    tangents: list[torch.Tensor]
    scale: torch.Tensor
    spec: TreeSpec

    def __call__(self, s: torch.Tensor) -> Any:
        # Under strategy="batched", s is a batch of shifts: broadcast it along a
        # new leading axis of every primal.
        shift = s * self.scale
        point = [
            p + (shift.reshape(s.shape + (1,) * p.dim()) * v).to(_step_dtype(p.dtype, shift))
            for p, v in zip(self.primals, self.tangents)
        ]
        return self.func(*tree_unflatten(point, self.spec))


def _real_value(func: Callable[..., Any], primals: tuple[Any, ...], has_aux: bool) -> Any:
    result = func(*primals)
    return result[0] if has_aux else result


def _step_dtype(primal: torch.dtype, shift: torch.Tensor) -> torch.dtype:
    """The primal's dtype, made complex for the complex step's imaginary shift."""
    return torch.promote_types(primal, torch.complex64) if shift.is_complex() else primal


def _along_bounds(
    bounds: Any,
    primals: list[torch.Tensor],
    tangents: list[torch.Tensor],
    spec: Any,
    scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The interval of ``s`` for which ``primals + s * scale * tangents`` stays in
    ``bounds``: the bounds of the one coordinate jvpfd differentiates along."""
    rule = check_rule("jvpfd", None, None, bounds, get_stencil("central"))
    if rule is None or rule.bounds is None:
        raise AssertionError("bounds were given")
    lower, upper = rule.bounds
    lows = match_delta("jvpfd", lower, primals, spec, "bounds")
    highs = match_delta("jvpfd", upper, primals, spec, "bounds")
    s_lo = torch.full((), -torch.inf, dtype=scale.dtype, device=scale.device)
    s_hi = torch.full((), torch.inf, dtype=scale.dtype, device=scale.device)
    for p, v, lo, hi in zip(primals, tangents, lows, highs):
        x = p.detach().reshape(-1).to(scale.dtype)
        d = v.detach().reshape(-1).to(scale.dtype) * scale
        lo_t, hi_t = flat_bound(lo, p).to(x), flat_bound(hi, p).to(x)
        if not torch.compiler.is_compiling():
            outside = (x < lo_t) | (x > hi_t)
            try:
                bad = bool(outside.any())
            except RuntimeError:  # under vmap
                bad = False
            if bad:
                raise ValueError(
                    "jvpfd(func, primals, tangents, bounds): a primal is outside its bounds; "
                    "func is never evaluated outside them, so start inside."
                )
        moving = d != 0
        safe = torch.where(moving, d, torch.ones_like(d))
        a, b = (lo_t - x) / safe, (hi_t - x) / safe
        s_lo = torch.maximum(s_lo, torch.where(moving, torch.minimum(a, b), -torch.inf).amax())
        s_hi = torch.minimum(s_hi, torch.where(moving, torch.maximum(a, b), torch.inf).amin())
    # x + s * d is rounded: keep a few ulps inside.
    shrink = 1 - 8 * torch.finfo(scale.dtype).eps
    return s_lo * shrink, s_hi * shrink


def _scale(
    primals: list[torch.Tensor],
    tangents: list[torch.Tensor],
    dtype: torch.dtype,
    typicals: list[Any] | None = None,
) -> torch.Tensor:
    """``min_k max(1, |x_k|) / |v_k|`` over the coordinates with a finite, non-zero
    tangent at a finite point (1 if there are none), as a 0-dim tensor.

    A NaN or infinite coordinate must not spoil the step of all the others: only
    the outputs that depend on it may be NaN.
    """
    inf = torch.full((1,), torch.inf, dtype=dtype, device=primals[0].device)
    ratios = [inf]
    for k, (p, v) in enumerate(zip(primals, tangents)):
        x, t = p.detach().reshape(-1).to(dtype), v.detach().reshape(-1).to(dtype).abs()
        valid = torch.isfinite(x) & torch.isfinite(t) & (t > 0)
        size = None if typicals is None else typicals[k]
        if size is None or isinstance(size, (int, float)):
            magnitude = x.abs().clamp_min(1.0 if size is None else float(size))
        else:
            magnitude = torch.maximum(x.abs(), size.detach().to(x).expand(p.shape).reshape(-1))
        ratio = magnitude / torch.where(valid, t, torch.ones_like(t))
        ratios.append(torch.where(valid, ratio, torch.full_like(ratio, torch.inf)))
    scale = torch.cat(ratios).amin()
    return torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))


def _check_moves(delta: float, primals: list[torch.Tensor], tangents: list[torch.Tensor]) -> None:
    """Refuses a step that moves no coordinate with a non-zero tangent: the
    derivative would be exactly zero, whatever func is."""
    if torch.compiler.is_compiling():
        return
    anything, moved = False, False
    for p, v in zip(primals, tangents):
        x, t = p.detach(), v.detach()
        live = torch.isfinite(x) & (t != 0)
        point = x + (delta * t).to(x.dtype)
        try:
            anything = anything or bool(live.any())
            moved = moved or bool((live & (point != x)).any())
        except RuntimeError:  # under vmap: the values cannot be read
            return
    if anything and not moved:
        raise ValueError(
            f"jvpfd(func, primals, tangents, delta={delta!r}): the step moves no element "
            "of the primals (x + delta * v == x after rounding), so the derivative would "
            "be 0 whatever func is. Use a larger delta, a larger tangent, or delta=None "
            "for the automatic step."
        )
