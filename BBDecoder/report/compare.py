"""Several runs side by side: one static, self-contained ``compare.html`` (issue 15).

:func:`compare_runs` reads only what each ``save_path`` holds on disk: ``run.json``
(:class:`~BBDecoder.output.schema.RunRecord`), ``manifest.json``
(:class:`~BBDecoder.output.schema.ManifestEntry`), the per-epoch CSVs of gradients,
activations and updates (:class:`GradientRow`, :class:`ActivationRow`, :class:`UpdateRow`
through :func:`~BBDecoder.output.schema.row_from_csv`), the per-epoch alert reports, and the
weight-histogram ``.npz`` files. Nothing is written into the runs' folders and no model is
needed. Layers are matched by name; what only some runs have is listed, not drawn.

The page overlays the runs (one colour each): per-layer gradient L2 norm over iterations,
update-to-weight ratio over steps (1e-3 guide), dead (solid) and saturated (dashed)
fractions of activations, weight std over the histogram calls, and lists the alerts of
each run side by side. Figures are embedded as PNG data, so the page is one file that
opens anywhere with no network.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .._version import __version__
from ..errors import BBDecoderTypeError, BBDecoderValueError, SavePathError
from ..output.schema import (
    ActivationEpochReport,
    ActivationRow,
    Alert,
    GradientEpochReport,
    GradientRow,
    ManifestEntry,
    Record,
    RunRecord,
    SchemaError,
    UpdateEpochReport,
    UpdateRow,
    manifest_entries,
    row_from_csv,
)
from ..output.store import MANIFEST_NAME, RUN_NAME, Store

COMPARE_NAME = "compare.html"
TEMPLATE = "compare.html.j2"
_REPORTS: dict[str, type[GradientEpochReport] | type[ActivationEpochReport] | type[UpdateEpochReport]] = {
    "gradients": GradientEpochReport,
    "activations": ActivationEpochReport,
    "updates": UpdateEpochReport,
}
_SEVERITY = {
    "nonfinite": "error",
    "exploding": "error",
    "update_large": "error",
    "dead": "warning",
    "vanishing": "warning",
    "saturated": "warning",
    "update_small": "warning",
}
_KIND_TITLES = {
    "nonfinite": "NaN/Inf gradient",
    "exploding": "Exploding gradient",
    "vanishing": "Vanishing gradient",
    "dead": "Dead units",
    "saturated": "Saturated activations",
    "update_large": "Updates too large",
    "update_small": "Updates too small",
}
R = TypeVar("R", bound=Record)
LayerKey = str  # layers are matched by name across runs


# ----------------------------------------------------------------------- reading
@dataclass
class RunData:
    """What one ``save_path`` holds, as typed records."""

    name: str
    root: Path
    record: RunRecord
    gradients: list[GradientRow] = field(default_factory=list)
    activations: list[ActivationRow] = field(default_factory=list)
    updates: list[UpdateRow] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    # (layer name, param) -> [(call, mean, std)] from the weight histograms
    weights: dict[tuple[str, str], list[tuple[int, float, float]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def layer_names(self) -> list[str]:
        """The numbered layers of ``run.json``, in ID order."""
        return [layer.name for layer in sorted(self.record.layers, key=lambda layer: layer.id)]


def load_run(path: str | os.PathLike[str], name: str | None = None) -> RunData:
    """Read one BBDecoder ``save_path`` (nothing is written).

    Args:
        path: the folder a ``Master_analyzer`` wrote to.
        name: how the run is called on the page (default: the folder's name).

    Returns:
        The run's records; files that cannot be read are listed in ``problems``.

    Raises:
        BBDecoderTypeError: ``path`` is not a path.
        SavePathError: ``path`` is not a folder holding ``run.json`` or ``manifest.json``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise BBDecoderTypeError(f"a run must be a str or os.PathLike folder, got {type(path).__name__} {path!r:.80}")
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise SavePathError(f"run {str(path)!r} is {'a file' if root.exists() else 'missing'}; give a save_path folder")
    if not (root / RUN_NAME).is_file() and not (root / MANIFEST_NAME).is_file():
        raise SavePathError(
            f"run {str(path)!r} holds neither {RUN_NAME} nor {MANIFEST_NAME}: it is not a BBDecoder save_path"
        )
    problems: list[str] = []
    raw_run = _read_json(root / RUN_NAME, problems)
    try:
        record = RunRecord.from_json(raw_run) if raw_run is not None else RunRecord()
    except SchemaError as error:
        problems.append(f"{RUN_NAME}: {error}")
        record = RunRecord()
    raw_manifest = _read_json(root / MANIFEST_NAME, problems)
    entries = manifest_entries(raw_manifest) if isinstance(raw_manifest, list) else []
    run = RunData(name or root.name, root, record, problems=problems)
    run.gradients = _read_rows(root, _latest_per_epoch(entries, "gradients", "csv"), GradientRow, problems)
    run.activations = _read_rows(root, _latest_per_epoch(entries, "activations", "csv"), ActivationRow, problems)
    run.updates = _read_rows(root, _latest_per_epoch(entries, "updates", "csv"), UpdateRow, problems)
    for section, report in _REPORTS.items():
        for entry in _latest_per_epoch(entries, section, "alerts"):
            data = _read_json(_inside(root, entry), problems) if _inside(root, entry) else None
            if data is None:
                continue
            try:
                run.alerts.extend(report.from_json(data).alerts)
            except SchemaError as error:
                problems.append(f"{entry.path}: {error}")
    run.weights = _read_weights(root, entries, problems)
    return run


def _inside(root: Path, entry: ManifestEntry) -> Path | None:
    """The entry's file when it lies inside ``root`` (or is marked external), else ``None``."""
    candidate = Path(os.path.normpath(root / entry.path))
    if entry.extra.get("external") is True or candidate == root or root in candidate.parents:
        return candidate
    return None


def _latest_per_epoch(entries: Sequence[ManifestEntry], section: str, kind: str) -> list[ManifestEntry]:
    """One entry per epoch (the newest: a re-saved epoch replaces the earlier one), in epoch order."""
    chosen: dict[int, ManifestEntry] = {}
    for entry in entries:
        if entry.section == section and entry.kind == kind and entry.epoch is not None:
            chosen[entry.epoch] = entry
    return [chosen[epoch] for epoch in sorted(chosen)]


def _read_json(path: Path | None, problems: list[str]) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        problems.append(f"{path.name}: cannot be read ({error})")
        return None


def _read_rows(root: Path, entries: Iterable[ManifestEntry], record: type[R], problems: list[str]) -> list[R]:
    rows: list[R] = []
    for entry in entries:
        path = _inside(root, entry)
        if path is None or not path.is_file():
            problems.append(f"{entry.path}: listed in the manifest but missing")
            continue
        bad = 0
        try:
            with path.open(newline="", encoding="utf-8") as stream:
                for cells in csv.DictReader(stream):
                    try:
                        rows.append(row_from_csv(record, cells))
                    except SchemaError:
                        bad += 1
        except (OSError, csv.Error, UnicodeDecodeError) as error:
            problems.append(f"{entry.path}: cannot be read ({error})")
        if bad:
            problems.append(f"{entry.path}: {bad} row(s) could not be parsed and were left out")
    return rows


def _read_weights(
    root: Path, entries: Sequence[ManifestEntry], problems: list[str]
) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    from ..analyses.weights import load_histograms

    weights: dict[tuple[str, str], dict[int, tuple[float, float]]] = {}
    for entry in entries:
        if entry.section != "weights" or entry.kind != "data" or entry.suffix != ".npz":
            continue
        path = _inside(root, entry)
        if path is None or not path.is_file():
            continue
        try:
            layer = load_histograms(path)
        except (OSError, ValueError, KeyError) as error:
            problems.append(f"{entry.path}: cannot be read ({error})")
            continue
        for param in layer.params:
            weights.setdefault((layer.layer_name, param.name), {})[layer.call] = (param.mean, param.std)
    return {key: [(call, *calls[call]) for call in sorted(calls)] for key, calls in weights.items()}


# ---------------------------------------------------------------------- curves
def gradient_curves(rows: Sequence[GradientRow]) -> dict[LayerKey, tuple[np.ndarray, np.ndarray]]:
    """Per layer name: iterations and the layer's gradient L2 norm (root of its tensors' summed squares)."""
    sums: dict[LayerKey, dict[tuple[int, int], float]] = {}
    for row in rows:
        if math.isnan(row.l2):
            continue
        per = sums.setdefault(row.layer_name, {})
        key = (row.epoch, row.iteration)
        per[key] = per.get(key, 0.0) + row.l2**2
    return {name: _xy({k: math.sqrt(v) for k, v in per.items()}) for name, per in sums.items()}


def update_curves(rows: Sequence[UpdateRow]) -> dict[LayerKey, tuple[np.ndarray, np.ndarray]]:
    """Per layer name: steps and the layer's ‖Δw‖/‖w‖ (its tensors together)."""
    sums: dict[LayerKey, dict[tuple[int, int], list[float]]] = {}
    for row in rows:
        if math.isnan(row.update_norm) or math.isnan(row.weight_norm):
            continue
        cell = sums.setdefault(row.layer_name, {}).setdefault((row.epoch, row.step), [0.0, 0.0])
        cell[0] += row.update_norm**2
        cell[1] += row.weight_norm**2
    out = {}
    for name, per in sums.items():
        out[name] = _xy({k: math.sqrt(u) / math.sqrt(w) if w > 0 else math.nan for k, (u, w) in per.items()})
    return out


def activation_curves(rows: Sequence[ActivationRow], stat: str) -> dict[LayerKey, tuple[np.ndarray, np.ndarray]]:
    """Per layer name: iterations and one activation statistic (``"dead_frac"``, ``"saturated_frac"``…)."""
    per: dict[LayerKey, dict[tuple[int, int], float]] = {}
    for row in rows:
        per.setdefault(row.layer_name, {})[(row.epoch, row.iteration)] = float(getattr(row, stat))
    return {name: _xy(values) for name, values in per.items()}


def _xy(values: dict[tuple[int, int], float]) -> tuple[np.ndarray, np.ndarray]:
    """``{(epoch, iteration): value}`` as a curve over the run, in epoch order.

    An epoch written by a later process counts its iterations from 0 again; such an epoch is
    placed right after the one before it, so a resumed run reads as one run (the curve's x is
    the iteration where the numbering continued, shifted where it restarted).
    """
    xs: list[float] = []
    current, offset, last = None, 0, -1
    for epoch, iteration in sorted(values):
        if epoch != current:
            current = epoch
            offset = max(0, last + 1 - iteration)
        last = iteration + offset
        xs.append(float(last))
    return np.asarray(xs, dtype=np.float64), np.asarray([values[k] for k in sorted(values)], dtype=np.float64)


# ---------------------------------------------------------------------- sections
def _figures(
    runs: Sequence[RunData],
    curves: Sequence[dict[LayerKey, tuple[np.ndarray, np.ndarray]]],
    order: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    log: bool = True,
    ylim: tuple[float, float] | None = None,
    guide: float | None = None,
    extra: Sequence[dict[LayerKey, tuple[np.ndarray, np.ndarray]]] | None = None,
    styles: Sequence[tuple[str, str]] = (),
    skip_zero: bool = False,
) -> dict[str, Any]:
    """Overlay figures of the layers every run with data has, and what the others lack.

    With ``skip_zero``, layers whose values are 0 (or missing) in every run are listed, not drawn.
    """
    from ..plots.compare import PANELS_PER_FIGURE, OverlayPanel, Series, overlay_figure

    having = [i for i, c in enumerate(curves) if c]
    if not having:
        return {"present": False, "figures": [], "shared": [], "only": [], "missing_runs": [], "flat": []}
    shared = [name for name in order if all(name in curves[i] for i in having)]
    only = []
    for i, run in enumerate(runs):
        if i not in having:
            continue
        own = [name for name in order if name in curves[i] and name not in shared]
        if own:
            only.append({"run": run.name, "layers": own})
    missing_runs = [runs[i].name for i in range(len(runs)) if i not in having]
    flat: list[str] = []
    if skip_zero:
        sources = [curves, *([extra] if extra is not None else [])]

        def zero(name: str) -> bool:
            return all(
                not np.nan_to_num(source[i][name][1]).any() for source in sources for i in having if name in source[i]
            )

        flat = [name for name in shared if zero(name)]
    panels = []
    for name in shared:
        if name in flat:
            continue
        series: list[list[Series]] = []
        for i in range(len(runs)):
            lines = []
            if name in curves[i]:
                lines.append(Series(*curves[i][name]))
            if extra is not None and name in extra[i] and np.isfinite(extra[i][name][1]).any():
                lines.append(Series(*extra[i][name], style="--"))
            series.append(lines)
        panels.append(OverlayPanel(name, series))
    images = []
    pages = [panels[k : k + PANELS_PER_FIGURE] for k in range(0, len(panels), PANELS_PER_FIGURE)]
    for number, page in enumerate(pages, start=1):
        suffix = f" (page {number} of {len(pages)})" if len(pages) > 1 else ""
        figure = overlay_figure(
            page,
            [run.name for run in runs],
            title=title + suffix,
            xlabel=xlabel,
            ylabel=ylabel,
            log=log,
            ylim=ylim,
            guide=guide,
            styles=styles,
        )
        images.append({"src": _data_uri(figure), "alt": title + suffix})
    return {
        "present": True,
        "figures": images,
        "shared": shared,
        "only": only,
        "missing_runs": missing_runs,
        "flat": flat,
    }


def _weight_curves(run: RunData) -> dict[LayerKey, tuple[np.ndarray, np.ndarray]]:
    return {
        f"{layer}.{param}": (
            np.asarray([c for c, _, _ in calls], dtype=np.float64),
            np.asarray([s for _, _, s in calls], dtype=np.float64),
        )
        for (layer, param), calls in run.weights.items()
    }


def _alert_table(runs: Sequence[RunData]) -> dict[str, Any]:
    kinds = [k for k in _KIND_TITLES if any(a.kind == k for run in runs for a in run.alerts)]
    kinds += sorted({a.kind for run in runs for a in run.alerts} - set(kinds))
    rows = []
    for kind in kinds:
        cells = []
        for run in runs:
            found = [a for a in run.alerts if a.kind == kind]
            layers = list(dict.fromkeys(f"{a.layer_id} {a.layer_name}" for a in found))
            cells.append({"count": len(found), "layers": layers, "messages": [a.message for a in found[:8]]})
        rows.append(
            {
                "kind": kind,
                "title": _KIND_TITLES.get(kind, kind.replace("_", " ").capitalize()),
                "severity": _SEVERITY.get(kind, "warning"),
                "cells": cells,
            }
        )
    return {"rows": rows, "totals": [len(run.alerts) for run in runs]}


def _differences(runs: Sequence[RunData]) -> list[str]:
    """Sentences on what the runs do not share (model, layers)."""
    notes = []
    models = {run.record.model or "?" for run in runs}
    if len(models) > 1:
        notes.append(
            "The runs are of different models ("
            + ", ".join(f"{run.name}: {run.record.model or '?'}" for run in runs)
            + "); only layers with the same name are overlaid."
        )
    names = [set(run.layer_names) for run in runs]
    common = set.intersection(*names) if names else set()
    for run in runs:
        extra = [name for name in run.layer_names if name not in common]
        if extra:
            shown = ", ".join(extra[:12]) + (f" and {len(extra) - 12} more" if len(extra) > 12 else "")
            notes.append(f"Only {run.name} has layer(s) {shown}.")
    depths = {run.record.depth for run in runs}
    if len(depths) > 1:
        notes.append("The runs numbered their layers at different depths, so layer IDs differ; names are matched.")
    return notes


def collect_comparison(runs: Sequence[RunData], *, title: str | None = None) -> dict[str, Any]:
    """Everything the comparison page shows, as plain data (figures as data URIs)."""
    from ..plots.compare import run_colors

    order: list[str] = []
    for run in runs:
        for name in run.layer_names:
            if name not in order:
                order.append(name)
    for run in runs:  # layers named only in the data (the root's own parameters)
        for rows in (run.gradients, run.updates, run.activations):
            for row in rows:
                if row.layer_name not in order:
                    order.append(row.layer_name)
    weight_order = list(dict.fromkeys(f"{layer}.{param}" for run in runs for layer, param in run.weights))
    weight_order.sort(key=lambda key: order.index(key.rsplit(".", 1)[0]) if key.rsplit(".", 1)[0] in order else 1e9)
    colors = run_colors(len(runs))
    sections = {
        "gradients": _figures(
            runs,
            [gradient_curves(run.gradients) for run in runs],
            order,
            title="Gradient L2 norm per layer",
            xlabel="iteration",
            ylabel="‖g‖₂ of the layer (log)",
        ),
        "updates": _figures(
            runs,
            [update_curves(run.updates) for run in runs],
            order,
            title="Update-to-weight ratio ‖Δw‖/‖w‖ per layer (dashed: 1e-3)",
            xlabel="optimizer step",
            ylabel="‖Δw‖/‖w‖ (log)",
            guide=1e-3,
        ),
        "activations": _figures(
            runs,
            [activation_curves(run.activations, "dead_frac") for run in runs],
            order,
            title="Activation health per layer: dead units (solid), saturated outputs (dashed)",
            xlabel="iteration",
            ylabel="fraction",
            log=False,
            ylim=(-0.02, 1.02),
            extra=[activation_curves(run.activations, "saturated_frac") for run in runs],
            styles=(("-", "dead units"), ("--", "saturated")),
            skip_zero=True,
        ),
        "weights": _figures(
            runs,
            [_weight_curves(run) for run in runs],
            weight_order,
            title="Weight std per tensor over the histogram calls",
            xlabel="visualize_weight_hist call",
            ylabel="std of the weights (log)",
        ),
    }
    facts = []
    for run, color in zip(runs, colors, strict=True):
        rec = run.record
        epochs = sorted({row.epoch for rows in (run.gradients, run.activations, run.updates) for row in rows})
        facts.append(
            {
                "name": run.name,
                "color": color,
                "path": str(run.root),
                "model": rec.model or "?",
                "params": rec.totals.get("params"),
                "layers": len(rec.layers),
                "depth": rec.depth,
                "epochs": epochs,
                "created": rec.created,
                "version": rec.version,
                "alerts": len(run.alerts),
                "problems": run.problems,
            }
        )
    names = [run.name for run in runs]
    return {
        "title": title or f"BBDecoder comparison: {' vs '.join(names)}",
        "runs": facts,
        "differences": _differences(runs),
        "alerts": _alert_table(runs),
        "sections": sections,
        "library_version": __version__,
    }


def render_comparison(context: dict[str, Any]) -> str:
    """The comparison page (autoescaped) for a context from :func:`collect_comparison`."""
    from .builder import template_environment

    environment = template_environment()
    environment.filters["count"] = _format_count
    return environment.get_template(TEMPLATE).render(**context)


def compare_runs(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Write ``out/compare.html``: the runs in ``paths`` overlaid on one static page.

    Args:
        paths: two or more ``save_path`` folders (written now or by earlier processes).
        out: the folder for ``compare.html`` (created if missing; the page is rewritten in
            place on each call, like ``report.html``).
        names: how the runs are called on the page (default: their folder names, made
            unique).
        title: the page title.

    Returns:
        The path of ``compare.html``.

    Raises:
        BBDecoderTypeError: ``paths`` is not a list of paths, or ``names`` not strings.
        BBDecoderValueError: fewer than two runs, or ``names`` of another length.
        SavePathError: a path is not a BBDecoder ``save_path``, or ``out`` is a file.
    """
    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence):
        raise BBDecoderTypeError(f"paths must be a list of save_path folders, got {type(paths).__name__} {paths!r:.80}")
    if len(paths) < 2:
        raise BBDecoderValueError(f"compare_runs needs at least two runs, got {len(paths)}: {list(paths)!r:.120}")
    if names is not None:
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise BBDecoderTypeError(f"names must be a list of non-empty strings, got {names!r:.80}")
        if len(names) != len(paths):
            raise BBDecoderValueError(f"names must name every run: {len(paths)} runs, got {len(names)} names")
    chosen = (
        list(names) if names is not None else _unique([Path(os.fspath(p)).expanduser().resolve().name for p in paths])
    )
    runs = [load_run(path, name) for path, name in zip(paths, chosen, strict=True)]
    html = render_comparison(collect_comparison(runs, title=title))
    store = Store(out)
    written = store.write_text(COMPARE_NAME, html, overwrite=True)
    return written if written is not None else store.root / COMPARE_NAME


# ----------------------------------------------------------------------- helpers
def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(name if count == 0 else f"{name} ({count + 1})")
    return out


def _data_uri(figure: Any, dpi: int = 90) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)  # the figure lays itself out: one draw, no tight box
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _format_count(value: Any) -> str:
    return (
        f"{value:,}"
        if isinstance(value, int) and not isinstance(value, bool)
        else ("" if value is None else str(value))
    )
