"""The eager floor of a forward-difference Jacobian: jacfd's numerics in the fewest ops.

A hand-written pipeline with no options, no checks and no pytrees, doing what jacfd
does for one tensor argument and ``scheme="forward"``: the exactly representable
steps ``(x + h) - x``, the batch ``[x; x + h_j e_j]`` in one ``addcmul`` with a
pattern of offsets made beforehand, one call of ``f`` on the real batch, and
``(f(x + h_j e_j) - f(x)) / h_j`` in jacrev's layout. It is what ~8 eager kernels
cost: jacfd's time over this one is its engine's Python, and a target below it
needs fused kernels or a compiled pipeline, not less Python.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from jacfd._src._stencil import resolve_stencil


class ForwardFloor:
    """``ForwardFloor(f, x, delta)(x)``: the Jacobian of ``f`` at ``x`` (any shape),
    with the step ``delta``, or jacfd's automatic forward step when None."""

    def __init__(
        self, f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, delta: float | None
    ) -> None:
        n = x.numel()
        self.f, self.delta, self.shape = f, delta, x.shape
        forward = resolve_stencil("jacfd", "forward", None, 1)
        self.relative = forward.relative_step(torch.finfo(x.dtype).eps)  # jacfd's own rule
        self.pattern = torch.cat([torch.zeros(1, n, dtype=x.dtype), torch.eye(n, dtype=x.dtype)])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.detach().reshape(-1)  # the steps are constants for autograd
        if self.delta is None:
            h = torch.add(flat, flat.abs().clamp_min_(1.0), alpha=self.relative).sub_(flat)
        else:
            h = torch.add(flat, self.delta).sub_(flat)
        out = self.f(torch.addcmul(x.reshape(-1), self.pattern, h).view(-1, *self.shape))
        columns = torch.sub(out[1:], out[0]).div_(h.view(-1, *(1,) * (out.dim() - 1)))
        return columns.movedim(0, -1).reshape(*out.shape[1:], *self.shape)
