"""Per-layer gradient statistics (issue: gradient analysis).

``backward_propagation`` runs ``loss.backward()`` and then, for the parameter tensors of
the selected layers, records five numbers per tensor: mean |g|, max |g|, L1 and L2 norm,
and the count of non-finite entries. The numbers stay on the gradients' device in a
preallocated buffer that doubles when full; nothing in the call waits for the device.
``save_collected_grads`` moves an epoch's buffer to the host once, writes the gradient-flow
chart, the norm curves, a CSV of every number, the cross-epoch heatmap and an alerts
summary, then clears the buffer.

Ownership with ``depth > 1``: a parameter belongs to several nested layers (``layer1``
and ``layer1.0``). It is recorded once, under the deepest *selected* layer that owns it,
with its name relative to that layer; selecting ``layer1`` alone records
``layer1``/``0.conv1.weight``, selecting both records ``layer1.0``/``conv1.weight``.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...core import distributed
from ...core.layers import ROOT_NAME, Layer, Selector, is_lazy
from ...errors import (
    BBDecoderTypeError,
    BBDecoderValueError,
    BBDecoderWarning,
    GradientAlertWarning,
    LayerSelectionError,
)
from ...kernels import gradstats
from .._base import AnalyzerBase

CSV_HEADER = ("epoch", "iteration", "layer_id", "layer_name", "param", "mean_abs", "max_abs", "l1", "l2", "nonfinite")
SECTION = "gradients"
_BACKWARD_KEYWORDS = ("gradient", "retain_graph", "create_graph", "inputs")
_ROW_CAPACITY = 64
_PANELS_PER_PAGE = 24


# ------------------------------------------------------------------------ bookkeeping
@dataclass
class _Column:
    """One recorded parameter tensor."""

    index: int
    layer_id: int
    layer_name: str
    param: str
    numel: int
    parameter: nn.Parameter = field(repr=False)
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
class _Group:
    """Present gradients of one device and dtype, computed in one kernel call."""

    positions: list[int]
    dest: dict[tuple[Any, ...], torch.Tensor] = field(default_factory=dict)


@dataclass
class _Plan:
    """A resolved selection: which parameters to read and where their numbers go."""

    params: list[nn.Parameter]
    columns: list[int]
    layout: int
    elements: int
    dtensors: bool = False  # some parameters are DTensors (FSDP2): read their local shards
    refresh: bool = False  # made between an FSDP2 forward and backward: make again after backward
    by_presence: dict[tuple[bool, ...], list[_Group]] = field(default_factory=dict)

    def groups(self, grads: Sequence[torch.Tensor | None], present: tuple[bool, ...]) -> list[_Group]:
        groups = self.by_presence.get(present)
        if groups is None:
            keyed: dict[tuple[torch.device, torch.dtype], list[int]] = {}
            for i, grad in enumerate(grads):
                if grad is not None:
                    keyed.setdefault((grad.device, grad.dtype), []).append(i)
            groups = [_Group(positions) for positions in keyed.values()]
            self.by_presence[present] = groups
        return groups


class _Recorder:
    """Device-side buffer of statistics, ``(rows, columns, 4)`` float32, NaN-filled.

    Column 0 is scratch (padding rows of the kernel land there); real tensors start at 1.
    A missing gradient leaves its cells NaN; a recorded one always has a finite
    non-finite count, which is how the two are told apart.
    """

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.rows = 0
        self.columns: list[_Column] = []
        self._column_of: dict[tuple[int, str], int] = {}
        self.layouts: list[tuple[int, ...]] = []
        self._layout_of: dict[tuple[int, ...], int] = {}
        self.iterations: list[int] = []
        self.row_layout: list[int] = []
        self.row_scaled: list[bool] = []
        self.reduced = 0  # rows [0, reduced) hold statistics already reduced across shards

    # --------------------------------------------------------------- registry
    def column(self, layer: Layer, param: str, parameter: nn.Parameter) -> int:
        key = (layer.id, param)
        index = self._column_of.get(key)
        if index is None:
            index = len(self.columns) + 1
            # numel() of a DTensor is the full tensor's: mean |g| = L1 / all its elements
            column = _Column(index, layer.id, layer.name, param, parameter.numel(), parameter)
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

    def by_index(self, index: int) -> _Column:
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

    def record(self, iteration: int, plan: _Plan, scale: torch.Tensor | None) -> None:
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
            flats = [gradstats.flat(grads[i].detach()) for i in group.positions]  # type: ignore[union-attr]
            stats, order = gradstats.grad_stats(flats, allow_empty=plan.dtensors)
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
            if scale is not None:
                stats[:, :3].div_(scale.to(stats.device, non_blocking=True))
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
            sums = torch.stack([part[..., 0], part[..., 1].square(), part[..., 3]], dim=-1).contiguous()
            top = part[..., 2].nan_to_num(nan=math.inf, posinf=math.inf)  # MAX of NaN is backend-defined: see below
            distributed.all_reduce_sum_max(sums, top, groups)
            l1 = sums[..., 0]
            whole = torch.stack([l1, sums[..., 1].sqrt(), torch.where(torch.isnan(l1), l1, top), sums[..., 2]], dim=-1)
            rows.index_copy_(1, where, whole)

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


@dataclass
class _GradientState:
    recorder: _Recorder = field(default_factory=_Recorder)
    plans: dict[Any, _Plan] = field(default_factory=dict)
    calls: int = 0
    announced: bool = False
    alerts: list[dict[str, Any]] = field(default_factory=list)
    warned: set[tuple[str, int, str]] = field(default_factory=set)
    first_nonfinite: dict[int, int] = field(default_factory=dict)
    # cross-epoch per-layer L2: (epoch, iterations, {(layer_id, layer_name): values})
    history: list[tuple[int, np.ndarray, dict[tuple[int, str], np.ndarray]]] = field(default_factory=list)


@dataclass
class _Epoch:
    """One epoch's numbers on the host, ready for tables and figures."""

    epoch: int
    iterations: np.ndarray  # (R,)
    columns: list[_Column]  # recorded this epoch, in column order
    values: np.ndarray  # (R, C, 4): l1, l2, max_abs, nonfinite (NaN: missing)
    recorded: np.ndarray  # (R, C) bool: the column was selected at that row
    skipped: np.ndarray  # (R,) bool: a GradScaler will skip this step

    @property
    def mean_abs(self) -> np.ndarray:
        numel = np.array([c.numel for c in self.columns], dtype=np.float64)
        return self.values[:, :, 0] / numel

    @property
    def present(self) -> np.ndarray:
        return self.recorded & ~np.isnan(self.values[:, :, 3])

    @property
    def nonfinite_rows(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return self.present & (self.values[:, :, 3] > 0)


# ----------------------------------------------------------------------------- mixin
class GradientMixin(AnalyzerBase):
    """``backward_propagation``, ``save_collected_grads`` and ``gradient_alerts``."""

    include_bias: bool
    vanish_threshold: float
    explode_threshold: float

    def _init_gradients(
        self,
        *,
        include_bias: bool = False,
        vanish_threshold: float = 1e-8,
        explode_threshold: float = 1e3,
    ) -> None:
        self.include_bias = _check_flag(include_bias, "include_bias")
        self.vanish_threshold = _check_threshold(vanish_threshold, "vanish_threshold")
        self.explode_threshold = _check_threshold(explode_threshold, "explode_threshold")
        if self.explode_threshold <= self.vanish_threshold:
            raise BBDecoderValueError(
                f"explode_threshold must be above vanish_threshold, got explode_threshold={explode_threshold!r} "
                f"and vanish_threshold={vanish_threshold!r}"
            )
        self._grads = _GradientState()

    # ------------------------------------------------------------- collecting
    def backward_propagation(
        self,
        loss: torch.Tensor,
        collect_grads: bool = False,
        layer_inds: Selector = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        collect_every: int = 1,
        include_bias: bool | None = None,
        **backward_kwargs: Any,
    ) -> None:
        """Run ``loss.backward(**backward_kwargs)``; optionally record gradient statistics.

        With ``collect_grads`` the statistics of every parameter tensor of the selected
        layers are appended to this epoch's buffer on the gradients' device: mean |g|,
        max |g|, L1, L2 and the number of non-finite entries. A tensor without a gradient
        (frozen, unused) is recorded as missing (NaN). Nothing here waits for the device.
        ``.grad`` holds the sum over every backward call since the last ``zero_grad``, so
        with gradient accumulation the numbers describe the accumulated gradient.

        Args:
            loss: the scalar to backpropagate.
            collect_grads: record statistics for this call.
            layer_inds: layer IDs, dotted names, or a list of them; ``None``: all layers.
            scaler: a ``torch.amp.GradScaler``: the loss is scaled for backward and the
                statistics are of the unscaled gradients; a step whose gradients hold
                inf/NaN (which the scaler will skip) is marked skipped.
            collect_every: record only every k-th call (calls ``0, k, 2k…``).
            include_bias: also record biases (default: the constructor's choice).
            **backward_kwargs: passed to ``loss.backward`` (``retain_graph``,
                ``create_graph``, ``inputs``, ``gradient``).

        Raises:
            BBDecoderTypeError: ``loss`` is not a tensor, a flag is not a bool, an unknown
                keyword, or ``scaler`` is not a ``GradScaler``.
            BBDecoderValueError: ``loss`` does not require grad, is not a scalar, or
                ``collect_every`` is below 1.
            LayerSelectionError: ``layer_inds`` selects no parameter tensor.
        """
        _check_loss(loss, backward_kwargs)
        collect = _check_flag(collect_grads, "collect_grads")
        every = _check_every(collect_every)
        bias = self.include_bias if include_bias is None else _check_flag(include_bias, "include_bias")
        _check_scaler(scaler)
        plan = self._gradient_plan(layer_inds, bias) if collect else None  # checked before the backward pass
        if scaler is not None:
            scaler.scale(loss).backward(**backward_kwargs)
        else:
            loss.backward(**backward_kwargs)
        if collect:
            self._collect(layer_inds, bias, scaler, every, plan)
        else:
            self._grads.calls += 1

    def collect_grads(
        self,
        layer_inds: Selector = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        collect_every: int = 1,
        include_bias: bool | None = None,
    ) -> None:
        """Record the statistics of the current ``.grad`` values, whoever ran backward.

        For training loops that do not call :meth:`backward_propagation`: after
        ``accelerator.backward(loss)``, inside a Lightning or Hugging Face callback, in an
        optimizer closure. It records exactly what ``backward_propagation(loss,
        collect_grads=True, ...)`` records after its backward pass: the same buffer, the same
        iteration counter (one per call), and nothing that waits for the device.

        Args:
            layer_inds: layer IDs, dotted names, or a list of them; ``None``: all layers,
                and the parameters the root module owns itself (a ViT's ``cls_token``).
            scaler: the ``torch.amp.GradScaler`` whose scaled gradients ``.grad`` holds
                (before ``scaler.unscale_``); the statistics are unscaled by its scale.
                Leave it ``None`` once the gradients are unscaled.
            collect_every: record only every k-th call (calls ``0, k, 2k…``).
            include_bias: also record biases (default: the constructor's choice).

        Raises:
            BBDecoderTypeError: a flag is not a bool, or ``scaler`` is not a ``GradScaler``.
            BBDecoderValueError: ``collect_every`` is below 1.
            LayerSelectionError: ``layer_inds`` selects no parameter tensor.
        """
        every = _check_every(collect_every)
        bias = self.include_bias if include_bias is None else _check_flag(include_bias, "include_bias")
        _check_scaler(scaler)
        self._collect(layer_inds, bias, scaler, every, None)

    def _collect(
        self,
        layer_inds: Selector,
        bias: bool,
        scaler: torch.amp.GradScaler | None,
        every: int,
        plan: _Plan | None,
    ) -> None:
        """Count one iteration and, on every ``every``-th, append the ``.grad`` statistics."""
        state = self._grads
        iteration = state.calls
        state.calls += 1
        if plan is None or plan.refresh:  # FSDP2: the sharded parameters are back in place after backward
            plan = self._gradient_plan(layer_inds, bias, after_backward=True)
        if iteration % every:
            return
        if not state.announced and gradstats.needs_compile(plan.params[0].device, plan.elements):
            state.announced = True
            self._say(
                "BBDecoder: compiling the gradient-statistics kernel with torch.compile (once per process; "
                "set BBDECODER_GRAD_BACKEND=eager to skip)"
            )
        with torch.no_grad():
            state.recorder.record(iteration, plan, _scale_of(scaler))

    def _gradient_plan(self, layer_inds: Selector, bias: bool, *, after_backward: bool = False) -> _Plan:
        """The parameters to read for ``layer_inds`` (checked, and cached per selection).

        Between forward and backward FSDP2 puts unsharded parameters in the modules (for
        the root, or any group not resharded after forward); their ``.grad`` stays
        ``None``. A plan made then is marked ``refresh`` and made again once after the
        backward pass, when the sharded parameters, which receive the gradients, are back.
        """
        state = self._grads
        key = _selection_key(layer_inds, bias)
        plan = state.plans.get(key) if key is not None else None
        if plan is not None and not (after_backward and plan.refresh):
            return plan
        layers = self._select(layer_inds, "layer_inds", default_all=True)
        if layer_inds is None and self.layers.root_own is not None:
            layers.append(self.layers.root_own)  # parameters the root module owns itself (a ViT's cls_token)
        entries = _owned_parameters(layers, bias)
        if not entries:
            names = ", ".join(f"{layer.id} {layer.name!r} ({layer.type})" for layer in layers[:6])
            raise LayerSelectionError(
                f"layer_inds={layer_inds!r} selects no parameter tensor to record "
                f"(include_bias={bias}); selected: {names}"
            )
        recorder = state.recorder
        columns = [recorder.column(layer, name, param) for layer, name, param in entries]
        params = [param for _, _, param in entries]
        plan = _Plan(
            params,
            columns,
            recorder.layout(columns),
            sum(p.numel() for p in params),
            dtensors=any(distributed.is_dtensor(p) for p in params),
            refresh=not after_backward and distributed.uses_fsdp(self.inner),
        )
        if key is not None:
            if len(state.plans) > 64:
                state.plans.clear()
            state.plans[key] = plan
        return plan

    # ----------------------------------------------------------------- saving
    def save_collected_grads(self, ep: int, save_folder: str | os.PathLike[str] | None = None) -> list[Path]:
        """Write the epoch's gradient figures and numbers, then clear the epoch's buffer.

        Files (under ``save_path/gradients/`` unless ``save_folder``), each named
        ``epoch_<ep>_…``: ``flow.png`` (mean and max |g| per tensor, log axis),
        ``norms.png`` (L1/L2 per layer over the iterations; several pages for many
        layers), ``grads.csv`` (every number), ``heatmap.png`` + ``heatmap.npz`` (per-layer
        L2 over all epochs so far) and ``alerts.json`` (alerts, skipped steps and the
        per-tensor epoch summary behind the flow chart). Earlier files are never replaced.

        Alerts (first NaN/Inf per tensor, mean |g| below ``vanish_threshold`` on average,
        or above ``explode_threshold``) are warned once each with
        :class:`GradientAlertWarning`.

        Under ``torch.distributed`` only rank 0 writes, and every rank keeps the same
        numbers and alerts. With DDP the gradients are already whole on every rank, so
        calling this on rank 0 alone is fine. With FSDP2 (``fully_shard``) each rank holds
        statistics of its shards, reduced here across ranks (L1 and non-finite counts
        summed, L2 from the summed squares, max by maximum): every rank must call it.

        Args:
            ep: the epoch number, used in file names (a non-negative int).
            save_folder: a folder inside ``save_path`` (relative to it, or absolute).

        Returns:
            The paths written (empty when nothing was collected, with a warning, and on
            ranks other than 0).

        Raises:
            BBDecoderTypeError: ``ep`` is not an int or ``save_folder`` not a path.
            BBDecoderValueError: ``ep`` is negative, or (FSDP2) the ranks recorded
                different steps.
            SavePathError: ``save_folder`` lies outside ``save_path``.
        """
        epoch = _check_epoch(ep)
        folder = self.store.subfolder(save_folder, "save_folder", default=SECTION)
        state = self._grads
        recorder = state.recorder
        self._reduce_gradient_shards(epoch)
        if not recorder.rows:
            if self.is_main_process:
                warnings.warn(
                    f"save_collected_grads(ep={epoch}): no gradient statistics were collected since the last save; "
                    "call backward_propagation(loss, collect_grads=True) during the epoch. Nothing was written.",
                    BBDecoderWarning,
                    stacklevel=2,
                )
            return []
        data = self._gradient_epoch(epoch)
        recorder.clear()
        # Every rank keeps the same alerts and history (its numbers are the same), so a
        # decision taken on gradient_alerts() agrees across ranks; only rank 0 writes.
        alerts = self._gradient_alerts_for(data)
        layer_norms = _layer_norms(data)
        state.history.append(
            (epoch, data.iterations, {key: l2.astype(np.float32) for key, (_, l2) in layer_norms.items()})
        )
        state.alerts.extend(alerts)
        if not self.store.enabled:
            return []
        table = _csv_rows(data)
        paths = self._write_gradient_files(data, folder, table, alerts, layer_norms)
        self._warn_alerts(alerts)
        self._say(
            f"gradients: epoch {epoch}, {len(data.iterations)} iterations × {len(data.columns)} tensors, "
            f"{len(alerts)} alert(s), {int(data.skipped.sum())} skipped step(s) → {self.store.root / folder}"
        )
        self._notify("gradients_saved", epoch=epoch, rows=_plain_rows(table))
        return paths

    def gradient_alerts(self) -> list[dict[str, Any]]:
        """Every alert reported by ``save_collected_grads`` so far, oldest first.

        Each is a dict: ``epoch, kind`` (``"nonfinite"``, ``"vanishing"``, ``"exploding"``),
        ``layer_id, layer_name, param, iteration, value, message``.
        """
        return [dict(alert) for alert in self._grads.alerts]

    # ------------------------------------------------------------ internals
    def _reduce_gradient_shards(self, epoch: int) -> None:
        """FSDP2: reduce the recorded per-shard statistics across ranks (no-op otherwise).

        Statistics of a gradient split across ranks are partial sums until this runs, once
        per save on every rank: a check that the ranks recorded the same steps (one small
        all-reduce), then one SUM and one MAX all-reduce over the epoch's buffer. DDP
        gradients are whole on every rank after its all-reduce, so nothing is exchanged.

        Raises:
            BBDecoderValueError: the ranks recorded different steps or tensors (raised on
                every rank, rather than a hang in the reduction).
        """
        if distributed.world_size() == 1 or not distributed.is_sharded(self.inner):
            return
        recorder = self._grads.recorder
        mine = recorder.signature()
        device = recorder.data.device if recorder.data is not None else self.device
        low, high = distributed.spread(mine, device)
        if low != high:
            raise BBDecoderValueError(
                f"save_collected_grads(ep={epoch}): the ranks recorded different gradient statistics "
                f"({low[0]} to {high[0]} rows since the last save; this rank: {mine[0]}). With a sharded (FSDP) "
                "model every rank must call backward_propagation with the same collect_grads, layer_inds and "
                "collect_every, and every rank must call save_collected_grads"
            )
        recorder.reduce_shards()

    def _gradient_epoch(self, epoch: int) -> _Epoch:
        recorder = self._grads.recorder
        host = recorder.take()
        layouts = recorder.layouts
        used = sorted({c for layout in set(recorder.row_layout) for c in layouts[layout]})
        recorded = np.zeros((recorder.rows, len(recorder.columns) + 1), dtype=bool)
        for row, layout in enumerate(recorder.row_layout):
            recorded[row, list(layouts[layout])] = True
        values = host[:, used]
        recorded = recorded[:, used]
        scaled = np.array(recorder.row_scaled, dtype=bool)
        with np.errstate(invalid="ignore"):
            bad = np.where(recorded, values[:, :, 3], 0) > 0
        return _Epoch(
            epoch=epoch,
            iterations=np.array(recorder.iterations, dtype=np.int64),
            columns=[recorder.by_index(c) for c in used],
            values=values,
            recorded=recorded,
            skipped=scaled & bad.any(axis=1),
        )

    def _gradient_alerts_for(self, data: _Epoch) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = []
        state = self._grads
        mean_abs = data.mean_abs
        present = data.present
        counted = ~data.skipped[:, None]
        with np.errstate(invalid="ignore"):
            finite = present & (data.values[:, :, 3] == 0) & counted
            nonfinite = data.nonfinite_rows & counted
        for j, column in enumerate(data.columns):
            where = {"layer_id": column.layer_id, "layer_name": column.layer_name, "param": column.param}
            if nonfinite[:, j].any():
                row = int(np.argmax(nonfinite[:, j]))
                iteration = int(data.iterations[row])
                first = state.first_nonfinite.setdefault(column.index, iteration)
                if first == iteration:
                    count = int(data.values[row, j, 3])
                    alerts.append(
                        _alert(
                            data.epoch,
                            "nonfinite",
                            where,
                            iteration,
                            float(count),
                            f"{_where(column)}: the gradient holds NaN/Inf for the first time at iteration "
                            f"{iteration} ({count} non-finite entries)",
                        )
                    )
            if not finite[:, j].any():
                continue
            means = mean_abs[finite[:, j], j]
            average = float(means.mean())
            if average < self.vanish_threshold:
                row = int(np.argmax(finite[:, j] & (mean_abs[:, j] < self.vanish_threshold)))
                alerts.append(
                    _alert(
                        data.epoch,
                        "vanishing",
                        where,
                        int(data.iterations[row]),
                        average,
                        f"{_where(column)}: mean |grad| averages {average:.3g} over epoch {data.epoch}, below "
                        f"vanish_threshold={self.vanish_threshold:g}",
                    )
                )
            high = finite[:, j] & (mean_abs[:, j] > self.explode_threshold)
            if high.any():
                row = int(np.argmax(high))
                peak = float(mean_abs[high, j].max())
                alerts.append(
                    _alert(
                        data.epoch,
                        "exploding",
                        where,
                        int(data.iterations[row]),
                        peak,
                        f"{_where(column)}: mean |grad| exceeds explode_threshold={self.explode_threshold:g} "
                        f"from iteration {int(data.iterations[row])} (peak {peak:.3g})",
                    )
                )
        return alerts

    def _warn_alerts(self, alerts: list[dict[str, Any]]) -> None:
        warned = self._grads.warned
        for alert in alerts:
            key = (alert["kind"], alert["layer_id"], alert["param"])
            if key in warned:
                continue
            warned.add(key)
            warnings.warn(alert["message"], GradientAlertWarning, stacklevel=3)

    def _write_gradient_files(
        self,
        data: _Epoch,
        folder: Path,
        table: list[tuple[Any, ...]],
        alerts: list[dict[str, Any]],
        layer_norms: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]],
    ) -> list[Path]:
        from ...plots import gradients as plots

        store = self.store
        stem = f"epoch_{data.epoch:03d}"
        written: list[Path | None] = []

        def meta(kind: str) -> dict[str, Any]:
            return {"section": SECTION, "meta": {"epoch": data.epoch, "kind": kind}}

        summary = _tensor_summary(data)
        flow = plots.gradient_flow_figure(
            [row["label"] for row in summary],
            np.array([row["mean_abs"] for row in summary], dtype=np.float64),
            np.array([row["max_abs"] for row in summary], dtype=np.float64),
            [row["status"] for row in summary],
            notes=[row["note"] for row in summary],
            title=f"Gradient flow, epoch {data.epoch} ({len(data.iterations)} recorded iterations"
            + (f", {int(data.skipped.sum())} skipped by GradScaler)" if data.skipped.any() else ")"),
            vanish_threshold=self.vanish_threshold,
            explode_threshold=self.explode_threshold,
        )
        written.append(store.save_figure(flow, folder / f"{stem}_flow.png", **meta("flow")))

        frozen = {
            key: all(not c.parameter.requires_grad for c in data.columns if (c.layer_id, c.layer_name) == key)
            for key in layer_norms
        }
        panels = [
            plots.NormPanel(
                f"{layer_id} {name}",
                data.iterations,
                l1,
                l2,
                note="frozen (requires_grad=False)" if frozen[(layer_id, name)] else "",
            )
            for (layer_id, name), (l1, l2) in layer_norms.items()
        ]
        skipped = data.iterations[data.skipped]
        pages = [panels[i : i + _PANELS_PER_PAGE] for i in range(0, len(panels), _PANELS_PER_PAGE)]
        for number, page in enumerate(pages, start=1):
            suffix = "" if len(pages) == 1 else f"_{number}of{len(pages)}"
            title = f"Gradient norms per layer, epoch {data.epoch}" + (
                f" (page {number} of {len(pages)})" if len(pages) > 1 else ""
            )
            figure = plots.norm_curves_figure(page, title=title, skipped=skipped)
            written.append(store.save_figure(figure, folder / f"{stem}_norms{suffix}.png", **meta("norms")))

        written.append(store.write_csv(folder / f"{stem}_grads.csv", CSV_HEADER, _csv_text(table), **meta("csv")))

        matrix, labels, iterations, epochs = _heatmap_matrix(self._grads.history)
        heat = plots.gradient_heatmap_figure(
            matrix, labels, iterations, epochs, title=f"Per-layer gradient L2 norm, epochs so far (to {data.epoch})"
        )
        written.append(store.save_figure(heat, folder / f"{stem}_heatmap.png", **meta("heatmap")))
        written.append(
            store.write_npz(
                folder / f"{stem}_heatmap.npz",
                {
                    "l2": matrix,
                    "layers": np.array(labels, dtype=str),
                    "iterations": iterations,
                    "epochs": epochs,
                },
                **meta("heatmap"),
            )
        )

        report = {
            "epoch": data.epoch,
            "iterations": [int(data.iterations[0]), int(data.iterations[-1])],
            "recorded_iterations": len(data.iterations),
            "tensors": len(data.columns),
            "vanish_threshold": self.vanish_threshold,
            "explode_threshold": self.explode_threshold,
            "alerts": alerts,
            "skipped_iterations": [int(i) for i in skipped],
            "missing": [row["label"] for row in summary if row["status"] in ("missing", "frozen")],
            "summary": [{k: v for k, v in row.items() if k != "note"} for row in summary],
        }
        written.append(store.write_json(folder / f"{stem}_alerts.json", _jsonable(report), **meta("alerts")))
        return [path for path in written if path is not None]


# ------------------------------------------------------------------------- helpers
def _selection_key(layer_inds: Selector, bias: bool) -> Any:
    """A cache key that tells ``5`` from ``5.0``, ``True`` and ``[5]`` apart (``None``: do not cache)."""
    items = layer_inds if isinstance(layer_inds, (list, tuple)) else (layer_inds,)
    key = (type(layer_inds).__name__, tuple((type(item).__name__, item) for item in items), bias)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _is_bias(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias") or leaf.startswith("bias_")


def _owned_parameters(layers: Sequence[Layer], bias: bool) -> list[tuple[Layer, str, nn.Parameter]]:
    """``(layer, name relative to it, parameter)`` for each parameter, under its deepest selected layer."""
    owner: dict[int, tuple[int, int, Layer, str, nn.Parameter]] = {}
    for layer in sorted(layers, key=lambda item: -item.depth):
        for order, (name, param) in enumerate(layer.module.named_parameters()):
            if id(param) in owner or is_lazy(param) or param.numel() == 0 or (not bias and _is_bias(name)):
                continue
            owner[id(param)] = (layer.id, order, layer, name, param)
    return [(layer, name, param) for _, _, layer, name, param in sorted(owner.values(), key=lambda e: e[:2])]


def _scale_of(scaler: Any) -> torch.Tensor | None:
    """The scaler's current scale as a device tensor (``GradScaler.get_scale`` would sync)."""
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)


def _where(column: _Column) -> str:
    return f"layer {column.layer_id} {column.layer_name!r}, parameter {column.param!r}"


def _alert(epoch: int, kind: str, where: dict[str, Any], iteration: int, value: float, message: str) -> dict[str, Any]:
    return {"epoch": epoch, "kind": kind, **where, "iteration": iteration, "value": value, "message": message}


def _layer_norms(data: _Epoch) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """Per layer and row: L1 (sum of its tensors' L1) and L2 (root of their summed squares).

    NaN where none of the layer's tensors has a gradient in that row; ``inf`` when one of
    them is non-finite (so NaN always means "not recorded").
    """
    present = data.present
    l1: dict[tuple[int, str], np.ndarray] = {}
    sq: dict[tuple[int, str], np.ndarray] = {}
    seen: dict[tuple[int, str], np.ndarray] = {}
    for j, column in enumerate(data.columns):
        key = (column.layer_id, column.layer_name)
        if key not in l1:
            rows = len(data.iterations)
            l1[key], sq[key], seen[key] = np.zeros(rows), np.zeros(rows), np.zeros(rows, dtype=bool)
        l1[key] += np.where(present[:, j], data.values[:, j, 0], 0.0)
        sq[key] += np.where(present[:, j], data.values[:, j, 1] ** 2, 0.0)
        seen[key] |= present[:, j]
    result = {}
    for key in l1:
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(l1[key]) | ~np.isfinite(sq[key])
        l1_out = np.where(bad, np.inf, np.where(seen[key], l1[key], np.nan))
        l2_out = np.where(bad, np.inf, np.where(seen[key], np.sqrt(np.abs(sq[key])), np.nan))
        result[key] = (l1_out, l2_out)
    return result


def _tensor_summary(data: _Epoch) -> list[dict[str, Any]]:
    """Per tensor: the epoch's average mean |g|, maximum max |g|, and a status."""
    mean_abs = data.mean_abs
    present = data.present
    with np.errstate(invalid="ignore"):
        finite = present & (data.values[:, :, 3] == 0)
    nonfinite = data.nonfinite_rows & ~data.skipped[:, None]  # a step the GradScaler skips is not an error
    rows = []
    for j, column in enumerate(data.columns):
        ok = finite[:, j]
        mean = float(mean_abs[ok, j].mean()) if ok.any() else math.nan
        top = float(data.values[ok, j, 2].max()) if ok.any() else math.nan
        bad = int(nonfinite[:, j].sum())
        missing = int((data.recorded[:, j] & ~present[:, j]).sum())
        notes = []
        if not present[:, j].any():
            status = "frozen" if not column.parameter.requires_grad else "missing"
            notes.append("frozen (requires_grad=False)" if status == "frozen" else "no gradient (unused?)")
        else:
            status = "nonfinite" if bad else "zero" if top == 0 else "ok"
            if top == 0:
                notes.append("all-zero gradient")
            if bad:
                first = int(data.iterations[int(np.argmax(nonfinite[:, j]))])
                notes.append(f"NaN/Inf in {bad} iteration(s), first at {first}")
            if missing:
                notes.append(f"no gradient in {missing} iteration(s)")
        note = "; ".join(notes)
        rows.append(
            {
                "label": column.label,
                "layer_id": column.layer_id,
                "layer_name": column.layer_name,
                "param": column.param,
                "numel": column.numel,
                "mean_abs": mean,
                "max_abs": top,
                "status": status,
                "nonfinite_iterations": bad,
                "missing_iterations": missing,
                "note": note,
            }
        )
    return rows


def _csv_rows(data: _Epoch) -> list[tuple[Any, ...]]:
    """One row per recorded (iteration, tensor) in :data:`CSV_HEADER` order; NaN: missing."""
    mean_abs = data.mean_abs
    present = data.present
    rows: list[tuple[Any, ...]] = []
    nan = math.nan
    for r, iteration in enumerate(data.iterations.tolist()):
        for j in np.flatnonzero(data.recorded[r]).tolist():
            column = data.columns[j]
            head = (data.epoch, iteration, column.layer_id, column.layer_name, column.param)
            if present[r, j]:
                l1, l2, top, bad = data.values[r, j].tolist()
                rows.append((*head, float(mean_abs[r, j]), top, l1, l2, int(bad)))
            else:
                rows.append((*head, nan, nan, nan, nan, nan))
    return rows


def _plain_rows(rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Rows as dicts keyed by :data:`CSV_HEADER`; a missing gradient's numbers are ``None``."""
    out = []
    for row in rows:
        item = dict(zip(CSV_HEADER, row, strict=True))
        if isinstance(row[9], float):  # the non-finite count is NaN only for a missing gradient
            item.update(dict.fromkeys(CSV_HEADER[5:]))
        out.append(item)
    return out


def _csv_text(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Floats with nine significant digits (round-trips float32), ``nan`` for missing."""
    return [(*row[:5], *(f"{v:.9g}" if isinstance(v, float) else v for v in row[5:])) for row in rows]


def _heatmap_matrix(
    history: Sequence[tuple[int, np.ndarray, dict[tuple[int, str], np.ndarray]]],
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Stack every saved epoch's per-layer L2 into ``layers × iterations`` (NaN: not recorded)."""
    keys = sorted({key for _, _, layers in history for key in layers})
    iterations = np.concatenate([its for _, its, _ in history]) if history else np.zeros(0, dtype=np.int64)
    epochs = np.concatenate([np.full(len(its), ep, dtype=np.int64) for ep, its, _ in history])
    matrix = np.full((len(keys), len(iterations)), np.nan, dtype=np.float32)
    start = 0
    row_of = {key: i for i, key in enumerate(keys)}
    for _, its, layers in history:
        for key, values in layers.items():
            matrix[row_of[key], start : start + len(its)] = values
        start += len(its)
    labels = [f"{layer_id} {name}" for layer_id, name in keys]
    return matrix, labels, iterations, epochs


def _jsonable(value: Any) -> Any:
    """Floats that JSON can hold: NaN/inf become None (strict JSON readers choke on NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------- checks
def _check_loss(loss: Any, backward_kwargs: dict[str, Any] | None = None) -> None:
    if not isinstance(loss, torch.Tensor):
        raise BBDecoderTypeError(f"loss must be a torch.Tensor, got {type(loss).__name__} {loss!r}")
    if not loss.requires_grad:
        raise BBDecoderValueError(
            "loss does not require grad: it was computed without a graph (under torch.no_grad(), "
            "from detached tensors, or from a model whose parameters are all frozen), so there is "
            f"nothing to backpropagate; got loss={loss!r}"
        )
    kwargs = backward_kwargs or {}
    unknown = sorted(set(kwargs) - set(_BACKWARD_KEYWORDS))
    if unknown:
        raise BBDecoderTypeError(
            f"backward_propagation got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"its own are collect_grads, layer_inds, scaler, collect_every, include_bias, and loss.backward "
            f"accepts {', '.join(_BACKWARD_KEYWORDS)}"
        )
    if loss.numel() != 1 and kwargs.get("gradient") is None:
        raise BBDecoderValueError(
            f"loss must be a scalar (one element) unless gradient= is given; got a tensor of shape {tuple(loss.shape)}"
        )


def _check_flag(value: Any, name: str) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise BBDecoderTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _check_every(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BBDecoderTypeError(f"collect_every must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise BBDecoderValueError(f"collect_every must be at least 1 (1 records every call), got collect_every={value}")
    return int(value)


def _check_epoch(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BBDecoderTypeError(f"ep must be an int epoch number, got {type(value).__name__} {value!r}")
    if value < 0:
        raise BBDecoderValueError(f"ep must be a non-negative epoch number, got ep={value}")
    return int(value)


def _check_threshold(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BBDecoderTypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not value >= 0 or not math.isfinite(float(value)):
        raise BBDecoderValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
    return float(value)


def _check_scaler(scaler: Any) -> None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise BBDecoderTypeError(
            f"scaler must be a torch.amp.GradScaler (or None), got {type(scaler).__name__} {scaler!r:.80}"
        )
