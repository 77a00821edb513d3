"""Module state that func changes while it is evaluated at the stencil points.

A train-mode BatchNorm updates its running statistics on every forward pass:
evaluated once per stencil point, at perturbed inputs, it would leave them
moved by a whole stencil of fake batches. The modules func visibly uses (func
itself, the module of a bound method, those in a ``functools.partial`` or in
the closure or globals of a function) have their buffers kept and put back
after the transform, with a warning, so that a derivative never trains the
model. Buffers of modules func reaches some other way are not seen.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

Modules = tuple[torch.nn.Module, ...]


def modules_of(func: Callable[..., Any]) -> Modules:
    """The modules with buffers among those func visibly calls and their submodules
    (searched once per transform, two levels deep)."""
    found: dict[int, torch.nn.Module] = {}
    todo: list[tuple[object, int]] = [(func, 0)]
    while todo:
        obj, depth = todo.pop()
        if isinstance(obj, torch.nn.Module):
            found.setdefault(id(obj), obj)
            continue
        if depth >= 2:
            continue
        inner: list[object] = []
        if inspect.ismethod(obj):
            inner.append(obj.__self__)
        elif isinstance(obj, functools.partial):
            inner += [obj.func, *obj.args, *obj.keywords.values()]
        elif inspect.isfunction(obj):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    inner.append(cell.cell_contents)
            scope = obj.__globals__
            inner += [scope[name] for name in obj.__code__.co_names if name in scope]
        todo += [
            (o, depth + 1)
            for o in inner
            if isinstance(o, torch.nn.Module) or (callable(o) and not inspect.isclass(o))
        ]
    # Only the submodules that own buffers matter, found once: the per-call check
    # then costs nothing for the usual module without buffers.
    owners = {
        id(sub): sub
        for module in found.values()
        for sub in module.modules()
        if any(b is not None for b in sub._buffers.values())
    }
    return tuple(owners.values())


@contextlib.contextmanager
def kept_buffers(modules: tuple[torch.nn.Module, ...], where: str) -> Iterator[None]:
    """Puts back the buffers that func changed in place, and says so."""
    if not modules or torch.compiler.is_compiling():
        yield
        return
    buffers: dict[int, tuple[str, torch.Tensor]] = {}
    for module in modules:
        # Only modules in train mode update their buffers in forward (BatchNorm's
        # statistics): an eval-mode model costs a check, not a copy.
        if module.training:
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    buffers.setdefault(id(buffer), (f"{type(module).__name__}.{name}", buffer))
    if not buffers:
        yield
        return
    # Buffers are small (statistics, counters): a copy of each, and its version
    # to tell cheaply whether it was written.
    kept = [(name, b, b._version, b.clone()) for name, b in buffers.values()]
    try:
        yield
    finally:
        # Not every write bumps the version (batch_norm updates its running
        # statistics inside the kernel): compare the values too.
        changed = [
            (name, b, saved)
            for name, b, version, saved in kept
            if b._version != version or not _same(b, saved)
        ]
        with torch.no_grad():
            for _, buffer, saved in changed:
                buffer.copy_(saved)
    if changed:  # (only after a success: an error says enough)
        names = ", ".join(sorted({name for name, _, _ in changed}))
        warnings.warn(
            f"{where}(func): func updated module buffers in place ({names}), e.g. the "
            "running statistics of a train-mode BatchNorm, once per stencil point and at "
            "perturbed inputs; jacfd put them back as they were, so computing the "
            "derivative did not change the model. The derivative is that of the "
            "train-mode function (batch statistics). Call model.eval() to differentiate "
            "the inference function, and update the statistics with an ordinary forward "
            "pass.",
            stacklevel=5,
        )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool((a.isnan() & b.isnan() | (a == b)).all())
