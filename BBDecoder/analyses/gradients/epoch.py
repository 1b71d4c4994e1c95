"""One saved epoch of gradient statistics as plain host data, and the tables derived from it.

:class:`EpochData` holds no tensor and no module: numbers, and a :class:`ColumnInfo` per
recorded tensor. Everything the files, the alerts and the exporters need is computed
from it here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...core.layers import ROOT_NAME
from ...output.schema import GradientRow, TensorSummary
from .recorder import Recorder


@dataclass(frozen=True)
class ColumnInfo:
    """One recorded parameter tensor, as plain data."""

    index: int
    layer_id: int
    layer_name: str
    param: str
    numel: int
    frozen: bool
    tied: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``"3 layer1.0.conv1.weight"``: layer ID, then the parameter's full name."""
        if self.layer_name == ROOT_NAME:
            return f"{self.layer_id} {self.param}"
        return f"{self.layer_id} {self.layer_name}.{self.param}"

    @property
    def key(self) -> tuple[int, str]:
        """``(layer_id, layer_name)``: the layer the tensor is recorded under."""
        return self.layer_id, self.layer_name


@dataclass
class EpochData:
    """One epoch's numbers on the host, ready for tables and figures."""

    epoch: int
    iterations: np.ndarray  # (R,)
    columns: list[ColumnInfo]  # recorded this epoch, in column order
    values: np.ndarray  # (R, C, 4): l1, l2, max_abs, nonfinite (NaN: missing)
    recorded: np.ndarray  # (R, C) bool: the column was selected at that row
    skipped: np.ndarray  # (R,) bool: a GradScaler will skip this step

    @classmethod
    def from_recorder(cls, recorder: Recorder, epoch: int) -> EpochData:
        """The recorder's rows since the last save (one host copy)."""
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
        columns = []
        for index in used:
            c = recorder.by_index(index)
            frozen = not c.parameter.requires_grad
            columns.append(ColumnInfo(c.index, c.layer_id, c.layer_name, c.param, c.numel, frozen, c.tied))
        return cls(
            epoch=epoch,
            iterations=np.array(recorder.iterations, dtype=np.int64),
            columns=columns,
            values=values,
            recorded=recorded,
            skipped=scaled & bad.any(axis=1),
        )

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


def layer_norms(data: EpochData) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
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


def tensor_summary(data: EpochData) -> list[TensorSummary]:
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
            status = "frozen" if column.frozen else "missing"
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
        if column.tied:
            notes.append(f"tied to {', '.join(column.tied)} (recorded once)")
        rows.append(
            TensorSummary(
                label=column.label,
                layer_id=column.layer_id,
                layer_name=column.layer_name,
                param=column.param,
                numel=column.numel,
                mean_abs=mean,
                max_abs=top,
                status=status,
                nonfinite_iterations=bad,
                missing_iterations=missing,
                tied_to=", ".join(column.tied),
                note="; ".join(notes),
            )
        )
    return rows


def gradient_rows(data: EpochData) -> list[GradientRow]:
    """One row per recorded (iteration, tensor); a missing gradient's numbers are NaN."""
    mean_abs = data.mean_abs
    present = data.present
    rows: list[GradientRow] = []
    nan = math.nan
    for r, iteration in enumerate(data.iterations.tolist()):
        for j in np.flatnonzero(data.recorded[r]).tolist():
            column = data.columns[j]
            head = (data.epoch, iteration, column.layer_id, column.layer_name, column.param)
            if present[r, j]:
                l1, l2, top, bad = data.values[r, j].tolist()
                rows.append(GradientRow(*head, float(mean_abs[r, j]), top, l1, l2, float(int(bad))))
            else:
                rows.append(GradientRow(*head, nan, nan, nan, nan, nan))
    return rows
