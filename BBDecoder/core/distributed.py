"""Rank helpers: the one place that asks torch.distributed anything."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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


def _dtensor_type() -> type | None:
    """``DTensor`` if its module is loaded (no DTensor can exist otherwise; importing it costs 0.5 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and gradients)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def shard_groups(tensor: object) -> tuple[Any, ...]:
    """Process groups across which ``tensor``'s elements are split (empty: this rank holds them all).

    A DTensor is split along every mesh dimension whose placement is a shard (``Shard``,
    strided shards); a ``Replicate`` dimension holds copies and a ``Partial`` one pending
    sums, neither of which splits the elements. FSDP2 gives ``(the FSDP group,)``, HSDP the
    shard group only.
    """
    if not is_dtensor(tensor):
        return ()
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    return tuple(
        mesh.get_group(dim)
        for dim, placement in enumerate(tensor.placements)  # type: ignore[attr-defined]
        if not (placement.is_replicate() or placement.is_partial())
    )


def local_part(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``grad`` laid out as the parameter ``like`` (a plain tensor: itself).

    An FSDP2 gradient is sharded like its parameter and this is its local shard, without
    communication. A gradient placed differently (a ``Partial`` pending sum) is first
    redistributed to the parameter's placements: a collective, which every rank reaches
    because every rank records the same tensors.
    """
    if not is_dtensor(grad):
        return grad
    if is_dtensor(like) and tuple(grad.placements) != tuple(like.placements):  # type: ignore[attr-defined]
        grad = grad.redistribute(like.device_mesh, like.placements)  # type: ignore[attr-defined]
    return grad.to_local()  # type: ignore[attr-defined]


def is_sharded(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is split across ranks (FSDP2's ``fully_shard``)."""
    return _dtensor_type() is not None and any(shard_groups(p) for p in module.parameters())


def user_class(module: nn.Module) -> type:
    """The class the user wrote: ``fully_shard`` swaps in ``FSDP<Name>(FSDPModule, <Name>)``."""
    cls = type(module)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == f"FSDP{bases[1].__name__}":
        return bases[1]
    return cls


def all_reduce_sum_max(sums: torch.Tensor, maxima: torch.Tensor, groups: Sequence[Any] = ()) -> None:
    """In place: ``sums`` summed and ``maxima`` maximised across the ranks of ``groups``.

    One SUM and one MAX all-reduce per group (all ranks when ``groups`` is empty); over
    several groups (the shard dimensions of a mesh) the reductions compose to the whole.
    """
    if world_size() == 1:
        return
    for group in groups or (None,):
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)


def spread(values: Sequence[int], device: torch.device | str = "cpu") -> tuple[list[int], list[int]]:
    """The smallest and largest of each integer across all ranks (one MAX all-reduce).

    Every rank gets the same answer, so a check ``low != high`` takes the same branch on
    all of them (an error raised everywhere instead of a hang in the next collective).
    """
    if world_size() == 1:
        return list(values), list(values)
    both = torch.tensor([*values, *(-v for v in values)], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    found = both.tolist()
    count = len(values)
    return [-v for v in found[count:]], found[:count]


def uses_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule was given to FSDP2's ``fully_shard``."""
    if "torch.distributed.fsdp" not in sys.modules:  # fully_shard was never imported
        return False
    return any(user_class(m) is not type(m) for m in module.modules())


def reshard_fsdp(module: nn.Module) -> None:
    """Put back the sharded parameters of every FSDP2 module in ``module`` (``FSDPModule.reshard``)."""
    if "torch.distributed.fsdp" not in sys.modules:  # fully_shard was never imported
        return
    for submodule in module.modules():
        if user_class(submodule) is not type(submodule):
            submodule.reshard()  # type: ignore[operator]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: an FSDP2 ``DTensor`` is gathered (a collective every rank must join)."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]
