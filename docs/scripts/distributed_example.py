"""A Jacobian shared among the ranks of a torch.distributed group.

Run with ``torchrun --nproc_per_node 2 docs/scripts/distributed_example.py`` (gloo on
CPU; with one GPU per rank, NCCL is used and each rank works on its own GPU). Every
rank calls ``jacfd`` with the same arguments and returns the whole Jacobian; each
evaluates only its share of the stencil points.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import jacfd


def simulate(params: torch.Tensor) -> torch.Tensor:
    """A stand-in for an expensive model: 64 steps of a small nonlinear map."""
    state = torch.ones(8, dtype=params.dtype, device=params.device)
    for _ in range(64):
        state = torch.tanh(state * params[:8] + params[8:])
    return state


def main() -> None:
    gpu = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    dist.init_process_group("nccl" if gpu else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if gpu else torch.device("cpu")
    if gpu:
        torch.cuda.set_device(device)
    params = torch.linspace(-1.0, 1.0, 16, dtype=torch.float64, device=device)

    shared = jacfd.jacfd(simulate, strategy="loop", process_group=dist.group.WORLD)(params)
    alone = jacfd.jacfd(simulate, strategy="loop")(params)  # for comparison only
    assert torch.equal(shared, alone), "the shared Jacobian differs from one process's"
    if rank == 0:
        shape = tuple(shared.shape)
        print(f"{dist.get_world_size()} ranks: Jacobian {shape}, equal to one process's")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
