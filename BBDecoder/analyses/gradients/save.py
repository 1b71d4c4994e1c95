"""Writing one epoch of gradient statistics, and reading earlier epochs back from ``save_path``.

Files (names from :mod:`BBDecoder.output.layout`, section ``"gradients"``): the flow chart,
the norm curves (paged), the CSV of every number, this epoch's per-layer norms
(``layers.npz``, stored once per epoch), the heatmap over every epoch so far (assembled
from those ``layers.npz`` files, so a new process continues it), and ``alerts.json`` (a
:class:`~BBDecoder.output.schema.GradientEpochReport`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ...errors import BBDecoderWarning
from ...output import layout
from ...output.schema import (
    GRADIENT_CSV_HEADER,
    Alert,
    GradientEpochReport,
    GradientRow,
    TensorSummary,
    csv_cells,
    manifest_entries,
)
from ...output.store import Store
from .alerts import Thresholds
from .epoch import EpochData

SECTION = "gradients"


@dataclass
class LayerHistory:
    """Per-layer L2 norms of one saved epoch: the heatmap's columns for that epoch."""

    epoch: int
    iterations: np.ndarray  # (R,)
    keys: list[tuple[int, str]]  # (layer_id, layer_name) per row of l2
    l2: np.ndarray  # (layers, R) float32, NaN: not recorded


def history_entry(data: EpochData, norms: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]) -> LayerHistory:
    """This epoch's contribution to the heatmap."""
    keys = list(norms)
    l2 = np.stack([norms[key][1] for key in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)
    return LayerHistory(data.epoch, data.iterations.copy(), keys, l2)


def load_history(store: Store) -> list[LayerHistory]:
    """Every epoch saved in ``save_path`` so far, oldest first (what a resumed run continues).

    Reads each epoch's ``layers.npz``; in a folder written by release 0.1.0, first the newest
    ``heatmap.npz`` (which held every epoch up to it).
    """
    saved = manifest_entries(store.outputs(SECTION))
    history: list[LayerHistory] = []
    old = [e for e in saved if e.kind == "heatmap" and e.suffix == ".npz"]
    if old:  # written by 0.1.0: its newest cumulative heatmap holds every epoch up to it
        history = _read_old_heatmap(store, old[-1].path)
    for entry in saved:
        if entry.kind == "layers":
            item = _read_layers(store, entry.path)
            if item is not None:
                history.append(item)
    latest: dict[int, LayerHistory] = {}
    for item in history:  # a re-saved epoch number: the newest save wins
        latest[item.epoch] = item
    return [latest[epoch] for epoch in sorted(latest)]


def heatmap_matrix(history: Sequence[LayerHistory]) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Stack the saved epochs' per-layer L2 into ``layers × iterations`` (NaN: not recorded)."""
    keys = sorted({key for item in history for key in item.keys})
    iterations = np.concatenate([h.iterations for h in history]) if history else np.zeros(0, dtype=np.int64)
    epochs = (
        np.concatenate([np.full(len(h.iterations), h.epoch, dtype=np.int64) for h in history])
        if history
        else np.zeros(0, dtype=np.int64)
    )
    matrix = np.full((len(keys), len(iterations)), np.nan, dtype=np.float32)
    row_of = {key: i for i, key in enumerate(keys)}
    start = 0
    for item in history:
        for k, key in enumerate(item.keys):
            matrix[row_of[key], start : start + len(item.iterations)] = item.l2[k]
        start += len(item.iterations)
    labels = [f"{layer_id} {name}" for layer_id, name in keys]
    return matrix, labels, iterations, epochs


def write_epoch(
    store: Store,
    folder: PurePosixPath | Path,
    data: EpochData,
    *,
    summary: list[TensorSummary],
    rows: list[GradientRow],
    alerts: list[Alert],
    norms: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]],
    history: list[LayerHistory],
    thresholds: Thresholds,
) -> list[Path]:
    """Write every file of one epoch; returns the paths written (``[]`` off rank 0).

    ``history`` must already include this epoch (see :func:`history_entry`).
    """
    from ...plots import gradients as plots

    epoch = data.epoch
    written: list[Path | None] = []

    def put(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        path = layout.relative_path(SECTION, kind, folder=folder, epoch=epoch, **fields)
        return path, {"section": SECTION, "meta": {"epoch": epoch, "kind": kind}}

    skipped = data.iterations[data.skipped]
    flow_data: dict[str, Any] = {
        "labels": [row.label for row in summary],
        "mean_abs": np.array([row.mean_abs for row in summary], dtype=np.float64),
        "max_abs": np.array([row.max_abs for row in summary], dtype=np.float64),
        "status": [row.status for row in summary],
        "notes": [row.note for row in summary],
        "title": f"Gradient flow, epoch {epoch} ({len(data.iterations)} recorded iterations"
        + (f", {len(skipped)} skipped by GradScaler)" if len(skipped) else ")"),
        "vanish_threshold": thresholds.vanish,
        "explode_threshold": thresholds.explode,
    }
    # past FLOW_PAGE tensors the chart shows groups; each tensor's numbers are in alerts.json
    # (the report's table one level down), and plots.gradient_flow_pages draws them as pages
    path, where = put("flow")
    written.append(store.save_figure(plots.gradient_flow_figure(**flow_data), path, **where))

    panels = []
    for (layer_id, name), (l1, l2) in norms.items():
        frozen = all(c.frozen for c in data.columns if c.key == (layer_id, name))
        note = "frozen (requires_grad=False)" if frozen else ""
        panels.append(plots.NormPanel(f"{layer_id} {name}", data.iterations, l1, l2, note=note))
    # one log range over every page, so a layer on page 3 compares with one on page 1
    pages = plots.norm_curves_pages(panels, title=f"Gradient norms per layer, epoch {epoch}", skipped=skipped)
    for number, figure in enumerate(pages, start=1):
        path, where = put("norms", page=layout.page_suffix(number, len(pages)))
        written.append(store.save_figure(figure, path, **where))

    path, where = put("csv")
    written.append(store.write_csv(path, GRADIENT_CSV_HEADER, (csv_cells(row) for row in rows), **where))

    this = history[-1]
    path, where = put("layers")
    layer_arrays = {
        "epoch": np.asarray(epoch),
        "iterations": this.iterations,
        "layer_ids": np.asarray([key[0] for key in this.keys], dtype=np.int64),
        "layer_names": np.asarray([key[1] for key in this.keys], dtype=str),
        "l2": this.l2,
    }
    written.append(store.write_npz(path, layer_arrays, **where))

    matrix, labels, iterations, epochs = heatmap_matrix(history)
    heat = plots.gradient_heatmap_figure(
        matrix, labels, iterations, epochs, title=f"Per-layer gradient L2 norm, epochs so far (to {epoch})"
    )
    path, where = put("heatmap")
    written.append(store.save_figure(heat, path, **where))

    report = GradientEpochReport(
        epoch=epoch,
        iterations=[int(data.iterations[0]), int(data.iterations[-1])],
        recorded_iterations=len(data.iterations),
        tensors=len(data.columns),
        vanish_threshold=thresholds.vanish,
        explode_threshold=thresholds.explode,
        alerts=alerts,
        skipped_iterations=[int(i) for i in skipped],
        missing=[row.label for row in summary if row.status in ("missing", "frozen")],
        summary=summary,
    )
    path, where = put("alerts")
    written.append(store.write_json(path, report.to_json(), **where))
    return [p for p in written if p is not None]


# ----------------------------------------------------------------------- readers
def _read_layers(store: Store, path: str) -> LayerHistory | None:
    try:
        with np.load(store.root / path, allow_pickle=False) as data:
            keys = list(zip(data["layer_ids"].tolist(), data["layer_names"].tolist(), strict=True))
            return LayerHistory(int(data["epoch"]), data["iterations"].astype(np.int64), keys, data["l2"])
    except (OSError, ValueError, KeyError) as error:
        warnings.warn(
            f"gradient heatmap: cannot read {path!r} ({error}); that epoch is left out", BBDecoderWarning, stacklevel=4
        )
        return None


def _read_old_heatmap(store: Store, path: str) -> list[LayerHistory]:
    """Release 0.1.0's cumulative ``heatmap.npz``: labels ``"ID name"``, every epoch's columns."""
    try:
        with np.load(store.root / path, allow_pickle=False) as data:
            l2, labels, iterations, epochs = data["l2"], data["layers"].tolist(), data["iterations"], data["epochs"]
    except (OSError, ValueError, KeyError):
        return []
    keys = []
    for label in labels:
        head, _, name = str(label).partition(" ")
        keys.append((int(head), name) if head.lstrip("-").isdigit() else (-1, str(label)))
    history = []
    for epoch in dict.fromkeys(epochs.tolist()):
        columns = epochs == epoch
        history.append(LayerHistory(int(epoch), iterations[columns].astype(np.int64), keys, l2[:, columns]))
    return history
