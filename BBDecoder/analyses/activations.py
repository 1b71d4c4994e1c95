"""Activation health (issue 15): statistics of layer outputs on the forward passes you pick.

``forward_propagation(x, collect_acts=True)`` (or ``collect_acts=k``: every k-th call) runs
the model with forward hooks on the numbered layers for that one call and records, for
every selected layer, six numbers of its output on the output's device, without a host
synchronisation: mean, std, max |a|, the fraction of exact zeros, ``dead_frac`` and
``saturated_frac``. Calls that record nothing run the model with no hook at all.
``save_collected_grads(ep)`` writes the epoch's files (see :meth:`ActivationMixin._save_activation_epoch`).

Definitions (the layer's output is the first floating-point tensor it returns; a layer
called several times in one pass is recorded at its first call):

- ``mean``, ``std`` (population, ``correction=0``), ``max_abs``: over every element.
- ``zero_frac``: the fraction of elements that are exactly 0.
- ``dead_frac``: the fraction of *units* that are exactly 0 for every sample (and every
  position) of the batch. A unit is one entry of the unit dimension: dim 1 for outputs of
  four or more dimensions ``(N, C, H, W…)`` and for ``(N, C, L)`` outputs of convolution,
  batch/instance/group norm, pooling and channel dropout layers; the last dim for
  ``(N, D)`` features and for ``(N, T, D)`` outputs of linear, embedding, layer norm,
  attention, transformer and recurrent layers. Other 3-d outputs (an activation function,
  a custom block) take the unit dimension of the layer that ran just before them when
  its output had the same shape (a ReLU after a ``Conv1d``), else the last. Outputs with
  fewer than two dimensions are one unit.
- ``saturated_frac``: for outputs of bounded activations (``Sigmoid``, ``Hardsigmoid``:
  [0, 1]; ``Tanh``, ``Softsign``: [-1, 1]; ``Hardtanh`` and its subclass ``ReLU6``:
  [min_val, max_val]; an ``nn.Sequential`` ending in one of them), the fraction of
  elements within :data:`SATURATION_MARGIN` (1%) of the range from either bound, where
  the gradient through the activation is (nearly) zero. ``nan`` for every other layer.

Alerts (per save, warned once per layer and kind): ``dead`` when a layer's ``dead_frac``
is at least ``dead_threshold`` (default 0.5) at the epoch's last recorded pass, with the
first iteration since which it has stayed there; ``saturated`` when a bounded layer's
``saturated_frac`` averages at least ``saturated_threshold`` (default 0.25) over the epoch.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.forward import hooked_forward
from ..core.layers import Layer, Selector
from ..core.tree import tensors
from ..errors import BBDecoderTypeError, BBDecoderValueError, BBDecoderWarning
from ..output import layout
from ..output.schema import (
    ACTIVATION_CSV_HEADER,
    ActivationEpochReport,
    ActivationRow,
    ActivationSummary,
    Alert,
    csv_cells,
    manifest_entries,
)
from ..output.store import Store
from ._base import AnalyzerBase, held_on_failure, warn_new_alerts

SECTION = "activations"
STATS = ("mean", "std", "max_abs", "zero_frac", "dead_frac", "saturated_frac")
SATURATION_MARGIN = 0.01
"""An element of a bounded activation is saturated within this fraction of the range from a bound."""
DEAD_THRESHOLD = 0.5
"""Default ``dead_threshold``: a layer alerts when at least this fraction of its units is dead."""
SATURATED_THRESHOLD = 0.25
"""Default ``saturated_threshold``: a bounded layer alerts when this fraction of its outputs is saturated."""
_ROW_CAPACITY = 64
_WIDTH = len(STATS) + 1  # the last cell is 1 when the layer ran in that pass (NaN: it did not)
_LAYERS_PER_PAGE = 40

_CHANNEL_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
_FEATURE_LAST: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
    nn.RNNBase,
)


class ActivationAlertWarning(BBDecoderWarning):
    """A layer's units died, or a bounded activation saturated."""


# ------------------------------------------------------------------- computation
def unit_convention(module: nn.Module) -> str:
    """``"first"`` (dim 1 holds the units of 3-d outputs), ``"last"``, or ``"inherit"`` (decided at run time).

    A container follows the last module of a known kind among its descendants.
    """
    if isinstance(module, _CHANNEL_FIRST):
        return "first"
    if isinstance(module, _FEATURE_LAST):
        return "last"
    for sub in reversed(list(module.modules())[1:]):
        if isinstance(sub, _CHANNEL_FIRST):
            return "first"
        if isinstance(sub, _FEATURE_LAST):
            return "last"
    return "inherit"


def activation_bounds(module: nn.Module) -> tuple[float, float] | None:
    """``(low, high)`` of a bounded activation module (or a Sequential ending in one), else ``None``."""
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return 0.0, 1.0
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return -1.0, 1.0
    if isinstance(module, nn.Hardtanh):  # ReLU6 too
        return float(module.min_val), float(module.max_val)
    if isinstance(module, nn.Sequential) and len(module):
        return activation_bounds(module[-1])
    return None


def unit_dim(shape: Sequence[int], convention: str, previous: tuple[tuple[int, ...], int | None] | None) -> int | None:
    """The dimension whose entries are the units of ``dead_frac`` (``None``: the whole output is one unit).

    Args:
        shape: the output's shape.
        convention: the layer's :func:`unit_convention`.
        previous: ``(shape, unit dim)`` of the layer that ran just before, if any.
    """
    ndim = len(shape)
    if ndim < 2:
        return None
    if ndim != 3:
        return 1
    if convention == "first":
        return 1
    if convention == "inherit" and previous is not None and previous[0] == tuple(shape):
        return previous[1]
    return 2


def activation_stats(
    output: torch.Tensor,
    dim: int | None,
    bounds: tuple[float, float] | None,
    *,
    margin: float = SATURATION_MARGIN,
) -> torch.Tensor:
    """``[mean, std, max_abs, zero_frac, dead_frac, saturated_frac, 1]`` of ``output``, on its device.

    Computed in float32 (float64 for a float64 output) with no host synchronisation.

    Args:
        output: a layer's output (floating point).
        dim: the unit dimension (see :func:`unit_dim`); ``None``: one unit.
        bounds: the activation's ``(low, high)``; ``None``: ``saturated_frac`` is NaN.
        margin: the saturated band at each bound, as a fraction of ``high - low``.

    Returns:
        A float32 vector of 7 (the last entry marks "recorded").
    """
    x = output.detach()
    x = x if x.dtype == torch.float64 else x.float()
    n = x.numel()
    if n == 0:
        empty = torch.full((_WIDTH,), math.nan, device=x.device)
        empty[-1] = 1.0
        return empty
    std, mean = torch.std_mean(x, correction=0)
    if dim is None:
        high, low = x.amax().reshape(1), x.amin().reshape(1)
    else:
        dims = [d for d in range(x.ndim) if d != dim]
        high, low = x.amax(dim=dims), x.amin(dim=dims)
    max_abs = torch.maximum(high.abs(), low.abs()).amax()
    zero_frac = (n - torch.count_nonzero(x)).to(x.dtype) / n
    dead = (high == 0) & (low == 0)
    dead_frac = torch.count_nonzero(dead).to(x.dtype) / dead.numel()
    if bounds is None:
        saturated = torch.full((), math.nan, dtype=x.dtype, device=x.device)
    else:
        lo, hi = bounds
        band = margin * (hi - lo)
        saturated = torch.count_nonzero((x <= lo + band) | (x >= hi - band)).to(x.dtype) / n
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.stack([mean, std, max_abs, zero_frac, dead_frac, saturated, one]).float()


def _first_float(output: Any) -> torch.Tensor | None:
    for tensor in tensors(output):
        if tensor.is_floating_point():
            return tensor
    return None


# ---------------------------------------------------------------------- recorder
@dataclass
class _Plan:
    """A resolved selection of layers to record."""

    wanted: frozenset[int]
    layout: int


class _Recorder:
    """Device buffer ``(rows, layers, 7)`` float32, NaN-filled; doubles when full."""

    def __init__(self, columns: int) -> None:
        self.columns = columns
        self.data: torch.Tensor | None = None
        self.rows = 0
        self.iterations: list[int] = []
        self.row_layout: list[int] = []
        self.layouts: list[frozenset[int]] = []
        self._layout_of: dict[frozenset[int], int] = {}
        self._dest: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}
        self.unit: dict[int, tuple[int | None, int]] = {}  # layer id -> (unit dim, units) last seen

    def layout(self, wanted: frozenset[int]) -> int:
        if wanted not in self._layout_of:
            self._layout_of[wanted] = len(self.layouts)
            self.layouts.append(wanted)
        return self._layout_of[wanted]

    def _ensure(self, device: torch.device) -> torch.Tensor:
        data = self.data
        if data is not None and data.device != device:
            data = self.data = data.to(device)
        if data is None or data.shape[0] <= self.rows:
            rows = _ROW_CAPACITY if data is None else 2 * data.shape[0]
            grown = torch.full((rows, self.columns, _WIDTH), math.nan, dtype=torch.float32, device=device)
            if data is not None and self.rows:
                grown[: self.rows] = data[: self.rows]
            self.data = data = grown
        return data

    def record(
        self, iteration: int, layout: int, pending: list[tuple[int, torch.Tensor]], fallback: torch.device
    ) -> None:
        """Append one row: the statistics of the layers that ran (no host sync)."""
        device = self.data.device if self.data is not None else (pending[0][1].device if pending else fallback)
        data = self._ensure(device)
        if pending:
            ids = tuple(layer_id for layer_id, _ in pending)
            key = (ids, device)
            dest = self._dest.get(key)
            if dest is None:
                if len(self._dest) > 256:
                    self._dest.clear()
                dest = self._dest[key] = torch.tensor(ids, dtype=torch.long, device=device)
            stats = torch.stack([s.to(device, non_blocking=True) for _, s in pending])
            data[self.rows].index_copy_(0, dest, stats)
        self.iterations.append(iteration)
        self.row_layout.append(layout)
        self.rows += 1

    def take(self) -> np.ndarray:
        """The rows as a float64 host array (the one sync per save)."""
        if self.data is None or not self.rows:
            return np.zeros((0, self.columns, _WIDTH))
        return self.data[: self.rows].cpu().numpy().astype(np.float64)

    def clear(self) -> None:
        if self.data is not None and self.rows:
            self.data[: self.rows].fill_(math.nan)
        self.rows = 0
        self.iterations.clear()
        self.row_layout.clear()


# ------------------------------------------------------------------- epoch data
@dataclass(frozen=True)
class LayerInfo:
    """One recorded layer, as plain data."""

    layer_id: int
    layer_name: str
    type: str
    bounds: tuple[float, float] | None
    unit_dim: int | None
    units: int

    @property
    def label(self) -> str:
        return f"{self.layer_id} {self.layer_name}"

    @property
    def key(self) -> tuple[int, str]:
        return self.layer_id, self.layer_name


@dataclass
class ActivationEpoch:
    """One epoch of activation statistics on the host."""

    epoch: int
    iterations: np.ndarray  # (R,)
    layers: list[LayerInfo]  # selected at some row of the epoch, in ID order
    values: np.ndarray  # (R, L, 6) float64: STATS, NaN where not recorded
    selected: np.ndarray  # (R, L) bool: selected at that row
    recorded: np.ndarray  # (R, L) bool: selected at that row, and it ran

    def stat(self, name: str) -> np.ndarray:
        return self.values[:, :, STATS.index(name)]


@dataclass
class ActivationHistory:
    """Per-layer statistics of one saved epoch (``layers.npz``): the heatmap's columns for it."""

    epoch: int
    iterations: np.ndarray  # (R,)
    keys: list[tuple[int, str]]
    values: np.ndarray  # (layers, R, 6) float32


@dataclass
class _ActivationState:
    recorder: _Recorder
    plans: dict[Any, _Plan] = field(default_factory=dict)
    calls: int = 0
    conventions: dict[int, str] = field(default_factory=dict)
    bounds: dict[int, tuple[float, float] | None] = field(default_factory=dict)
    alerts: list[Alert] = field(default_factory=list)
    warned: set[tuple[str, int]] = field(default_factory=set)
    history: list[ActivationHistory] | None = None


# ------------------------------------------------------------------------ mixin
class ActivationMixin(AnalyzerBase):
    """``forward_propagation(..., collect_acts=, layer_inds=)`` recording and ``activation_alerts``.

    Attributes:
        dead_threshold: ``dead_frac`` from which a layer alerts (default 0.5).
        saturated_threshold: epoch-average ``saturated_frac`` from which a bounded layer
            alerts (default 0.25).
    """

    _dead_threshold: float
    _saturated_threshold: float

    def _init_activations(
        self, *, dead_threshold: float = DEAD_THRESHOLD, saturated_threshold: float = SATURATED_THRESHOLD
    ) -> None:
        self.dead_threshold = dead_threshold
        self.saturated_threshold = saturated_threshold
        self._acts = _ActivationState(_Recorder(len(self.layers)))

    @property
    def dead_threshold(self) -> float:
        """``dead_frac`` from which a layer alerts (a fraction in [0, 1]; checked when set)."""
        return self._dead_threshold

    @dead_threshold.setter
    def dead_threshold(self, value: float) -> None:
        self._dead_threshold = _check_fraction(value, "dead_threshold")

    @property
    def saturated_threshold(self) -> float:
        """Epoch-average ``saturated_frac`` from which a bounded layer alerts (in [0, 1]; checked when set)."""
        return self._saturated_threshold

    @saturated_threshold.setter
    def saturated_threshold(self, value: float) -> None:
        self._saturated_threshold = _check_fraction(value, "saturated_threshold")

    # ------------------------------------------------------------- recording
    def _forward_with_activations(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], collect_acts: Any, layer_inds: Selector
    ) -> Any:
        """``self.model(*args, **kwargs)``, hooked and recorded when ``collect_acts`` says so.

        Every call counts one iteration; ``collect_acts=k`` records iterations ``0, k, 2k…``.
        Exceptions of the model propagate unchanged.

        Raises:
            BBDecoderTypeError, BBDecoderValueError: ``collect_acts`` is not a bool or a positive int.
            LayerSelectionError: a bad ``layer_inds``.
        """
        every = _check_collect(collect_acts)
        state = self._acts
        plan = self._activation_plan(layer_inds) if every or layer_inds is not None else None
        iteration = state.calls
        state.calls += 1
        if plan is None or not every or iteration % every:
            return self.model(*args, **kwargs)
        return self._recorded_forward(plan, iteration, args, kwargs)

    def _recorded_forward(self, plan: _Plan, iteration: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        state = self._acts
        recorder = state.recorder
        pending: list[tuple[int, torch.Tensor]] = []
        previous: list[tuple[tuple[int, ...], int | None] | None] = [None]
        done: set[int] = set()

        def after(layer: Layer, output: Any) -> None:
            tensor = _first_float(output)
            if tensor is None:
                return None
            shape = tuple(tensor.shape)
            dim = unit_dim(shape, state.conventions[layer.id], previous[0])
            previous[0] = (shape, dim)
            if layer.id in plan.wanted and layer.id not in done:
                done.add(layer.id)
                recorder.unit[layer.id] = (dim, 1 if dim is None else int(shape[dim]))
                with torch.no_grad():
                    pending.append((layer.id, activation_stats(tensor, dim, state.bounds[layer.id])))
            return None

        with hooked_forward(
            self.inner,
            self.layers,
            self.hooks,
            "forward_propagation",
            device=self.device,
            after=after,
            evaluate=False,
        ):
            output = self.model(*args, **kwargs)
        with torch.no_grad():
            recorder.record(iteration, plan.layout, pending, self.device)
        return output

    def _activation_plan(self, layer_inds: Selector) -> _Plan:
        state = self._acts
        key = _selection_key(layer_inds)
        plan = state.plans.get(key) if key is not None else None
        if plan is not None:
            return plan
        if not state.conventions:
            for layer in self.layers:
                state.conventions[layer.id] = unit_convention(layer.module)
                state.bounds[layer.id] = activation_bounds(layer.module)
        layers = self._select(layer_inds, "layer_inds", default_all=True)
        wanted = frozenset(layer.id for layer in layers)
        plan = _Plan(wanted, state.recorder.layout(wanted))
        if key is not None:
            if len(state.plans) > 64:
                state.plans.clear()
            state.plans[key] = plan
        return plan

    def _activations_pending(self) -> bool:
        """Whether activation statistics wait for a save."""
        return bool(self._acts.recorder.rows)

    def activation_alerts(self) -> list[dict[str, Any]]:
        """Every activation alert of the saves so far, oldest first (``kind``: ``"dead"`` or ``"saturated"``)."""
        return [alert.to_json() for alert in self._acts.alerts]

    # ---------------------------------------------------------------- saving
    def _save_activation_epoch(self, epoch: int, save_folder: str | os.PathLike[str] | None = None) -> list[Path]:
        """Write the epoch's activation files (called by ``save_collected_grads``); ``[]`` when none were recorded.

        Files (under ``save_path/activations/`` or ``save_folder``), named ``epoch_<ep>_…``:
        ``activations.csv`` (every number, header :data:`ACTIVATION_CSV_HEADER`),
        ``activations.png`` (per layer: std and max |a|; zero, dead and saturated
        fractions), ``activation_layers.npz`` (this epoch's per-layer numbers),
        ``activation_heatmap.png`` (dead and saturated fractions, layers × iterations over
        every epoch so far) and ``activation_alerts.json`` (an
        :class:`~BBDecoder.output.schema.ActivationEpochReport`). Everything is written
        before the buffer is cleared.

        Raises:
            OutputWriteError: a file could not be written (the epoch is still held).
        """
        state = self._acts
        recorder = state.recorder
        if not recorder.rows:
            return []
        folder = self.store.subfolder(save_folder, "save_folder", default=SECTION)
        data = self._activation_epoch(epoch)
        history = [h for h in self._activation_history() if h.epoch != epoch]
        history.append(_history_entry(data))
        alerts = find_activation_alerts(data, history, self.dead_threshold, self.saturated_threshold)
        summary = activation_summary(data, alerts)
        rows = activation_rows(data)
        paths: list[Path] = []
        if self.store.enabled:
            with held_on_failure(epoch, "the activation files", "The epoch's activation statistics are"):
                paths = _write_epoch(
                    self.store,
                    folder,
                    data,
                    rows=rows,
                    summary=summary,
                    alerts=alerts,
                    history=history,
                    thresholds=(self.dead_threshold, self.saturated_threshold),
                )
        recorder.clear()
        state.history = history
        state.alerts.extend(alerts)
        if not self.store.enabled:
            return []
        where = layout.relative_path(SECTION, "alerts", folder=folder, epoch=epoch)
        warn_new_alerts(
            alerts,
            state.warned,
            subject="activation",
            unit="layer(s)",
            titles={"dead": "dead", "saturated": "saturated"},
            where=where,
            category=ActivationAlertWarning,
            order=lambda alert: -alert.value,
        )
        self._say(
            f"activations: epoch {epoch}, {len(data.iterations)} recorded passes × {len(data.layers)} layers, "
            f"{len(alerts)} alert(s) → {self.store.root / folder}"
        )
        self.events.emit("activations_saved", epoch=epoch, rows=rows)
        return paths

    def _activation_epoch(self, epoch: int) -> ActivationEpoch:
        recorder = self._acts.recorder
        host = recorder.take()
        selected = np.zeros((recorder.rows, recorder.columns), dtype=bool)
        for row, index in enumerate(recorder.row_layout):
            selected[row, sorted(recorder.layouts[index])] = True
        used = sorted({i for index in set(recorder.row_layout) for i in recorder.layouts[index]})
        infos = []
        for layer_id in used:
            layer = self.layers[layer_id]
            dim, units = recorder.unit.get(layer_id, (None, 0))
            infos.append(LayerInfo(layer.id, layer.name, layer.type, self._acts.bounds.get(layer_id), dim, units))
        values = host[:, used, : len(STATS)]
        chosen = selected[:, used]
        ran = chosen & (host[:, used, -1] == 1)
        return ActivationEpoch(epoch, np.array(recorder.iterations, dtype=np.int64), infos, values, chosen, ran)

    def _activation_history(self) -> list[ActivationHistory]:
        state = self._acts
        if state.history is None:
            state.history = load_activation_history(self.store) if self.store.enabled else []
        return state.history


# ------------------------------------------------------------------- the epoch
def activation_rows(data: ActivationEpoch) -> list[ActivationRow]:
    """One row per selected layer per recorded pass (NaN numbers: the layer did not run)."""
    rows = []
    for r, iteration in enumerate(data.iterations.tolist()):
        for j, info in enumerate(data.layers):
            if not data.selected[r, j]:
                continue
            rows.append(
                ActivationRow(data.epoch, iteration, info.layer_id, info.layer_name, *data.values[r, j].tolist())
            )
    return rows


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def activation_summary(data: ActivationEpoch, alerts: Sequence[Alert]) -> list[ActivationSummary]:
    """Per layer: the epoch's averages (``max_abs``: its maximum) and a status."""
    kinds = {(a.layer_id, a.kind) for a in alerts}
    summary = []
    for j, info in enumerate(data.layers):
        ran = data.recorded[:, j]
        values = data.values[ran, j]
        if values.size:
            dead_last = float(values[-1, STATS.index("dead_frac")])
            top = values[:, STATS.index("max_abs")]
            max_abs = float(np.nanmax(top)) if not np.isnan(top).all() else math.nan
        else:
            dead_last = max_abs = math.nan
        status = (
            "not run"
            if not ran.any()
            else "dead"
            if (info.layer_id, "dead") in kinds
            else "saturated"
            if (info.layer_id, "saturated") in kinds
            else "ok"
        )
        summary.append(
            ActivationSummary(
                layer_id=info.layer_id,
                layer_name=info.layer_name,
                type=info.type,
                recorded=int(ran.sum()),
                mean=_nanmean(values[:, 0]),
                std=_nanmean(values[:, 1]),
                max_abs=max_abs,
                zero_frac=_nanmean(values[:, 3]),
                dead_frac=_nanmean(values[:, 4]),
                dead_frac_last=dead_last,
                saturated_frac=_nanmean(values[:, 5]),
                unit_dim=info.unit_dim,
                units=info.units,
                bounds=list(info.bounds) if info.bounds is not None else None,
                status=status,
            )
        )
    return summary


def find_activation_alerts(
    data: ActivationEpoch,
    history: Sequence[ActivationHistory],
    dead_threshold: float,
    saturated_threshold: float,
) -> list[Alert]:
    """The epoch's ``dead`` and ``saturated`` alerts.

    ``dead``: ``dead_frac`` at the layer's last recorded pass of the epoch is at least
    ``dead_threshold``; the alert's iteration is the first of the unbroken run of recorded
    passes (over every epoch in ``history``) at or above it. ``saturated``: a bounded
    layer's ``saturated_frac`` averages at least ``saturated_threshold`` over the epoch.
    """
    alerts: list[Alert] = []
    series = _series(history)
    dead_col, sat_col = STATS.index("dead_frac"), STATS.index("saturated_frac")
    for j, info in enumerate(data.layers):
        ran = data.recorded[:, j]
        if not ran.any():
            continue
        iterations = data.iterations[ran]
        dead = data.values[ran, j, dead_col]
        last = float(dead[-1])
        if last >= dead_threshold:
            points = series.get(info.key, [])  # the history holds this epoch too
            since_epoch, since = data.epoch, int(iterations[-1])
            for epoch, iteration, value in reversed(points):
                if math.isnan(value):
                    continue
                if value < dead_threshold:
                    break
                since_epoch, since = epoch, iteration
            when = f"iteration {since}" + (f" of epoch {since_epoch}" if since_epoch != data.epoch else "")
            alerts.append(
                Alert(
                    data.epoch,
                    "dead",
                    info.layer_id,
                    info.layer_name,
                    "",
                    since,
                    last,
                    f"layer {info.layer_id} {info.layer_name!r}: {last:.0%} of units dead since {when} "
                    f"(exactly 0 for the whole batch; {info.units} unit(s) along dim {info.unit_dim}; "
                    f"dead_threshold={dead_threshold:g})",
                )
            )
        if info.bounds is not None:
            saturated = data.values[ran, j, sat_col]
            average = _nanmean(saturated)
            if average >= saturated_threshold:
                first = int(iterations[int(np.argmax(saturated >= saturated_threshold))])
                low, high = info.bounds
                alerts.append(
                    Alert(
                        data.epoch,
                        "saturated",
                        info.layer_id,
                        info.layer_name,
                        "",
                        first,
                        average,
                        f"layer {info.layer_id} {info.layer_name!r} ({info.type}): {average:.0%} of outputs "
                        f"saturated on average over epoch {data.epoch} (within {SATURATION_MARGIN:.0%} of the "
                        f"range [{low:g}, {high:g}] from a bound; saturated_threshold={saturated_threshold:g})",
                    )
                )
    return alerts


def _series(history: Sequence[ActivationHistory]) -> dict[tuple[int, str], list[tuple[int, int, float]]]:
    """``(epoch, iteration, dead_frac)`` per layer over the saved epochs, in history order.

    Epochs, not iteration numbers, order the points: a new process counts iterations from 0 again.
    """
    out: dict[tuple[int, str], list[tuple[int, int, float]]] = {}
    column = STATS.index("dead_frac")
    for item in history:
        for k, key in enumerate(item.keys):
            points = out.setdefault(key, [])
            values = item.values[k, :, column].astype(np.float64).tolist()
            points.extend((item.epoch, int(i), v) for i, v in zip(item.iterations.tolist(), values, strict=True))
    return out


def _history_entry(data: ActivationEpoch) -> ActivationHistory:
    values = np.where(data.recorded[:, :, None], data.values, np.nan).transpose(1, 0, 2).astype(np.float32)
    return ActivationHistory(data.epoch, data.iterations.copy(), [info.key for info in data.layers], values)


def heatmap_matrices(
    history: Sequence[ActivationHistory],
) -> tuple[dict[str, np.ndarray], list[tuple[int, str]], np.ndarray, np.ndarray]:
    """Every statistic as ``layers × iterations`` over the saved epochs (NaN: not recorded)."""
    keys = sorted({key for item in history for key in item.keys})
    total = sum(len(h.iterations) for h in history)
    iterations = np.concatenate([h.iterations for h in history]) if history else np.zeros(0, dtype=np.int64)
    epochs = (
        np.concatenate([np.full(len(h.iterations), h.epoch, dtype=np.int64) for h in history])
        if history
        else np.zeros(0, dtype=np.int64)
    )
    cube = np.full((len(keys), total, len(STATS)), np.nan, dtype=np.float32)
    row_of = {key: i for i, key in enumerate(keys)}
    start = 0
    for item in history:
        for k, key in enumerate(item.keys):
            cube[row_of[key], start : start + len(item.iterations)] = item.values[k]
        start += len(item.iterations)
    return {name: cube[:, :, i] for i, name in enumerate(STATS)}, keys, iterations, epochs


def load_activation_history(store: Store) -> list[ActivationHistory]:
    """Every epoch saved in ``save_path`` so far (its ``activation_layers.npz``), oldest first."""
    latest: dict[int, ActivationHistory] = {}
    for entry in manifest_entries(store.outputs(SECTION)):
        if entry.kind != "layers":
            continue
        item = _read_layers(store.root / entry.path)
        if item is not None:
            latest[item.epoch] = item  # a re-saved epoch: the newest save wins
    return [latest[epoch] for epoch in sorted(latest)]


def _read_layers(path: Path) -> ActivationHistory | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(zip(data["layer_ids"].tolist(), data["layer_names"].tolist(), strict=True))
            values = np.stack([data[name] for name in STATS], axis=-1).astype(np.float32)
            return ActivationHistory(int(data["epoch"]), data["iterations"].astype(np.int64), keys, values)
    except (OSError, ValueError, KeyError) as error:
        warnings.warn(
            f"activation heatmap: cannot read {str(path)!r} ({error}); that epoch is left out",
            BBDecoderWarning,
            stacklevel=4,
        )
        return None


def _write_epoch(
    store: Store,
    folder: PurePosixPath | Path,
    data: ActivationEpoch,
    *,
    rows: list[ActivationRow],
    summary: list[ActivationSummary],
    alerts: list[Alert],
    history: list[ActivationHistory],
    thresholds: tuple[float, float],
) -> list[Path]:
    from ..plots import activations as plots

    epoch = data.epoch
    written: list[Path | None] = []

    def put(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        path = layout.relative_path(SECTION, kind, folder=folder, epoch=epoch, **fields)
        return path, {"section": SECTION, "meta": {"epoch": epoch, "kind": kind}}

    path, where = put("csv")
    written.append(store.write_csv(path, ACTIVATION_CSV_HEADER, (csv_cells(row) for row in rows), **where))

    pages = [summary[i : i + _LAYERS_PER_PAGE] for i in range(0, len(summary), _LAYERS_PER_PAGE)]
    for number, page in enumerate(pages, start=1):
        title = f"Activation health, epoch {epoch} ({len(data.iterations)} recorded passes)" + (
            f", page {number} of {len(pages)}" if len(pages) > 1 else ""
        )
        figure = plots.activation_health_figure(
            [f"{s.layer_id} {s.layer_name}" for s in page],
            {name: np.array([getattr(s, name) for s in page], dtype=np.float64) for name in STATS},
            [s.status for s in page],
            title=title,
            dead_threshold=thresholds[0],
            saturated_threshold=thresholds[1],
        )
        path, where = put("figure", page=layout.page_suffix(number, len(pages)))
        written.append(store.save_figure(figure, path, **where))

    this = history[-1]
    path, where = put("layers")
    arrays: dict[str, np.ndarray] = {
        "epoch": np.asarray(epoch),
        "iterations": this.iterations,
        "layer_ids": np.asarray([key[0] for key in this.keys], dtype=np.int64),
        "layer_names": np.asarray([key[1] for key in this.keys], dtype=str),
    }
    arrays.update({name: this.values[:, :, i] for i, name in enumerate(STATS)})
    written.append(store.write_npz(path, arrays, **where))

    matrices, keys, iterations, epochs = heatmap_matrices(history)
    heat = plots.activation_heatmap_figure(
        matrices["dead_frac"],
        matrices["saturated_frac"],
        [f"{layer_id} {name}" for layer_id, name in keys],
        iterations,
        epochs,
        title=f"Dead and saturated fractions per layer, epochs so far (to {epoch})",
    )
    path, where = put("heatmap")
    written.append(store.save_figure(heat, path, **where))

    report = ActivationEpochReport(
        epoch=epoch,
        iterations=[int(data.iterations[0]), int(data.iterations[-1])],
        recorded_iterations=len(data.iterations),
        layers=len(data.layers),
        dead_threshold=thresholds[0],
        saturated_threshold=thresholds[1],
        saturation_margin=SATURATION_MARGIN,
        alerts=alerts,
        summary=summary,
    )
    path, where = put("alerts")
    written.append(store.write_json(path, report.to_json(), **where))
    return [p for p in written if p is not None]


# ----------------------------------------------------------------------- checks
def _selection_key(layer_inds: Selector) -> Any:
    items = layer_inds if isinstance(layer_inds, (list, tuple)) else (layer_inds,)
    key = (type(layer_inds).__name__, tuple((type(item).__name__, item) for item in items))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _check_collect(value: Any) -> int:
    """``collect_acts`` as a period: 0 (never), 1 (every call) or k."""
    if isinstance(value, (bool, np.bool_)):
        return int(bool(value))
    if not isinstance(value, numbers.Integral):
        raise BBDecoderTypeError(
            f"collect_acts must be True, False or a positive int k (every k-th call), "
            f"got {type(value).__name__} {value!r}"
        )
    if value < 1:
        raise BBDecoderValueError(
            f"collect_acts must be True, False or a positive int k (every k-th call), got collect_acts={value}"
        )
    return int(value)


def _check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BBDecoderTypeError(f"{name} must be a number between 0 and 1, got {type(value).__name__} {value!r}")
    if not 0 < float(value) <= 1:
        raise BBDecoderValueError(f"{name} must lie in (0, 1], got {name}={value!r}")
    return float(value)
