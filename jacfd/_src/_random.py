"""Random numbers inside func: common random numbers, and detecting draws.

Finite differences of a random function are meaningful only if every stencil
point sees the same random numbers. ``torch.vmap(randomness="same")`` gives that
inside one call; across calls (a loop, chunks) the generator state is replayed.
The generators are process-wide, so both the replay and the detection must
also tell func's own draws from those of other threads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeAlias

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Randomness: TypeAlias = Literal["error", "same", "different"]
RANDOMNESS: tuple[str, ...] = ("error", "same", "different")

RANDOM_HINT = (
    "func draws random numbers. Pass randomness='same' so that every stencil point "
    "sees the same random numbers (common random numbers); with 'different' the "
    "differences are dominated by noise."
)


class RandomState:
    """The generator states of the CPU and of the CUDA devices func runs on."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.cuda_indices = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        self.start = self._read()
        self.end: list[torch.Tensor] | None = None

    def _read(self) -> list[torch.Tensor]:
        cpu = torch.default_generator.get_state()  # (torch.get_rng_state adds a wrapper)
        if not self.cuda_indices:
            return [cpu]
        return [cpu] + [torch.cuda.get_rng_state(i) for i in self.cuda_indices]

    def restore(self) -> None:
        """Back to the state at construction: the next call draws the same numbers."""
        torch.set_rng_state(self.start[0])
        for index, state in zip(self.cuda_indices, self.start[1:]):
            torch.cuda.set_rng_state(state, index)

    def changed(self) -> bool:
        now = self._read()
        return not all(torch.equal(a, b) for a, b in zip(now, self.start))

    def check_replayed(self, where: str) -> None:
        """After a replayed call: every call must end in the same state. If one
        does not, another thread drew numbers in between, and the points no
        longer share theirs."""
        end = self._read()
        if self.end is None:
            self.end = end
        elif not all(torch.equal(a, b) for a, b in zip(end, self.end)):
            raise RuntimeError(
                f"{where}(func, randomness='same'): the random number generator moved "
                "differently between stencil points, so they did not share their random "
                "numbers: another thread drew random numbers while func was evaluated, or "
                "func draws a data-dependent amount. Evaluate jacfd in one thread at a "
                "time (the generator is process-wide), or make func deterministic."
            )


class _SeededOps(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Sees, in this thread only, whether any op that draws random numbers runs."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.seen = False

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen = True
        return func(*args, **(kwargs or {}))


def draws_random_numbers(call: Callable[[], Any]) -> bool:
    """Whether ``call()`` runs a random op in this thread (it is run once more)."""
    watch = _SeededOps()
    state = RandomState([])
    try:
        with watch:
            call()
    finally:
        state.restore()
    return watch.seen


def rng_for(
    randomness: Randomness, watches: bool, calls: int, devices: Sequence[torch.device]
) -> RandomState | None:
    """The state to replay (``"same"`` over several calls) or to watch (a strategy
    that cannot detect random ops under ``"error"``), if any."""
    if randomness == "same" and calls > 1:
        return RandomState(devices)
    if randomness == "error" and watches and not torch.compiler.is_compiling():
        return RandomState(devices)
    return None
