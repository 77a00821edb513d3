"""Random numbers inside func: common random numbers, and detecting draws.

Finite differences of a random function are meaningful only if every stencil
point sees the same random numbers. ``torch.vmap(randomness="same")`` gives that
inside one call; across calls (a loop, chunks) the generator state is replayed.
The generators are process-wide, so both the replay and the detection must
also tell func's own draws from those of other threads.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
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
    """Common random numbers across calls of func, and a watch on the generators.

    The generator states at construction are the numbers every replayed call
    draws. A replayed call does not touch the process-wide generators, which
    other threads share: a thread-local dispatch mode hands func's random ops
    private generators, reset to those states before each call (see
    :meth:`replay`).
    """

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.cuda_indices = sorted({d.index or 0 for d in devices if d.type == "cuda"})
        start = _read_states(self.cuda_indices)
        self.starts: dict[torch.device, torch.Tensor] = {_CPU: start[0]}
        for index, state in zip(self.cuda_indices, start[1:]):
            self.starts[torch.device("cuda", index)] = state
        self.end: dict[torch.device, torch.Tensor] | None = None
        self.advanced = False

    @contextmanager
    def replay(self, where: str) -> Iterator[None]:
        """One call of func that draws the numbers of every other replayed call."""
        mode = _PrivateGenerators(self.starts)
        with mode:
            yield
        self.record_end({device: g.get_state() for device, g in mode.generators.items()}, where)

    @classmethod
    def replaying_from(cls, starts: dict[torch.device, torch.Tensor]) -> RandomState:
        """A state that replays ``starts`` (another process's, e.g. the caller of a
        worker) and leaves this process's generators alone."""
        state = cls.__new__(cls)
        state.cuda_indices = sorted(d.index or 0 for d in starts if d.type == "cuda")
        state.starts = dict(starts)
        state.end = None
        state.advanced = True
        return state

    def record_end(self, end: dict[torch.device, torch.Tensor], where: str) -> None:
        """Checks that a replayed call drew what the others drew, and moves the
        process-wide generators on once (see :meth:`replay`)."""
        if self.end is None:
            self.end = end
        elif end.keys() != self.end.keys() or not all(
            _same_state(state, self.end[device]) for device, state in end.items()
        ):
            raise RuntimeError(
                f"{where}(func, randomness='same'): func drew a different amount of random "
                "numbers at different stencil points, so they did not share their random "
                "numbers (data-dependent sampling, or a random op given its own generator). "
                "Make the draws independent of the input, or make func deterministic."
            )
        if not self.advanced:
            # Move the process-wide generators on as one call of func would, so
            # that the next transform draws new numbers; unless another thread
            # already moved them (then they are fresh anyway, and setting them
            # would rewind that thread).
            self.advanced = True
            for device, state in end.items():
                generator = _default_generator(device)
                if _same_state(generator.get_state(), self.starts[device]):
                    generator.set_state(state)


_CPU = torch.device("cpu")


def _read_states(cuda_indices: Sequence[int]) -> list[torch.Tensor]:
    """The CPU generator's state, then those of the CUDA devices ``cuda_indices``."""
    cpu = torch.default_generator.get_state()  # (torch.get_rng_state adds a wrapper)
    return [cpu, *(torch.cuda.get_rng_state(i) for i in cuda_indices)]


def _state_bytes(state: torch.Tensor) -> bytes:
    """A generator state's bytes: ``get_state()`` returns a fresh, contiguous CPU byte
    tensor, and comparing its bytes is 4x faster than ``torch.equal`` on the 5 KB
    of a CPU generator, which the default ``randomness="error"`` reads every call."""
    return ctypes.string_at(state.data_ptr(), state.nbytes)


def _same_state(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _state_bytes(a) == _state_bytes(b)


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (
        torch.cuda.default_generators[index] if device.type == "cuda" else torch.Generator(device)
    )


def _device_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    device = kwargs.get("device")
    return torch.device(device) if device is not None else _CPU


# Random ops without a generator argument that are a fill of a new tensor: the
# same numbers from a given generator (as their composite kernels draw them).
_LIKE_FILLS: dict[Any, Callable[..., Any]] = {
    torch.ops.aten.rand_like.default: lambda t, g: t.uniform_(0, 1, generator=g),
    torch.ops.aten.randn_like.default: lambda t, g: t.normal_(0, 1, generator=g),
}


class _PrivateGenerators(TorchDispatchMode):  # type: ignore[no-untyped-call]
    """Gives func's random ops, in this thread only, private generators that
    start from ``starts``: the process-wide ones are neither read nor moved, so
    other threads cannot take or change func's numbers."""

    def __init__(self, starts: dict[torch.device, torch.Tensor]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.starts = starts
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        generator = self.generators.get(device)
        if generator is None:
            if device not in self.starts:  # a device first seen now: its state from now
                self.starts[device] = _default_generator(device).get_state()
            generator = torch.Generator(device)
            generator.set_state(self.starts[device])
            self.generators[device] = generator
        return generator

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags or kwargs.get("generator"):
            return func(*args, **kwargs)  # (a generator of func's own is left alone)
        generator = self._generator(_device_of(args, kwargs))
        if any(a.name == "generator" for a in func._schema.arguments):
            return func(*args, **kwargs, generator=generator)
        packet, name = func.overloadpacket, func._overloadname
        with_generator = getattr(
            packet, "generator" if name == "default" else f"{name}_generator", None
        )
        if with_generator is not None:  # rand, randn, randint, randperm
            return with_generator(*args, **kwargs, generator=generator)
        if func in _LIKE_FILLS:
            return _LIKE_FILLS[func](torch.empty_like(*args, **kwargs), generator)
        if func is torch.ops.aten.randint_like.default:
            return torch.empty_like(args[0], **kwargs).random_(0, args[1], generator=generator)
        if func is torch.ops.aten.randint_like.low_dtype:
            return torch.empty_like(args[0], **kwargs).random_(
                args[1], args[2], generator=generator
            )
        # A fused kernel with no generator argument (CUDA dropout, attention):
        # lend it the private state through the process-wide generator.
        shared = _default_generator(generator.device)
        saved = shared.get_state()
        shared.set_state(generator.get_state())
        try:
            return func(*args, **kwargs)
        finally:
            generator.set_state(shared.get_state())
            shared.set_state(saved)


def draws_random_numbers(call: Callable[[], Any]) -> bool:
    """Whether ``call()`` runs a random op in this thread (it is run once more)."""
    watch = _PrivateGenerators({})  # func's draws, if any, leave the generators alone
    with watch:
        call()
    return bool(watch.generators)


def replaying(rng: RandomState | None, where: str) -> AbstractContextManager[None]:
    """:meth:`RandomState.replay`, or nothing without a state to replay."""
    return nullcontext() if rng is None else rng.replay(where)


def rng_for(
    randomness: Randomness, watches: bool, calls: int, leaves: Sequence[torch.Tensor]
) -> RandomState | GeneratorWatch | None:
    """The state to replay (``"same"`` over several calls) or the watch (a strategy
    that cannot detect random ops under ``"error"``), if any, for func evaluated
    on ``leaves``."""
    if randomness == "same" and calls > 1:
        return RandomState([leaf.device for leaf in leaves])
    if randomness == "error" and watches and not torch.compiler.is_compiling():
        return GeneratorWatch(cuda_indices_of(leaves))
    return None


def cuda_indices_of(leaves: Sequence[torch.Tensor]) -> Sequence[int]:
    """The CUDA devices that func evaluated on ``leaves`` may draw from."""
    return sorted({leaf.device.index or 0 for leaf in leaves if leaf.is_cuda})


class GeneratorWatch:
    """Tells whether the process-wide generators moved since it was made: the
    default ``randomness="error"`` reads them around every real-batch or loop
    evaluation, so this is kept to two reads of their bytes."""

    __slots__ = ("cuda_indices", "start")

    def __init__(self, cuda_indices: Sequence[int]) -> None:
        self.cuda_indices = cuda_indices
        self.start = generator_bytes(cuda_indices)

    def changed(self) -> bool:
        return generator_bytes(self.cuda_indices) != self.start


def generator_bytes(cuda_indices: Sequence[int]) -> bytes:
    """The bytes of the CPU generator's state and those of ``cuda_indices``."""
    if not cuda_indices:  # the CPU generator alone: one read, no list
        state = torch.default_generator.get_state()
        return ctypes.string_at(state.data_ptr(), state.nbytes)  # (see _state_bytes)
    return b"".join(map(_state_bytes, _read_states(cuda_indices)))
