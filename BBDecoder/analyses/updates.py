"""Update-to-weight ratio (issue 15): how much each optimizer step changes each weight tensor.

``wm.watch_optimizer(optimizer)`` registers a step pre-hook and a step post-hook on the
optimizer (any ``torch.optim.Optimizer``: SGD, Adam, Lion…). Before each step the pre-hook
copies the watched tensors that have a gradient and takes their norms ‖w‖; after the step
the post-hook subtracts the new values from the copy in place, takes the norms ‖Δw‖ of
what the optimizer actually changed, and frees the copy. Both norms go into a buffer on
the parameters' device; nothing waits for the device. The ratio ‖Δw‖/‖w‖ is formed at
save time, per tensor and per layer (a layer's tensors together: the root of the summed
squares of ‖Δw‖ over the root of the summed squares of ‖w‖).

Memory: one copy of the watched tensors that have a gradient, alive only from the pre-hook
to the post-hook of one step (``collect_every=k`` makes that one step in k); nothing is
kept between steps but two float32 numbers per tensor. An exact ‖Δw‖ needs the old
values of every element at the moment the new ones exist, so a full-precision copy
during the step is the floor for an optimizer treated as a black box (a low-precision
copy would drown Δw, typically 1e-3 of w, in rounding).

Alerts ("far from the rest", per layer, over an epoch): let ``r`` be a layer's median
ratio over the epoch's steps and ``z = log10 r``. With ``m`` the median of ``z`` over the
layers and ``s = 1.4826 × median |z - m|`` (a robust standard deviation, in decades), a
layer is *far* when ``|z - m| > max(min_far_decades, 3 s)`` (default ``min_far_decades``:
1, a factor of 10; needs at least three updated layers). Far below: ``update_small``
("frozen in effect"); far above: ``update_large`` ("about to diverge"). A layer within the
healthy band ``[healthy_low, healthy_high]`` (default 1e-4 to 1e-2, a decade either side
of the 1e-3 rule of thumb) is never far: a LayerNorm γ ≈ 1 moving 1e-3 a step under Adam
is fine even when the embeddings around it move 1e-2. Absolute limits
apply whatever the other layers do: ``r`` above ``large_ratio`` (default 0.1: a tenth of
the weight per step) is ``update_large``, ``r`` below ``small_ratio`` (default 1e-7, at
float32 rounding of the weights) or exactly 0 is ``update_small``.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import checks
from ..core.layers import ROOT_NAME, Layer, Selector, owned_parameters
from ..errors import (
    BBDecoderTypeError,
    BBDecoderValueError,
    BBDecoderWarning,
    LayerSelectionError,
)
from ..output import layout
from ..output.schema import UPDATE_CSV_HEADER, Alert, UpdateEpochReport, UpdateRow, UpdateSummary, csv_cells
from ..output.store import Store
from ._base import AnalyzerBase, held_on_failure, warn_new_alerts

SECTION = "updates"
GUIDE_RATIO = 1e-3
"""The rule-of-thumb ratio drawn as a guide line (updates of about 1/1000 of the weight per step)."""
MIN_FAR_DECADES = 1.0
"""Default ``min_far_decades``: a layer is never "far" within this many decades of the median layer."""
SMALL_RATIO = 1e-7
"""Default ``small_ratio``: a median ratio below this is ``update_small`` whatever the other layers do."""
LARGE_RATIO = 0.1
"""Default ``large_ratio``: a median ratio above this is ``update_large`` whatever the other layers do."""
HEALTHY_BAND = (1e-4, 1e-2)
"""Default ``(healthy_low, healthy_high)``: a median ratio in this band is never "far" from the other layers."""
MAD_SCALE = 1.4826
"""Median absolute deviation × this estimates a standard deviation (exact for a normal distribution)."""
_ROW_CAPACITY = 64
_HALF = (torch.float16, torch.bfloat16)


class UpdateAlertWarning(BBDecoderWarning):
    """A layer's updates are far smaller or larger than the other layers', or than the absolute limits."""


# ---------------------------------------------------------------------- recorder
@dataclass
class _Column:
    index: int
    layer_id: int
    layer_name: str
    param: str

    @property
    def key(self) -> tuple[int, str]:
        return self.layer_id, self.layer_name

    @property
    def label(self) -> str:
        name = self.param if self.layer_name == ROOT_NAME else f"{self.layer_name}.{self.param}"
        return f"{self.layer_id} {name}"


class _Recorder:
    """Device buffer ``(rows, columns + 1, 2)`` float32 of ``[‖Δw‖, ‖w‖]``, NaN-filled (column 0 unused)."""

    def __init__(self) -> None:
        self.data: torch.Tensor | None = None
        self.rows = 0
        self.columns: list[_Column] = []
        self._column_of: dict[tuple[int, str], int] = {}
        self.layouts: list[tuple[int, ...]] = []
        self._layout_of: dict[tuple[int, ...], int] = {}
        self.steps: list[int] = []
        self.row_layout: list[int] = []

    def column(self, layer: Layer, param: str) -> int:
        key = (layer.id, param)
        if key not in self._column_of:
            self._column_of[key] = len(self.columns) + 1
            self.columns.append(_Column(len(self.columns) + 1, layer.id, layer.name, param))
        return self._column_of[key]

    def layout(self, columns: Sequence[int]) -> int:
        key = tuple(columns)
        if key not in self._layout_of:
            self._layout_of[key] = len(self.layouts)
            self.layouts.append(key)
        return self._layout_of[key]

    def _ensure(self, device: torch.device) -> torch.Tensor:
        need = len(self.columns) + 1
        data = self.data
        if data is not None and data.device != device:
            data = self.data = data.to(device)
        if data is None or data.shape[0] <= self.rows or data.shape[1] < need:
            rows = _ROW_CAPACITY if data is None else data.shape[0]
            while rows <= self.rows:
                rows *= 2
            cols = need if data is None else max(need, data.shape[1])
            grown = torch.full((rows, cols, 2), math.nan, dtype=torch.float32, device=device)
            if data is not None and self.rows:
                grown[: self.rows, : data.shape[1]] = data[: self.rows]
            self.data = data = grown
        return data

    def record(self, step: int, layout: int, dest: torch.Tensor | None, stats: torch.Tensor | None) -> None:
        """Append one row; ``stats`` ``(n, 2)`` go to columns ``dest`` (no host sync)."""
        device = self.data.device if self.data is not None else (stats.device if stats is not None else None)
        data = self._ensure(device or torch.device("cpu"))
        if stats is not None and dest is not None:
            data[self.rows].index_copy_(0, dest.to(data.device, non_blocking=True), stats.to(data.device))
        self.steps.append(step)
        self.row_layout.append(layout)
        self.rows += 1

    def take(self) -> np.ndarray:
        """The rows as a float64 host array (the one sync per save)."""
        width = len(self.columns) + 1
        if self.data is None or not self.rows:
            return np.zeros((0, width, 2))
        host = self.data[: self.rows].cpu().numpy().astype(np.float64)
        if host.shape[1] < width:
            host = np.concatenate([host, np.full((host.shape[0], width - host.shape[1], 2), np.nan)], axis=1)
        return host

    def clear(self) -> None:
        if self.data is not None and self.rows:
            self.data[: self.rows].fill_(math.nan)
        self.rows = 0
        self.steps.clear()
        self.row_layout.clear()


# ------------------------------------------------------------------------ handle
class UpdateWatch:
    """The hooks :meth:`UpdateMixin.watch_optimizer` put on one optimizer.

    ``remove()`` (or leaving a ``with`` block) takes them off; ``Master_analyzer.close()``
    removes every watch still active.

    Attributes:
        optimizer: the watched optimizer.
        labels: ``"ID layer.param"`` of every watched tensor.
    """

    def __init__(
        self,
        owner: UpdateMixin,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        columns: list[int],
        layout: int,
        every: int,
        labels: list[str],
    ) -> None:
        self.optimizer = optimizer
        self.labels = labels
        self._owner: weakref.ReferenceType[UpdateMixin] = weakref.ref(owner)
        self._params = params
        self._columns = columns
        self._layout = layout
        self._every = every
        # (step, positions of each (device, dtype) group, copies per group, ‖w‖ per tensor in group order)
        self._pending: tuple[int, list[list[int]], list[list[torch.Tensor]], list[torch.Tensor]] | None = None
        self._dest: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]

    @property
    def active(self) -> bool:
        """Whether the hooks are still on the optimizer."""
        return bool(self._handles)

    def remove(self) -> None:
        """Take the hooks off the optimizer and free a pending copy (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self._pending = None
        owner = self._owner()
        if owner is not None:
            owner._updates.watches.pop(id(self.optimizer), None)

    def __enter__(self) -> UpdateWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"UpdateWatch({type(self.optimizer).__name__}, {len(self._params)} tensors, {state})"

    # ------------------------------------------------------------------ hooks
    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Copy the tensors that will be updated and take their norms (no host sync)."""
        self._pending = None
        owner = self._owner()
        if owner is None:
            return
        step = owner._updates.steps.get(optimizer, 0)
        if step % self._every:
            return
        present = [i for i, p in enumerate(self._params) if p.grad is not None]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i in present:
            p = self._params[i]
            groups.setdefault((p.device, p.dtype), []).append(i)
        copies: list[list[torch.Tensor]] = []
        norms: list[torch.Tensor] = []
        with torch.no_grad():
            for (_, dtype), positions in groups.items():
                tensors = [self._params[i].detach() for i in positions]
                copies.append([t.clone() for t in tensors])
                norms.extend(_norms(tensors, dtype))
        self._pending = (step, list(groups.values()), copies, norms)

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """‖old - new‖ per tensor, then free the copy and record the row (no host sync)."""
        owner = self._owner()
        if owner is None:
            return
        state = owner._updates
        state.steps[optimizer] = state.steps.get(optimizer, 0) + 1
        pending, self._pending = self._pending, None
        if pending is None:
            return
        step, groups, copies, weight_norms = pending
        del pending
        order = [i for positions in groups for i in positions]
        update_norms: list[torch.Tensor] = []
        with torch.no_grad():
            for positions in groups:
                olds = copies.pop(0)
                torch._foreach_sub_(olds, [self._params[i].detach() for i in positions])  # olds now hold -Δw
                update_norms.extend(_norms(olds, olds[0].dtype))
                del olds  # freed group by group
            dest = stats = None
            if order:
                device = weight_norms[0].device
                stats = torch.stack(
                    [
                        torch.stack([u.to(device) for u in update_norms]),
                        torch.stack([w.to(device) for w in weight_norms]),
                    ],
                    dim=1,
                ).float()
                key = (tuple(order), device)
                dest = self._dest.get(key)
                if dest is None:
                    if len(self._dest) > 64:
                        self._dest.clear()
                    dest = self._dest[key] = torch.tensor(
                        [self._columns[i] for i in order], dtype=torch.long, device=device
                    )
            state.recorder.record(step, self._layout, dest, stats)


def _norms(tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """L2 norms in one multi-tensor call; half precision accumulates in float32."""
    if dtype in _HALF:
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    return list(torch._foreach_norm(tensors, 2))


# ------------------------------------------------------------------- epoch data
@dataclass
class UpdateEpoch:
    """One epoch of update norms on the host."""

    epoch: int
    steps: np.ndarray  # (R,)
    columns: list[_Column]
    update: np.ndarray  # (R, C) ‖Δw‖, NaN: not recorded / no gradient
    weight: np.ndarray  # (R, C) ‖w‖ before the step
    recorded: np.ndarray  # (R, C) bool: watched at that step

    @property
    def present(self) -> np.ndarray:
        return self.recorded & ~np.isnan(self.update)

    @property
    def ratio(self) -> np.ndarray:
        return _ratio(self.update, self.weight)

    def layer_keys(self) -> list[tuple[int, str]]:
        return list(dict.fromkeys(c.key for c in self.columns))

    def layer_ratios(self) -> dict[tuple[int, str], np.ndarray]:
        """Per layer and step: sqrt(Σ‖Δw‖²) / sqrt(Σ‖w‖²) over its tensors with a gradient (NaN: none)."""
        present = self.present
        out: dict[tuple[int, str], np.ndarray] = {}
        for key in self.layer_keys():
            cols = [j for j, c in enumerate(self.columns) if c.key == key]
            mask = present[:, cols]
            u2 = np.where(mask, self.update[:, cols] ** 2, 0.0).sum(axis=1)
            w2 = np.where(mask, self.weight[:, cols] ** 2, 0.0).sum(axis=1)
            ratio = _ratio(np.sqrt(u2), np.sqrt(w2))
            out[key] = np.where(mask.any(axis=1), ratio, np.nan)
        return out


def _ratio(update: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``update / weight``; ``inf`` for a change of a zero weight, NaN for no change of one."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(weight > 0, update / np.where(weight > 0, weight, 1.0), np.where(update > 0, np.inf, np.nan))


@dataclass(frozen=True)
class UpdateRule:
    """The numbers of the "far" rule (see the module's docstring)."""

    min_far_decades: float = MIN_FAR_DECADES
    small_ratio: float = SMALL_RATIO
    large_ratio: float = LARGE_RATIO
    healthy_low: float = HEALTHY_BAND[0]
    healthy_high: float = HEALTHY_BAND[1]


@dataclass
class _UpdateState:
    recorder: _Recorder = field(default_factory=_Recorder)
    watches: dict[int, UpdateWatch] = field(default_factory=dict)
    steps: weakref.WeakKeyDictionary[torch.optim.Optimizer, int] = field(default_factory=weakref.WeakKeyDictionary)
    alerts: list[Alert] = field(default_factory=list)
    warned: set[tuple[str, int]] = field(default_factory=set)


# ------------------------------------------------------------------------ mixin
class UpdateMixin(AnalyzerBase):
    """``watch_optimizer`` and ``update_alerts``; the epoch's files are written by ``save_collected_grads``.

    Attributes:
        update_rule: the thresholds of the update alerts (an :class:`UpdateRule`; replace
            it to change them).
    """

    update_rule: UpdateRule

    def _init_updates(self) -> None:
        self.update_rule = UpdateRule()
        self._updates = _UpdateState()

    def watch_optimizer(
        self,
        optimizer: torch.optim.Optimizer,
        layer_inds: Selector = None,
        *,
        collect_every: int = 1,
        include_bias: bool | None = None,
    ) -> UpdateWatch:
        """Measure ‖Δw‖/‖w‖ of the selected layers' tensors at every ``optimizer.step()``.

        Δw is what the step actually changed (the difference of the tensor's values after
        and before the step), whatever the optimizer; ‖w‖ is the norm before the step.
        During a recorded step the watched tensors that have a gradient are copied once
        (freed at the end of the step); nothing waits for the device. Tensors without a
        gradient at a step are recorded as missing. The step number is the optimizer's
        step count since it was first watched by this analyzer (0-based).

        Args:
            optimizer: any ``torch.optim.Optimizer``.
            layer_inds: layer IDs, dotted names or a list of them; ``None``: every layer.
            collect_every: record only every k-th step (steps ``0, k, 2k…``).
            include_bias: also watch biases (default: the constructor's ``include_bias``).

        Returns:
            The handle; ``remove()`` it (or use it as a context manager) to stop.

        Raises:
            BBDecoderTypeError: ``optimizer`` is not an optimizer, or a bad ``collect_every``
                or ``include_bias``.
            BBDecoderValueError: the optimizer is already watched by this analyzer.
            LayerSelectionError: ``layer_inds`` selects no tensor the optimizer updates.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise BBDecoderTypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__} {optimizer!r:.80}"
            )
        every = _check_every(collect_every)
        if include_bias is None:
            bias = bool(getattr(self, "include_bias", False))
        elif isinstance(include_bias, (bool, np.bool_)):
            bias = bool(include_bias)
        else:
            raise BBDecoderTypeError(f"include_bias must be True or False, got {type(include_bias).__name__}")
        state = self._updates
        existing = state.watches.get(id(optimizer))
        if existing is not None and existing.active:
            raise BBDecoderValueError(
                f"this optimizer ({type(optimizer).__name__}) is already watched ({existing!r}); remove() that "
                "handle before watching it again"
            )
        layers = self._select(layer_inds, "layer_inds", default_all=True)
        if layer_inds is None and self.layers.root_own is not None:
            layers.append(self.layers.root_own)
        updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
        entries = [e for e in owned_parameters(layers, bias) if id(e[2]) in updated]
        if not entries:
            names = ", ".join(f"{layer.id} {layer.name!r}" for layer in layers[:6])
            raise LayerSelectionError(
                f"layer_inds={layer_inds!r} selects no parameter tensor that this {type(optimizer).__name__} "
                f"updates (include_bias={bias}); selected: {names}"
            )
        recorder = state.recorder
        columns = [recorder.column(layer, name) for layer, name, _ in entries]
        labels = [recorder.columns[c - 1].label for c in columns]
        watch = UpdateWatch(
            self, optimizer, [p for _, _, p in entries], columns, recorder.layout(columns), every, labels
        )
        state.watches[id(optimizer)] = watch
        return watch

    def update_alerts(self) -> list[dict[str, Any]]:
        """Every update alert of the saves so far, oldest first (``kind``: ``"update_small"`` or ``"update_large"``)."""
        return [alert.to_json() for alert in self._updates.alerts]

    def _updates_pending(self) -> bool:
        """Whether update norms wait for a save."""
        return bool(self._updates.recorder.rows)

    def _close_updates(self) -> None:
        """Remove every watch (``Master_analyzer.close``)."""
        for watch in list(self._updates.watches.values()):
            watch.remove()
        self._updates.watches.clear()

    # ---------------------------------------------------------------- saving
    def _save_update_epoch(self, epoch: int, save_folder: str | os.PathLike[str] | None = None) -> list[Path]:
        """Write the epoch's update files (called by ``save_collected_grads``); ``[]`` when none were recorded.

        Files (under ``save_path/updates/`` or ``save_folder``), named ``epoch_<ep>_…``:
        ``updates.csv`` (every number, header :data:`UPDATE_CSV_HEADER`), ``updates.png``
        (per-layer ratio over the steps on a log axis with the 1e-3 guide, and each layer's
        epoch median against the "far" band) and ``update_alerts.json`` (an
        :class:`~BBDecoder.output.schema.UpdateEpochReport`).

        Raises:
            OutputWriteError: a file could not be written (the epoch is still held).
        """
        state = self._updates
        recorder = state.recorder
        if not recorder.rows:
            return []
        folder = self.store.subfolder(save_folder, "save_folder", default=SECTION)
        data = self._update_epoch(epoch)
        summary, center, spread, far = update_summary(data, self.update_rule)
        alerts = find_update_alerts(data, summary, self.update_rule, center, far)
        rows = update_rows(data)
        paths: list[Path] = []
        if self.store.enabled:
            report = UpdateEpochReport(
                epoch=epoch,
                steps=[int(data.steps[0]), int(data.steps[-1])],
                recorded_steps=len(data.steps),
                tensors=len(data.columns),
                median_log10=center,
                spread=spread,
                far_decades=far,
                small_threshold=self.update_rule.small_ratio,
                large_threshold=self.update_rule.large_ratio,
                alerts=alerts,
                summary=summary,
            )
            with held_on_failure(epoch, "the update files", "The epoch's update norms are"):
                paths = _write_epoch(self.store, folder, data, rows, report)
        recorder.clear()
        state.alerts.extend(alerts)
        if not self.store.enabled:
            return []
        where = layout.relative_path(SECTION, "alerts", folder=folder, epoch=epoch)
        warn_new_alerts(
            alerts,
            state.warned,
            subject="update",
            unit="layer(s)",
            titles={"update_large": "too large", "update_small": "too small"},
            where=where,
            category=UpdateAlertWarning,
            order=lambda alert: -abs(math.log10(alert.value) + 3) if alert.value > 0 else -math.inf,  # far from 1e-3
        )
        self._say(
            f"updates: epoch {epoch}, {len(data.steps)} steps × {len(data.columns)} tensors, "
            f"{len(alerts)} alert(s) → {self.store.root / folder}"
        )
        self.events.emit("updates_saved", epoch=epoch, rows=rows)
        return paths

    def _update_epoch(self, epoch: int) -> UpdateEpoch:
        recorder = self._updates.recorder
        host = recorder.take()
        used = sorted({c for index in set(recorder.row_layout) for c in recorder.layouts[index]})
        recorded = np.zeros((recorder.rows, len(recorder.columns) + 1), dtype=bool)
        for row, index in enumerate(recorder.row_layout):
            recorded[row, list(recorder.layouts[index])] = True
        return UpdateEpoch(
            epoch=epoch,
            steps=np.array(recorder.steps, dtype=np.int64),
            columns=[recorder.columns[c - 1] for c in used],
            update=host[:, used, 0],
            weight=host[:, used, 1],
            recorded=recorded[:, used],
        )


# ------------------------------------------------------------------- the epoch
def update_rows(data: UpdateEpoch) -> list[UpdateRow]:
    """One row per watched tensor per recorded step (NaN numbers: no gradient at that step)."""
    ratio = data.ratio
    rows = []
    for r, step in enumerate(data.steps.tolist()):
        for j in np.flatnonzero(data.recorded[r]).tolist():
            c = data.columns[j]
            u, w, q = float(data.update[r, j]), float(data.weight[r, j]), float(ratio[r, j])
            if math.isnan(u):
                w = q = math.nan
            rows.append(UpdateRow(data.epoch, step, c.layer_id, c.layer_name, c.param, u, w, q))
    return rows


def update_summary(data: UpdateEpoch, rule: UpdateRule) -> tuple[list[UpdateSummary], float, float, float]:
    """Per layer: the epoch's median ratio and its log10 distance from the median layer.

    Returns:
        ``(summary, m, s, far)``: the median over layers of log10 of their median ratio,
        its robust spread (1.4826 × MAD, decades), and the distance beyond which a layer
        is far (NaN when fewer than three layers were updated).
    """
    ratios = data.layer_ratios()
    medians: dict[tuple[int, str], float] = {}
    steps: dict[tuple[int, str], int] = {}
    frozen: set[tuple[int, str]] = set()
    for key, values in ratios.items():
        seen = values[~np.isnan(values)]
        steps[key] = int(seen.size)
        medians[key] = float(np.median(seen)) if seen.size else math.nan
        if seen.size and not seen.any():
            frozen.add(key)
    logs = np.array([math.log10(m) for m in medians.values() if math.isfinite(m) and m > 0])
    if logs.size >= 3:
        center = float(np.median(logs))
        spread = MAD_SCALE * float(np.median(np.abs(logs - center)))
        far = max(rule.min_far_decades, 3 * spread)
    else:
        center = spread = far = math.nan
    summary = []
    for key, median in medians.items():
        tensors = sum(c.key == key for c in data.columns)
        if math.isnan(median):
            distance, status = math.nan, "missing"
        elif key in frozen:
            distance, status = -math.inf, "not updated"
        elif median == 0:
            distance, status = -math.inf, "small"
        else:
            distance = math.log10(median) - center if math.isfinite(median) and not math.isnan(center) else math.nan
            healthy = rule.healthy_low <= median <= rule.healthy_high  # never "far" from the others
            too_large = median > rule.large_ratio or (not healthy and not math.isnan(distance) and distance > far)
            too_small = median < rule.small_ratio or (not healthy and not math.isnan(distance) and distance < -far)
            status = "large" if too_large else "small" if too_small else "ok"
        summary.append(UpdateSummary(key[0], key[1], tensors, steps[key], median, distance, status))
    return summary, center, spread, far


def find_update_alerts(
    data: UpdateEpoch, summary: Sequence[UpdateSummary], rule: UpdateRule, center: float, far: float
) -> list[Alert]:
    """``update_small`` / ``update_large`` for the layers :func:`update_summary` marked."""
    ratios = data.layer_ratios()
    alerts = []
    typical = 10**center if not math.isnan(center) else math.nan
    for item in summary:
        if item.status not in ("small", "large", "not updated"):
            continue
        key = (item.layer_id, item.layer_name)
        values = ratios[key]
        where = f"layer {item.layer_id} {item.layer_name!r}"
        versus = f"; the median layer's is {typical:.2g}" if math.isfinite(typical) else ""
        if item.status == "large":
            limit = min(rule.large_ratio, 10 ** (center + far)) if not math.isnan(center) else rule.large_ratio
            with np.errstate(invalid="ignore"):
                first = (
                    int(data.steps[int(np.argmax(values > limit))]) if (values > limit).any() else int(data.steps[0])
                )
            why = (
                f"above large_ratio={rule.large_ratio:g}"
                if item.median_ratio > rule.large_ratio
                else f"{10**item.log10_distance:.0f}× the median layer's, beyond the far limit of {far:.2g} decades"
            )
            message = (
                f"{where}: updates are large, ‖Δw‖/‖w‖ has median {item.median_ratio:.2g} over epoch {data.epoch} "
                f"({why}{versus}): about to diverge"
            )
            kind = "update_large"
        else:
            limit = max(rule.small_ratio, 10 ** (center - far)) if not math.isnan(center) else rule.small_ratio
            with np.errstate(invalid="ignore"):
                first = (
                    int(data.steps[int(np.argmax(values < limit))]) if (values < limit).any() else int(data.steps[0])
                )
            if item.status == "not updated":
                why = "the optimizer changed nothing at any step"
            elif item.median_ratio == 0:
                why = "no change at all at more than half of the steps"
            elif item.median_ratio < rule.small_ratio:
                why = f"below small_ratio={rule.small_ratio:g}"
            else:
                why = (
                    f"1/{10**-item.log10_distance:.0f} of the median layer's, beyond the far limit of {far:.2g} decades"
                )
            message = (
                f"{where}: updates are tiny, ‖Δw‖/‖w‖ has median {item.median_ratio:.2g} over epoch {data.epoch} "
                f"({why}{versus}): frozen in effect"
            )
            kind = "update_small"
        alerts.append(Alert(data.epoch, kind, item.layer_id, item.layer_name, "", first, item.median_ratio, message))
    return alerts


def _write_epoch(
    store: Store, folder: PurePosixPath | Path, data: UpdateEpoch, rows: list[UpdateRow], report: UpdateEpochReport
) -> list[Path]:
    from ..plots import updates as plots

    epoch = data.epoch
    written: list[Path | None] = []

    def put(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        path = layout.relative_path(SECTION, kind, folder=folder, epoch=epoch, **fields)
        return path, {"section": SECTION, "meta": {"epoch": epoch, "kind": kind}}

    path, where = put("csv")
    written.append(store.write_csv(path, UPDATE_CSV_HEADER, (csv_cells(row) for row in rows), **where))

    ratios = data.layer_ratios()
    by_key = {(s.layer_id, s.layer_name): s for s in report.summary}
    keys = list(ratios)
    pages = [keys[i : i + plots.LAYERS_PER_PAGE] for i in range(0, len(keys), plots.LAYERS_PER_PAGE)]
    for number, page in enumerate(pages, start=1):
        title = f"Update-to-weight ratio ‖Δw‖/‖w‖, epoch {epoch} ({len(data.steps)} steps)" + (
            f", page {number} of {len(pages)}" if len(pages) > 1 else ""
        )
        figure = plots.update_ratio_figure(
            [f"{layer_id} {name}" for layer_id, name in page],
            data.steps,
            np.stack([ratios[key] for key in page]),
            np.array([by_key[key].median_ratio for key in page]),
            [by_key[key].status for key in page],
            title=title,
            center=report.median_log10,
            far=report.far_decades,
            small=report.small_threshold,
            large=report.large_threshold,
        )
        path, where = put("figure", page=layout.page_suffix(number, len(pages)))
        written.append(store.save_figure(figure, path, **where))

    path, where = put("alerts")
    written.append(store.write_json(path, report.to_json(), **where))
    return [p for p in written if p is not None]


# --------------------------------------------------------------------- helpers
def _check_every(value: Any) -> int:
    return checks.integer(value, "collect_every", low=1, meaning="1 records every step")
