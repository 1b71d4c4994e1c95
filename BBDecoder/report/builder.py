"""Turn a ``save_path`` (its ``manifest.json`` and ``run.json``) into one static ``report.html``.

The report is built from what is on disk, never from live objects, so it works for a folder
written by an earlier process and for runs where only some analyses were called. Data flows
one way: manifest entries → plain dictionaries (:func:`collect`) → the Jinja2 template
(autoescaped) → :meth:`Store.write_text`. Images and videos are referenced by relative path,
so the page opens from the file system with no server and no network.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import BBDecoderTypeError, SavePathError
from ..output.schema import (
    ActivationEpochReport,
    CostRow,
    GradientEpochReport,
    ManifestEntry,
    RunRecord,
    SchemaError,
    UpdateEpochReport,
    manifest_entries,
    row_from_csv,
)
from ..output.store import MANIFEST_NAME, RUN_NAME, Store

REPORT_NAME = "report.html"
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
_VIDEO_TYPES = {".webm": "video/webm", ".mp4": "video/mp4"}
_DATA_SUFFIXES = {".csv", ".json", ".npy", ".npz", ".gv", ".txt"}
_KNOWN_SECTIONS = (
    "architecture",
    "gradients",
    "activations",
    "updates",
    "weights",
    "similarity",
    "features",
    "video",
    "gradcam",
    "costs",
)
_EPOCH_REPORTS = {"gradients": GradientEpochReport, "activations": ActivationEpochReport, "updates": UpdateEpochReport}
"""The record each section's ``alerts`` JSON holds."""
_COST_COLUMNS = {
    "forward_flops": "Fwd FLOPs",
    "backward_flops": "Bwd FLOPs",
    "forward_ms": "Fwd ms",
    "activation_bytes": "Activations",
}

Entry = ManifestEntry
Frame = dict[str, Any]


# ----------------------------------------------------------------- entry point
def build_report(source: str | os.PathLike[str] | Store, *, title: str | None = None) -> Path:
    """Write ``report.html`` into a BBDecoder ``save_path`` and return its path.

    Args:
        source: the ``save_path`` folder (written now or by an earlier process), or the
            :class:`~BBDecoder.output.store.Store` of a live analyzer.
        title: the page title; defaults to ``"BBDecoder report: <model class>"``.

    Returns:
        The path of ``report.html`` (rewritten on every call; on ranks other than 0 nothing
        is written and the path where rank 0 writes is returned).

    Raises:
        BBDecoderTypeError: ``source`` is not a path or a Store.
        SavePathError: ``source`` is not a folder, or holds neither ``run.json`` nor
            ``manifest.json`` (so it is not a BBDecoder output folder).
    """
    store = source if isinstance(source, Store) else open_save_path(source)
    context = collect(store)
    if title is not None:
        context["title"] = context["heading"] = str(title)
    html = render(context)
    target = store.root / REPORT_NAME
    written = store.write_text(REPORT_NAME, html, overwrite=True)
    return written if written is not None else target


def open_save_path(path: str | os.PathLike[str]) -> Store:
    """The :class:`Store` of an existing BBDecoder output folder (nothing is created).

    Raises:
        BBDecoderTypeError: ``path`` is not a str or ``os.PathLike``.
        SavePathError: ``path`` is missing, a file, or not a BBDecoder output folder.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise BBDecoderTypeError(f"save_path must be a str or os.PathLike, got {type(path).__name__} {path!r:.80}")
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "a file" if root.exists() else "missing"
        raise SavePathError(f"save_path {str(path)!r} is {what}; give the folder a Master_analyzer wrote to")
    if not (root / RUN_NAME).is_file() and not (root / MANIFEST_NAME).is_file():
        raise SavePathError(
            f"save_path {str(path)!r} holds neither {RUN_NAME} nor {MANIFEST_NAME}: "
            "it does not look like a BBDecoder output folder"
        )
    return Store(root)


def template_environment() -> Any:
    """The Jinja environment of the report's templates: autoescaped, strict about missing names."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(context: dict[str, Any]) -> str:
    """Render the report template (autoescaped) with a context from :func:`collect`."""
    environment = template_environment()
    environment.filters["si"] = format_si
    environment.filters["bytes"] = format_bytes
    environment.filters["cell"] = format_cell
    environment.filters["ms"] = format_ms
    return environment.get_template("report.html.j2").render(**context)


# ------------------------------------------------------------------ collection
def collect(store: Store) -> dict[str, Any]:
    """Everything the template shows, as plain data (testable without rendering).

    Manifest entries whose file has gone missing are skipped and listed under ``missing``.
    """
    run = _run_record(store.root / RUN_NAME)
    entries, missing = _present_entries(store)
    by_section: dict[str, list[Entry]] = {}
    for entry in entries:
        by_section.setdefault(entry.section, []).append(entry)

    costs = _costs(store.root, by_section.get("costs", []))
    health = [e for name in ("gradients", "activations", "updates") for e in by_section.get(name, [])]
    alerts = _alerts(store.root, health)  # every alerts.json: gradients, activation health, update ratios
    layers = _layer_rows(run, costs["by_id"], {a["layer_id"] for a in alerts if a.get("layer_id") is not None})
    sections = {
        "architecture": _architecture(by_section.get("architecture", [])),
        "gradients": _gradients(store.root, by_section.get("gradients", [])),
        "activations": _health(
            by_section.get("activations", []), "Activation health (std, max |a|, zero, dead and saturated fractions)"
        ),
        "updates": _health(by_section.get("updates", []), "Update-to-weight ratio ‖Δw‖/‖w‖ per layer"),
        "weights": _weights(by_section.get("weights", [])),
        "similarity": _similarity(by_section.get("similarity", [])),
        "features": _features(by_section.get("features", []), by_section.get("video", [])),
        "gradcam": _gradcam(by_section.get("gradcam", [])),
        "costs": costs,
    }
    other = [_asset(e) for name, group in by_section.items() if name not in _KNOWN_SECTIONS for e in group]
    model = run.model or "model"
    # without recorded totals: the top-level layers (a dotted name is a child, counted in its parent)
    params = run.totals.get("params", sum(int(row.get("params") or 0) for row in layers if "." not in row["name"]))
    nav = [
        ("alerts", "Alerts", len(alerts)),
        ("summary", "Layers", len(layers)),
        ("architecture", "Architecture", int(sections["architecture"]["present"])),
        ("gradients", "Gradients", len(sections["gradients"]["frames"])),
        ("activations", "Activations", len(sections["activations"]["frames"])),
        ("updates", "Update ratio", len(sections["updates"]["frames"])),
        ("weights", "Weights", len(sections["weights"]["layers"])),
        ("similarity", "Similarity", len(sections["similarity"]["frames"])),
        ("features", "Features", len(sections["features"]["layers"])),
        ("gradcam", "Grad-CAM", len(sections["gradcam"]["frames"])),
        ("costs", "Costs", int(sections["costs"]["present"])),
    ]
    if other:
        nav.append(("other", "Other files", len(other)))
    return {
        "title": f"BBDecoder report: {model}",
        "heading": model,
        "model": model,
        "run": {
            "version": run.version or None,
            "torch": run.torch or None,
            "python": run.python or None,
            "created": _when(run.created),
            "updated": _when(run.updated),
            "depth": run.depth,
            "input_size": run.input_size,
            "world_size": run.world_size,
            "sessions": len(run.sessions),
        },
        "totals": {"layers": len(layers), "params": params},
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "library_version": __version__,
        "save_path": str(store.root),
        "nav": [{"id": i, "title": t, "count": c} for i, t, c in nav],
        "all_clear": not alerts and sections["gradients"]["present"],
        "alerts": alerts,
        "alert_counts": {s: sum(a["severity"] == s for a in alerts) for s in ("error", "warning", "info")},
        "layers": layers,
        "cost_columns": [{"key": k, "title": t} for k, t in _COST_COLUMNS.items()] if costs["by_id"] else [],
        "missing": missing,
        "other": other,
        **sections,
    }


def _present_entries(store: Store) -> tuple[list[Entry], list[str]]:
    """Typed manifest entries whose file is on disk, and the paths of those that are not."""
    present: list[Entry] = []
    missing: list[str] = []
    for entry in manifest_entries(store.outputs()):
        where = store.locate(entry)  # None: outside save_path and not a folder the user named
        if where is not None and where.is_file():
            present.append(entry)
        else:
            missing.append(entry.path)
    return present, missing


def _run_record(path: Path) -> RunRecord:
    """``run.json`` (this release's or 0.1.0's); an empty record when it is missing or unreadable."""
    try:
        return RunRecord.from_json(_read_json(path))
    except SchemaError:
        return RunRecord()


# ------------------------------------------------------------------- helpers
def _href(path: str) -> str:
    if Path(path).is_absolute():  # a folder the user named, with no relative path from save_path
        return Path(path).as_uri()
    return urllib.parse.quote(path, safe="/")


def _asset(entry: Entry, caption: str | None = None) -> dict[str, Any]:
    path = entry.path
    return {
        "href": _href(path),
        "path": path,
        "name": path.split("/", 1)[-1],  # without the section's folder: "0_conv1/hist_call001.npz"
        "suffix": Path(path).suffix.lower(),
        "kind": entry.kind,
        "caption": caption if caption is not None else path.rsplit("/", 1)[-1],
    }


def _image(entry: Entry, caption: str | None = None) -> dict[str, Any]:
    asset = _asset(entry, caption)
    return {"src": asset["href"], "alt": asset["caption"], "caption": asset["caption"], "path": asset["path"]}


def _is_image(entry: Entry) -> bool:
    return entry.suffix in _IMAGE_SUFFIXES


def _data_files(entries: Iterable[Entry]) -> list[dict[str, Any]]:
    return [_asset(e) for e in entries if e.suffix in _DATA_SUFFIXES]


def _of_kind(entries: Iterable[Entry], *kinds: str) -> list[Entry]:
    return [e for e in entries if e.kind in kinds]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except (TypeError, ValueError):
        return None


def _sort_key(value: Any) -> tuple[int, float, str]:
    number = _number(value)
    return (0, number, "") if number is not None and not math.isnan(number) else (1, 0.0, str(value))


def _label(value: Any) -> str:
    number = _number(value)
    if number is not None and number.is_integer():
        return str(int(number))
    return str(value)


def _group(entries: Iterable[Entry], key: Callable[[Entry], Any]) -> dict[Any, list[Entry]]:
    """Entries grouped by ``key``, groups in sorted order, entries in manifest order."""
    groups: dict[Any, list[Entry]] = {}
    for entry in entries:
        groups.setdefault(key(entry), []).append(entry)
    return {k: groups[k] for k in sorted(groups, key=_sort_key)}


def _latest(entries: Sequence[Entry]) -> Entry | None:
    """The last written entry (the manifest is in write order)."""
    return entries[-1] if entries else None


def _layer_title(entry: Entry) -> str:
    layer_id, name = entry.get("layer_id"), entry.get("layer_name")
    if layer_id is None and name is None:
        return "layer"
    if layer_id is None:
        return str(name)
    return f"#{layer_id} {name}" if name is not None else f"#{layer_id}"


def _when(stamp: Any) -> str | None:
    """An ISO 8601 time stamp as ``"2024-05-01 12:30 UTC"`` (as given when it does not parse)."""
    if not stamp:
        return None
    try:
        moment = _dt.datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp)
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.timezone.utc)
        return moment.strftime("%Y-%m-%d %H:%M UTC")
    return moment.strftime("%Y-%m-%d %H:%M")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as stream:
            return list(csv.DictReader(stream))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


# ------------------------------------------------------------------ sections
def _layer_rows(run: RunRecord, costs: dict[int, dict[str, Any]], alerted: set[int]) -> list[dict[str, Any]]:
    return [
        {
            "id": layer.id,
            "name": layer.name,
            "type": layer.type,
            "params": layer.params,
            "trainable_params": layer.trainable_params,
            "alert": layer.id in alerted,
            **{k: costs.get(layer.id, {}).get(k) for k in _COST_COLUMNS},
        }
        for layer in run.layers
    ]


def _architecture(entries: list[Entry]) -> dict[str, Any]:
    # re-drawing the graph writes a newer call: only the newest one is shown
    newest = max((e.get("call", 0) for e in entries), default=0)
    entries = [e for e in entries if e.get("call", 0) == newest]
    by_suffix = {e.suffix: e for e in entries}
    picture = by_suffix.get(".svg") or by_suffix.get(".png")
    return {
        "present": bool(entries),
        "image": _image(picture, "Architecture graph (torchview); #ID marks BBDecoder's layer IDs")
        if picture
        else None,
        "files": [_asset(e) for e in entries],
    }


def _gradients(root: Path, entries: list[Entry]) -> dict[str, Any]:
    pictures = [e for e in _of_kind(entries, "flow", "norms") if _is_image(e)]
    summaries = _group([e for e in _of_kind(entries, "alerts") if e.suffix == ".json"], lambda e: e.get("epoch"))
    frames: list[Frame] = []
    for epoch, group in _group(pictures, lambda e: e.get("epoch")).items():
        flow = _latest(_of_kind(group, "flow"))
        images = [_image(flow, f"Gradient flow, epoch {_label(epoch)}")] if flow else []
        norms = _of_kind(group, "norms")
        images += [_image(e, f"L1/L2 norms per iteration, epoch {_label(epoch)}") for e in _latest_per_name(norms)]
        frame: Frame = {"label": f"epoch {_label(epoch)}", "images": images}
        # a grouped flow chart (many tensors) has its per-tensor bars one level down: a table, collapsed
        table = _flow_table(root, _latest(summaries.get(epoch, [])))
        if table is not None:
            frame["details"] = {"summary": f"Gradient flow per tensor ({len(table['rows'])} tensors)", "table": table}
        frames.append(frame)
    heatmap = _latest([e for e in _of_kind(entries, "heatmap") if _is_image(e)])
    return {
        "present": bool(entries),
        "frames": frames,
        "heatmap": _image(heatmap, "Per-layer gradient L2 norm across all epochs (log colour scale)")
        if heatmap
        else None,
        "data": _data_files(entries),
    }


def _health(entries: list[Entry], caption: str) -> dict[str, Any]:
    """Activation health or update ratios: each epoch's figure pages behind a slider, the latest heatmap."""
    frames: list[Frame] = []
    pictures = [e for e in _of_kind(entries, "figure") if _is_image(e)]
    for epoch, group in _group(pictures, lambda e: e.get("epoch")).items():
        images = [_image(e, f"{caption}, epoch {_label(epoch)}") for e in _latest_per_name(group)]
        frames.append({"label": f"epoch {_label(epoch)}", "images": images})
    heatmap = _latest([e for e in _of_kind(entries, "heatmap") if _is_image(e)])
    return {
        "present": bool(entries),
        "frames": frames,
        "heatmap": _image(heatmap, "Dead and saturated fractions per layer across all epochs") if heatmap else None,
        "data": _data_files(entries),
    }


def _flow_table(root: Path, entry: Entry | None) -> dict[str, Any] | None:
    """The per-tensor rows behind a grouped flow chart, from the epoch's ``alerts.json``.

    ``None`` when the epoch's chart shows every tensor itself (at most
    :data:`~BBDecoder.plots.gradients.FLOW_PAGE`) or the file cannot be read. Rows are
    ``[label, mean_abs, max_abs, status, note]`` (``None`` for a non-finite number); the
    bars share one log axis from a decade at least 0.3 below the smallest positive value to
    the decade above the largest.
    """
    from ..plots.gradients import FLOW_PAGE

    if entry is None:
        return None
    try:
        report = GradientEpochReport.from_json(_read_json(root / entry.path))
    except SchemaError:
        return None
    if len(report.summary) <= FLOW_PAGE:
        return None

    def number(value: float) -> float | None:
        return value if math.isfinite(value) else None

    rows = [[t.label, number(t.mean_abs), number(t.max_abs), t.status, t.note] for t in report.summary]
    positive = [v for row in rows for v in row[1:3] if v is not None and v > 0]
    low = math.floor(math.log10(min(positive)) - 0.3) if positive else -8  # the smallest bar stays visible
    high = math.ceil(math.log10(max(positive))) if positive else 0
    return {"rows": rows, "low": low, "high": max(high, low + 1)}


def _latest_per_name(entries: list[Entry]) -> list[Entry]:
    """One entry per file name stem (a rewrite of the same epoch gets a ``-1`` suffix)."""
    chosen: dict[str, Entry] = {}
    for entry in entries:
        stem = Path(entry.path).stem
        base = stem.rsplit("-", 1)[0] if stem.rsplit("-", 1)[-1].isdigit() else stem
        chosen[base] = entry
    return list(chosen.values())


_ALERT_STYLE = {
    "nonfinite": ("error", "NaN/Inf gradient"),
    "exploding": ("error", "Exploding gradient"),
    "vanishing": ("warning", "Vanishing gradient"),
    "dead": ("warning", "Dead units"),
    "saturated": ("warning", "Saturated activations"),
    "update_small": ("warning", "Update too small"),
    "update_large": ("error", "Update too large"),
    "skipped": ("info", "Skipped AMP steps"),
}


def _alerts(root: Path, entries: list[Entry]) -> list[dict[str, Any]]:
    """Every alert of every saved epoch (each :class:`GradientEpochReport`), worst first."""
    alerts: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for entry in _of_kind(entries, "alerts"):
        if entry.suffix != ".json":
            continue
        record = _EPOCH_REPORTS.get(entry.section, GradientEpochReport)
        try:
            report = record.from_json(_read_json(root / entry.path))
        except SchemaError:
            continue
        items = [
            {
                "kind": a.kind,
                "layer_id": a.layer_id,
                "layer_name": a.layer_name,
                "param": a.param,
                "epoch": a.epoch,
                "iteration": a.iteration,
                "text": a.message,
            }
            for a in report.alerts
        ]
        if getattr(report, "skipped_iterations", None):
            steps = report.skipped_iterations
            shown = ", ".join(map(str, steps[:12])) + (" …" if len(steps) > 12 else "")
            items.append(
                {
                    "kind": "skipped",
                    "layer_id": None,
                    "layer_name": None,
                    "param": None,
                    "epoch": report.epoch,
                    "iteration": steps[0],
                    "text": f"{len(steps)} step(s) skipped by the GradScaler: iterations {shown}",
                }
            )
        for item in items:
            fingerprint = (item["kind"], item["layer_id"], item["param"], item["iteration"], item["text"])
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
            severity, title = _ALERT_STYLE.get(item["kind"], ("warning", item["kind"].replace("_", " ").capitalize()))
            alerts.append({**item, "severity": severity, "title": title})
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(alerts, key=lambda a: (order[a["severity"]], _sort_key(a["epoch"]), _sort_key(a["iteration"])))


def _weights(entries: list[Entry]) -> dict[str, Any]:
    layers = []
    for layer_id, group in _group(entries, lambda e: e.get("layer_id")).items():
        evolution = _latest([e for e in _of_kind(group, "evolution") if _is_image(e)])
        frames = [
            {
                "label": f"call {_label(call)}",
                "images": [_image(e, f"{_layer_title(e)}, call {_label(call)}") for e in calls],
            }
            for call, calls in _group(
                [e for e in _of_kind(group, "histogram") if _is_image(e)], lambda e: e.get("call")
            ).items()
        ]
        if evolution is None and not frames:
            continue
        layers.append(
            {
                "id": layer_id,
                "title": _layer_title(group[0]),
                "evolution": _image(evolution, f"{_layer_title(group[0])}: histograms over calls")
                if evolution
                else None,
                "frames": frames,
            }
        )
    return {"present": bool(entries), "layers": layers, "data": _data_files(entries)}


def _similarity(entries: list[Entry]) -> dict[str, Any]:
    trend = _latest([e for e in _of_kind(entries, "trend") if _is_image(e)])
    frames = [
        {
            "label": f"call {_label(call)}",
            "images": [_image(e, f"Similarity per layer, call {_label(call)}") for e in g],
        }
        for call, g in _group([e for e in _of_kind(entries, "bar") if _is_image(e)], lambda e: e.get("call")).items()
    ]
    return {
        "present": bool(entries),
        "trend": _image(trend, "Mean pairwise similarity of each layer over calls") if trend else None,
        "frames": frames,
        "data": _data_files(entries),
    }


def _features(frames_entries: list[Entry], video_entries: list[Entry]) -> dict[str, Any]:
    layers = []
    groups = _group([*frames_entries, *video_entries], lambda e: e.get("layer_id"))
    for _layer_id, group in groups.items():
        pictures = [e for e in _of_kind(group, "picture") if _is_image(e)]
        frames = []
        for index, entry in enumerate(pictures):
            tag = entry.get("tag")
            number = entry.get("frame", index)
            label = f"{tag}" if tag not in (None, "") else f"frame {_label(number)}"
            frames.append({"label": label, "images": [_image(entry, f"{_layer_title(entry)}: {label}")]})
        videos = [
            {"src": _href(e.path), "type": _VIDEO_TYPES[e.suffix]}
            for kind in ("webm", "mp4")
            for e in [_latest(_of_kind(group, kind))]
            if e is not None and e.suffix in _VIDEO_TYPES
        ]
        sheet = _latest([e for e in _of_kind(group, "contact_sheet") if _is_image(e)])
        if not frames and not videos and sheet is None:
            continue
        layers.append(
            {
                "title": _layer_title(group[0]),
                "frames": frames,
                "videos": videos,
                "contact_sheet": _image(sheet, f"{_layer_title(group[0])}: every frame") if sheet else None,
                "raw_count": len(_of_kind(group, "raw")),
                "raw_folder": _common_folder(_of_kind(group, "raw")),
            }
        )
    return {
        "present": bool(frames_entries or video_entries),
        "layers": layers,
        "data": [_asset(e) for e in video_entries if e.suffix in _VIDEO_TYPES],
    }


def _common_folder(entries: list[Entry]) -> dict[str, str] | None:
    """The folder holding every one of ``entries`` (for a link to many raw arrays)."""
    if not entries:
        return None
    folder = os.path.commonpath([str(Path(e.path).parent.as_posix()) for e in entries])
    folder = Path(folder).as_posix()
    return {"href": _href(folder + "/"), "path": folder + "/"} if folder not in ("", ".") else None


def _gradcam(entries: list[Entry]) -> dict[str, Any]:
    overlays = [e for e in _of_kind(entries, "overlay") if _is_image(e)]
    frames = []
    for call, group in _group(overlays, lambda e: e.get("call")).items():
        ordered = sorted(group, key=lambda e: _sort_key(e.get("sample")))
        layer = _layer_title(ordered[0])
        frames.append(
            {
                "label": f"call {_label(call)} · {layer}",
                "images": [_image(e, f"sample {_label(e.get('sample', '?'))}") for e in ordered],
            }
        )
    return {"present": bool(entries), "frames": frames, "data": _data_files(entries)}


def _costs(root: Path, entries: list[Entry]) -> dict[str, Any]:
    by_id: dict[int, dict[str, Any]] = {}
    table = _latest(_of_kind(entries, "csv"))
    if table is not None:
        for raw in _read_csv(root / table.path):
            try:
                row = row_from_csv(CostRow, raw)
            except SchemaError:
                continue
            by_id[row.id] = {k: getattr(row, k) for k in _COST_COLUMNS}
    images = [
        _image(e, {"flops": "FLOPs per layer", "time": "Forward time per layer"}.get(e.kind))
        for kind in ("flops", "time")
        for e in [_latest([x for x in _of_kind(entries, kind) if _is_image(x)])]
        if e is not None
    ]
    return {"present": bool(entries), "images": images, "by_id": by_id, "data": _data_files(entries)}


# ---------------------------------------------------------------- formatting
def format_si(value: Any, unit: str = "") -> str:
    """``1234567`` → ``"1.23 M"``: a compact number for tables (empty for missing values)."""
    number = _number(value)
    if number is None or math.isnan(number):
        return ""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(number) >= scale:
            return f"{number / scale:.3g} {prefix}{unit}".rstrip()
    return f"{number:.3g} {unit}".rstrip() if not number.is_integer() else f"{int(number)} {unit}".rstrip()


def format_bytes(value: Any) -> str:
    """``2048`` → ``"2 KiB"`` (empty for missing values)."""
    number = _number(value)
    if number is None or math.isnan(number):
        return ""
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(number) >= scale:
            return f"{number / scale:.3g} {unit}"
    return f"{int(number)} B"


def format_ms(value: Any) -> str:
    """Milliseconds with three decimals (``"0.029"``), or µs below a microsecond's resolution."""
    number = _number(value)
    if number is None or math.isnan(number):
        return ""
    return f"{number:.3f}" if number >= 0.001 or number == 0 else f"{number * 1000:.2f} µs"


def format_cell(value: Any) -> str:
    """A number as a table shows it: integers with thousands separators, floats to 3-4 digits."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        number = _number(value)
        if number is None:
            return str(value)
        value = number
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if isinstance(value, int) or (float(value).is_integer() and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:.4g}"
