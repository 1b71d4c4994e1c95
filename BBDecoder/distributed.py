"""Rank helpers: the one place that asks torch.distributed anything."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without torch.distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0: the only rank that writes files or prints."""
    return rank() == 0


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` across ranks (a no-op in a single process)."""
    if world_size() == 1:
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / world_size()


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Return rank 0's ``tensor`` on every rank (shapes must agree)."""
    if world_size() == 1:
        return tensor
    shared = tensor.detach().clone().contiguous()
    dist.broadcast(shared, src=0)
    return shared
