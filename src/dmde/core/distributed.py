"""Training past one machine with torch.distributed (launched by ``torchrun``).

Two patterns: the experts of a mixture are independent, so they are spread over the ranks
(:func:`my_share`), each rank training and checkpointing its own; the models that see all the
classes (flat baseline, end-to-end fine-tuning) are trained data-parallel: every rank takes a
slice of each global batch and the gradients are averaged (:func:`average_gradients`).
gloo on CPU, NCCL on GPU (rank r on the GPU ``LOCAL_RANK``: :func:`local_device`).
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from dmde.core.errors import DmdeValueError
from dmde.core.threads import default_threads


def dist_context() -> tuple[int, int]:
    """(rank, world_size) from torchrun's environment; initialises the process group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":  # each rank its own GPU, before NCCL picks one for it
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend=backend)
        if not os.environ.get("DMDE_THREADS"):  # share the cores between the ranks on this machine

            torch.set_num_threads(default_threads(local_world=int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """This process's accelerator: ``cuda:LOCAL_RANK`` under torchrun with CUDA (one GPU per rank on
    each machine), ``cuda`` without torchrun, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return torch.device("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank >= torch.cuda.device_count():
        raise DmdeValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                             "start at most one process per GPU (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def my_share(items: Sequence[int], rank: int, world: int) -> list[int]:
    """Experts are spread round-robin over the ranks: rank r trains items r, r+P, r+2P, ..."""
    return [it for k, it in enumerate(items) if k % world == rank]


def average_gradients(params: Iterable[torch.nn.Parameter], world: int) -> None:
    """All-reduce (mean) every gradient: data-parallel SGD without wrapping the model, so any
    loss that reaches into the model's parts (the mixture's experts, heads, N-way layer) works."""
    for p in params:
        if not p.requires_grad:
            continue
        if p.grad is None:  # unused on this rank: still take part in the collective
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)
