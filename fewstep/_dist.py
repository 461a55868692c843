"""The few ``torch.distributed`` helpers shared by evaluation and distillation."""

from __future__ import annotations

import os

__all__ = ["launched_distributed", "rank_world", "maybe_init_distributed", "barrier"]


def launched_distributed() -> bool:
    """Whether a launcher (``torchrun``, ``accelerate launch --multi_gpu``) started several
    processes (``WORLD_SIZE > 1``), whether or not the process group exists yet."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the default process group (gloo, or nccl when CUDA is
    available) if a launcher set ``WORLD_SIZE > 1`` and nobody initialised it yet.
    (``accelerate launch --cpu`` starts one process; its multi-CPU mode goes through MPI, whose
    state ``accelerate.PartialState()`` initialises: call that first.)"""
    import torch
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized() and launched_distributed():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_world()


def barrier() -> None:
    """``dist.barrier()`` when several processes share an initialised group; otherwise nothing."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()
