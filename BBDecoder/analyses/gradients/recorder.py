"""The device-side record of gradient statistics: what to read, and where its numbers go.

A :class:`Plan` resolves a layer selection into the parameter tensors to read (each once,
under the deepest selected layer that owns it; tied parameters once, with their other
names kept); :class:`Recorder` appends one row per recorded iteration to a float32 device
buffer that doubles when full, without a host synchronisation, and reduces FSDP2 shards'
partial statistics once per save.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ...core import distributed
from ...core.layers import ROOT_NAME, Layer, Selector
from ...kernels import gradstats

_ROW_CAPACITY = 64


@dataclass
class Column:
    """One recorded parameter tensor."""

    index: int
    layer_id: int
    layer_name: str
    param: str
    numel: int
    parameter: nn.Parameter = field(repr=False)
    tied: tuple[str, ...] = ()  # other full names of the same tensor (tied weights), recorded once
    # FSDP2: process groups across which the gradient is split; each rank records its
    # shard's partial sums until save_collected_grads reduces them (empty: not split)
    shard_groups: tuple[Any, ...] = field(default=(), repr=False)

    @property
    def label(self) -> str:
        """``"3 layer1.0.conv1.weight"``: layer ID, then the parameter's full name."""
        if self.layer_name == ROOT_NAME:
            return f"{self.layer_id} {self.param}"
        return f"{self.layer_id} {self.layer_name}.{self.param}"


@dataclass
class Group:
    """Present gradients of one device and dtype, computed in one kernel call."""

    positions: list[int]
    dest: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)


@dataclass
class Plan:
    """A resolved selection: which parameters to read and where their numbers go."""

    params: list[nn.Parameter]
    columns: list[int]
    layout: int
    elements: int
    dtensors: bool = False  # some parameters are DTensors (FSDP2): read their local shards
    refresh: bool = False  # made between an FSDP2 forward and backward: make again after backward
    by_presence: dict[tuple[bool, ...], list[Group]] = field(default_factory=dict)

    def groups(self, grads: Sequence[torch.Tensor | None], present: tuple[bool, ...]) -> list[Group]:
        groups = self.by_presence.get(present)
        if groups is None:
            keyed: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for i, grad in enumerate(grads):
                if grad is not None:
                    keyed.setdefault((grad.device, grad.dtype), []).append(i)
            groups = [Group(positions) for positions in keyed.values()]
            self.by_presence[present] = groups
        return groups


class Recorder:
    """Device-side buffer of statistics, ``(rows, columns, 4)`` float32, NaN-filled.

    Column 0 is scratch (padding rows of the kernel land there); real tensors start at 1.
    A missing gradient leaves its cells NaN; a recorded one always has a finite
    non-finite count, which is how the two are told apart.
    """

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.rows = 0
        self.columns: list[Column] = []
        self._column_of: dict[tuple[int, str], int] = {}
        self.layouts: list[tuple[int, ...]] = []
        self._layout_of: dict[tuple[int, ...], int] = {}
        self.iterations: list[int] = []
        self.row_layout: list[int] = []
        self.row_scaled: list[bool] = []
        self.reduced = 0  # rows [0, reduced) hold statistics already reduced across shards

    # --------------------------------------------------------------- registry
    def column(self, layer: Layer, param: str, parameter: nn.Parameter, tied: tuple[str, ...] = ()) -> int:
        key = (layer.id, param)
        index = self._column_of.get(key)
        if index is None:
            index = len(self.columns) + 1
            # numel() of a DTensor is the full tensor's: mean |g| = L1 / all its elements
            column = Column(index, layer.id, layer.name, param, parameter.numel(), parameter, tied)
            column.shard_groups = distributed.shard_groups(parameter)
            self.columns.append(column)
            self._column_of[key] = index
        column = self.columns[index - 1]
        if column.parameter is not parameter:  # FSDP2 swaps sharded and unsharded parameter objects
            column.parameter = parameter
            column.shard_groups = distributed.shard_groups(parameter)
        return index

    def layout(self, columns: Sequence[int]) -> int:
        key = tuple(columns)
        if key not in self._layout_of:
            self._layout_of[key] = len(self.layouts)
            self.layouts.append(key)
        return self._layout_of[key]

    def by_index(self, index: int) -> Column:
        return self.columns[index - 1]

    # --------------------------------------------------------------- storage
    def _ensure(self, device: torch.device) -> torch.Tensor:
        """The buffer, with room for one more row and every registered column."""
        need_cols = len(self.columns) + 1
        data = self.data
        if data is not None and data.device != device:
            data = data.to(device)  # the model moved; happens once
            self.data = data
        if data is None or data.shape[0] <= self.rows or data.shape[1] < need_cols:
            rows = max(_ROW_CAPACITY, 1 if data is None else data.shape[0])
            while rows <= self.rows:
                rows *= 2
            cols = max(need_cols, 0 if data is None else data.shape[1])
            if data is not None and data.shape[1] < need_cols:
                cols = max(need_cols, 2 * data.shape[1])
            grown = torch.full((rows, cols, 4), math.nan, dtype=torch.float32, device=device)
            if data is not None and self.rows:
                grown[: self.rows, : data.shape[1]] = data[: self.rows]
            self.data = data = grown
        return data

    def record(self, iteration: int, plan: Plan, scale: torch.Tensor | None) -> None:
        """Read ``.grad`` of ``plan``'s parameters and append one row (no host sync)."""
        grads = [p.grad for p in plan.params]
        if plan.dtensors:  # FSDP2: this rank's shard; its partial sums are reduced at save time
            local = distributed.local_part
            grads = [g if g is None else local(g, p) for g, p in zip(grads, plan.params, strict=True)]
        present = tuple(g is not None for g in grads)
        blocks: list[torch.Tensor] = []
        dests: list[torch.Tensor] = []
        device: torch.device | None = self.data.device if self.data is not None else None
        for group in plan.groups(grads, present):
            stats, order = gradstats.grad_stats(
                [grads[i] for i in group.positions],  # type: ignore[misc]
                allow_empty=plan.dtensors,
                scale=scale,  # unscaled in float64 inside the kernel, before the float32 result
            )
            if device is None:
                device = stats.device
            elif stats.device != device:
                stats = stats.to(device, non_blocking=True)
            key = (tuple(order), device)
            dest = group.dest.get(key)
            if dest is None:
                cols = [plan.columns[group.positions[o]] if o >= 0 else 0 for o in order]
                dest = group.dest[key] = torch.tensor(cols, dtype=torch.long, device=device)
            blocks.append(stats)
            dests.append(dest)
        if blocks:
            data = self._ensure(device)  # type: ignore[arg-type]
            stats = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
            dest = dests[0] if len(dests) == 1 else torch.cat(dests)
            data[self.rows].index_copy_(0, dest, stats)
        elif self.data is None or self.data.shape[0] <= self.rows:
            self._ensure(torch.device("cpu") if self.data is None else self.data.device)
        self.iterations.append(iteration)
        self.row_layout.append(plan.layout)
        self.row_scaled.append(scale is not None)
        self.rows += 1

    def reduce_shards(self) -> None:
        """Turn the per-shard partial statistics of rows not yet reduced into whole-tensor ones.

        For every column split across ranks: L1 and the non-finite count are summed, L2 is
        the root of the summed squares, max |g| the maximum; one SUM and one MAX all-reduce
        per set of process groups (one set under FSDP2), over all those columns at once.
        A NaN in any shard makes L1 NaN, and then max |g| NaN too, as ``amax`` would; a
        missing gradient (NaN cells) stays missing. Every rank must call it.
        """
        start, stop = self.reduced, self.rows
        self.reduced = stop
        if self.data is None or stop <= start:
            return
        data = self._ensure(self.data.device)  # room for every registered column
        by_groups: dict[tuple[int, ...], tuple[tuple[Any, ...], list[int]]] = {}
        for column in self.columns:  # column order is the same on every rank
            if column.shard_groups:
                key = tuple(id(group) for group in column.shard_groups)
                by_groups.setdefault(key, (column.shard_groups, []))[1].append(column.index)
        rows = data[start:stop]
        for groups, indices in by_groups.values():
            where = torch.tensor(indices, dtype=torch.long, device=data.device)
            part = rows.index_select(1, where)  # (rows, columns, 4): this shard's statistics
            part = part.double()  # squares of a large shard L2 overflow float32; sums are exact in float64
            sums = torch.stack([part[..., 0], part[..., 1].square(), part[..., 3]], dim=-1).contiguous()
            top = part[..., 2].nan_to_num(nan=math.inf, posinf=math.inf)  # MAX of NaN is backend-defined: see below
            distributed.all_reduce_sum_max(sums, top, groups)
            l1 = sums[..., 0]
            whole = torch.stack([l1, sums[..., 1].sqrt(), torch.where(torch.isnan(l1), l1, top), sums[..., 2]], dim=-1)
            rows.index_copy_(1, where, whole.to(rows.dtype))

    def signature(self) -> list[int]:
        """Integers that agree on every rank that recorded the same steps (checked before reducing)."""
        sharded = ";".join(f"{c.index}:{c.layer_id}:{c.param}" for c in self.columns if c.shard_groups)
        return [
            self.rows,
            self.reduced,
            zlib.crc32(np.asarray(self.iterations, dtype=np.int64).tobytes()),
            zlib.crc32(np.asarray(self.row_layout, dtype=np.int64).tobytes()),
            zlib.crc32(sharded.encode("utf-8")),
        ]

    def take(self) -> np.ndarray:
        """The recorded rows as a float64 host array (the one sync per save)."""
        if self.data is None or not self.rows:
            return np.zeros((0, len(self.columns) + 1, 4))
        host = self.data[: self.rows].cpu().numpy().astype(np.float64)
        if host.shape[1] < len(self.columns) + 1:
            pad = np.full((host.shape[0], len(self.columns) + 1 - host.shape[1], 4), np.nan)
            host = np.concatenate([host, pad], axis=1)
        return host

    def clear(self) -> None:
        if self.data is not None and self.rows:
            self.data[: self.rows].fill_(math.nan)
        self.rows = 0
        self.reduced = 0
        self.iterations.clear()
        self.row_layout.clear()
        self.row_scaled.clear()


def selection_key(layer_inds: Selector, bias: bool) -> Any:
    """A cache key that tells ``5`` from ``5.0``, ``True`` and ``[5]`` apart (``None``: do not cache)."""
    items = layer_inds if isinstance(layer_inds, (list, tuple)) else (layer_inds,)
    key = (type(layer_inds).__name__, tuple((type(item).__name__, item) for item in items), bias)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def scale_of(scaler: Any) -> torch.Tensor | None:
    """The scaler's current scale as a device tensor (``GradScaler.get_scale`` would sync)."""
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)
