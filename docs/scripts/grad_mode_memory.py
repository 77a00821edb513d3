"""Memory that jacfd takes in grad mode, per ``chunk_size``: with and without
recomputing the chunks in backward.

Per-sample input Jacobians of a small CIFAR-size convolutional network (3x32x32
images, parameters requiring grad, as in training), then ``J.sum().backward()``.
For each batch size and ``chunk_size`` it prints:

- ``saved``: the bytes of the distinct storages that the autograd graph keeps for
  backward when jacfd returns (a saved-tensor hook; deterministic);
- ``peak``: the peak of the bytes held by live tensors during jacfd and backward,
  from the allocation events of ``torch.profiler`` (RSS is dominated by the
  allocator's caching);
- ``grad``: the largest difference between the parameter gradients with and
  without recomputation, relative to their largest entry.

Run: ``python docs/scripts/grad_mode_memory.py [--dtype float64] [--images 2,4,8]``.
Without recomputation the memory grows with the batch: 8 images take about 2 GB
in float32.
"""

from __future__ import annotations

import argparse
import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import jacfd
import jacfd._src._driver as driver

MB = 2**20


class _Saved:
    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def cifar_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    ).to(dtype)


def measure(
    model: nn.Module, x: torch.Tensor, chunk_size: int | None, recompute: bool
) -> tuple[float, float, list[torch.Tensor]]:
    """Saved and peak megabytes, and the parameter gradients of ``J.sum()``."""
    original = driver._can_recompute
    if not recompute:
        driver._can_recompute = lambda: False
    live: weakref.WeakSet[_Saved] = weakref.WeakSet()

    def pack(tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor)
        live.add(saved)
        return saved

    model.zero_grad()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
                J = jacfd.jacfd(model, chunk_size=chunk_size, batch_dim=0)(x)
            storages = {s.tensor.untyped_storage().data_ptr(): s.tensor for s in live}
            saved = sum(t.untyped_storage().nbytes() for t in storages.values())
            del storages
            J.sum().backward()
    finally:
        driver._can_recompute = original
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    )
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return saved / MB, peak / MB, grads


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max(t.abs().max().item() for t in b)
    return max((u - v).abs().max().item() for u, v in zip(a, b)) / scale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--images", default="2,4,8")
    parser.add_argument("--chunks", default="64,256,None")
    parser.add_argument("--old-up-to", type=int, default=8, help="most images run without")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    model = cifar_net(dtype)
    row: Callable[..., str] = "{:>6} {:>10} | {:>9.2f} {:>9.1f} | {:>9} {:>9} | {}".format
    print(f"{args.dtype}, MB:")
    header = "{:>6} {:>10} | {:>9} {:>9} | {:>9} {:>9} | {}"
    print(header.format("images", "chunk_size", "saved", "peak", "old saved", "old peak", "grad"))
    for images in map(int, args.images.split(",")):
        x = torch.randn(images, 3, 32, 32, dtype=dtype)
        for text in args.chunks.split(","):
            chunk = None if text == "None" else int(text)
            saved, peak, grads = measure(model, x, chunk, True)
            old = ("-", "-", "-")
            if images <= args.old_up_to and chunk is not None:
                old_saved, old_peak, old_grads = measure(model, x, chunk, False)
                old = (f"{old_saved:.2f}", f"{old_peak:.1f}", f"{relative(grads, old_grads):.0e}")
            print(row(images, text, saved, peak, *old))


if __name__ == "__main__":
    main()
