"""One layout and one schema: every file named by the table, every record read back, old folders still open."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from BBDecoder import Master_analyzer
from BBDecoder.analyses.gradients.save import heatmap_matrix, load_history
from BBDecoder.output import layout
from BBDecoder.output.schema import (
    SCHEMA_VERSION,
    Alert,
    CostRow,
    GradientEpochReport,
    GradientRow,
    ManifestEntry,
    RunRecord,
    SchemaError,
    TensorSummary,
    csv_cells,
    row_from_csv,
)
from BBDecoder.report import collect, open_save_path

OLD = Path(__file__).parent / "fixtures" / "save_path_v0_1_0"


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    )


def train(wm: Master_analyzer, model: nn.Module, epochs: range, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in epochs:
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(wm(x), torch.tensor([0, 1, 2, 0]))
            wm.backward_propagation(loss, collect_grads=True)
            opt.step()
        wm.save_collected_grads(epoch)
        wm.visualize_weight_hist([0, 4], bins=8)
        wm.get_inter_features(x, 0, tag=f"epoch {epoch}")
        wm.get_sim(x, [0, 1], dim=1)


def pattern_regex(section: str, kind: str) -> re.Pattern[str]:
    """The section's file-name pattern as a regular expression (fields become digits or words)."""
    pattern = layout.SECTIONS[section].files[kind]
    parts = re.split(r"(\{[a-z]+(?::[^}]*)?\})", pattern)
    fields = {"{page}": r"(_\d+of\d+)?", "{tag}": r"(_[A-Za-z0-9._-]+)?", "{ext}": r"\w+"}
    body = "".join(fields.get(p, r"\d+") if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(body + "$")


# ----------------------------------------------------------------------------- layout
def test_every_file_is_named_by_the_layout_table(tmp_path: Path) -> None:
    model = small_model()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wm = Master_analyzer(model, tmp_path, [1, 3, 8, 8], verbose=False)
        train(wm, model, range(2), x)
        wm.compile_feature_evolution(0, fps=2)
        wm.grad_cam(0, x[:2])
        wm.layer_costs([1, 3, 8, 8], repeats=1, warmup=0)
        wm.layer_costs([1, 3, 8, 8], repeats=1, warmup=0)  # a second call: the next number
    entries = [ManifestEntry.from_json(e) for e in json.loads((tmp_path / "manifest.json").read_text())]
    sections = {e.section for e in entries}
    assert sections >= {"gradients", "weights", "similarity", "features", "video", "gradcam", "costs"}
    for entry in entries:
        if entry.section == "architecture":
            continue  # drawn by graph.py (see test_core's architecture tests)
        spec = layout.SECTIONS[entry.section]
        path = Path(entry.path)
        assert pattern_regex(entry.section, entry.kind).match(path.name), entry.path
        assert not re.search(r"-\d+\.\w+$", path.name), f"collision suffix: {entry.path}"
        folder = path.parent
        if spec.per_layer:
            assert folder.name == layout.layer_folder(entry.layer_id, entry.layer_name), entry.path
            folder = folder.parent
        assert folder.as_posix() == spec.folder, entry.path
    costs = sorted(e.call for e in entries if e.section == "costs" and e.kind == "csv")
    assert costs == [1, 2]
    videos = [e for e in entries if e.section == "video"]
    assert {Path(e.path).parent.as_posix() for e in videos} == {"features/000_0"}  # inside its layer's folder


def test_layer_folder_and_file_names() -> None:
    assert layout.layer_folder(3, "layer1.0") == "003_layer1.0"
    assert layout.layer_folder(12, "../../etc") == "012_etc"
    assert layout.relative_path("features", "raw", layer=(2, "relu"), frame=7, tag="epoch 3") == (
        "features/002_relu/frame_0007_epoch_3.npy"
    )
    assert layout.relative_path("gradients", "norms", epoch=4, page=layout.page_suffix(2, 3)) == (
        "gradients/epoch_004_norms_2of3.png"
    )
    weights = layout.relative_path("weights", "data", folder="mine", layer=(0, "fc"), call=12)
    assert weights == "mine/000_fc/hist_call012.npz"
    with pytest.raises(ValueError, match="per layer"):
        layout.relative_path("gradcam", "maps", call=1)
    for section in layout.SECTIONS.values():  # every section states its folder argument and numbering
        assert section.numbering in ("epoch", "call", "frame")
        assert section.folder_argument in (None, "save_folder", "path")


# ----------------------------------------------------------------------------- schema
def test_records_round_trip_and_nan_is_null() -> None:
    alert = Alert(2, "vanishing", 1, "fc", "weight", 30, math.nan, "m")
    report = GradientEpochReport(
        epoch=2,
        iterations=[0, 9],
        alerts=[alert],
        summary=[TensorSummary("1 fc.weight", 1, "fc", "weight", 6, 1e-3, math.inf, "ok", tied_to="head.weight")],
    )
    data = report.to_json()
    assert data["schema"] == SCHEMA_VERSION and data["alerts"][0]["value"] is None
    assert data["summary"][0]["max_abs"] is None  # strict JSON: no NaN/Infinity tokens
    text = json.dumps(data, allow_nan=False)
    back = GradientEpochReport.from_json(json.loads(text))
    assert back.alerts[0].message == "m" and math.isnan(back.alerts[0].value)
    assert back.summary[0].tied_to == "head.weight" and back.epoch == 2
    with pytest.raises(SchemaError, match=r"GradientEpochReport.epoch: expected an integer"):
        GradientEpochReport.from_json({"epoch": "two"})
    with pytest.raises(SchemaError, match="expected a JSON object"):
        RunRecord.from_json([1, 2])


def test_manifest_entry_keeps_unknown_keys_and_reads_old_entries() -> None:
    raw = {"section": "weights", "path": "w/000_fc/x.png", "time": "t", "kind": "histogram", "layer_id": 0,
           "layer_name": "fc", "call": 3, "external": True}  # fmt: skip
    entry = ManifestEntry.from_json(raw)
    assert (entry.call, entry.layer_id, entry.extra) == (3, 0, {"external": True})
    assert entry.to_json() == raw
    old = ManifestEntry.from_json({"section": "architecture", "path": "architecture/architecture.svg", "time": "t"})
    assert old.kind == "svg" and old.suffix == ".svg"  # 0.1.0 wrote no kind for the graph
    with pytest.raises(SchemaError):
        ManifestEntry.from_json({"path": "x"})


def test_csv_records_read_back() -> None:
    row = GradientRow(1, 5, 0, 'a,"b"\nc', "weight", 0.1, 0.2, 0.3, math.nan, 0.0)
    cells = csv_cells(row)
    assert cells[5:] == ["0.1", "0.2", "0.3", "nan", "0"]
    cost = row_from_csv(CostRow, {"id": "2", "name": "fc", "params": "", "forward_flops": "48", "forward_ms": "0.5"})
    assert cost.params is None and cost.forward_flops == 48 and math.isnan(cost.forward_ms_p25)
    with pytest.raises(SchemaError, match=r"CostRow.id: 'x' is not a int"):
        row_from_csv(CostRow, {"id": "x", "name": "a"})


# -------------------------------------------------------------------- old folders
@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    target = tmp_path / "old"
    shutil.copytree(OLD, target)
    return target


def test_a_folder_written_by_0_1_0_opens_in_the_report(old_run: Path) -> None:
    context = collect(open_save_path(old_run))
    assert context["model"] == "Sequential" and [row["name"] for row in context["layers"]] == ["0", "1", "2", "3", "4"]
    assert context["run"]["sessions"] == 1 and context["totals"]["params"] == 112 + 51
    assert [f["label"] for f in context["gradients"]["frames"]] == ["epoch 0", "epoch 1"]
    assert context["gradients"]["heatmap"] is not None
    assert [layer["id"] for layer in context["weights"]["layers"]] == [0, 4]
    assert [len(layer["frames"]) for layer in context["weights"]["layers"]] == [2, 2]
    assert [f["label"] for f in context["features"]["layers"][0]["frames"]] == ["epoch 0", "epoch 1"]
    assert context["similarity"]["trend"] is not None and len(context["gradcam"]["frames"]) == 1
    assert set(context["costs"]["by_id"]) == {0, 1, 2, 3, 4} and context["costs"]["by_id"][4]["forward_flops"] == 96
    assert context["architecture"]["image"] is not None and not context["missing"]
    with open(old_run / "gradients" / "epoch_000_alerts.json") as stream:
        GradientEpochReport.from_json(json.load(stream))  # its alerts parse as the schema's records


def test_a_new_process_continues_every_figure_of_an_old_folder(old_run: Path) -> None:
    model = small_model()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wm = Master_analyzer(model, old_run, verbose=False)
        train(wm, model, range(2, 3), x)
    # the heatmap: 0.1.0's cumulative heatmap.npz (epochs 0, 1) then this process's epoch 2
    _, labels, iterations, epochs = heatmap_matrix(load_history(wm.store))
    assert labels == ["0 0", "4 4"] and list(dict.fromkeys(epochs.tolist())) == [0, 1, 2]
    assert list(iterations) == [0, 1, 2, 3, 4, 5, 0, 1, 2]  # a new process counts its own iterations
    assert [h.call for h in wm._weight_history["0"]] == [1, 2, 3]  # weight evolution continues
    frames = [f["frame"] for f in wm.feature_frames(0)]
    assert frames == [1, 2, 3]
    with open(old_run / "similarity" / "similarity.csv", newline="") as stream:
        calls = [int(row["call"]) for row in csv.DictReader(stream)]
    assert calls == [1, 1, 2, 2]  # the old table, then this call's rows appended


def test_resuming_in_a_new_process_continues_the_heatmap(tmp_path: Path) -> None:
    x = torch.randn(4, 3, 8, 8)
    seen: list[Any] = []
    for epochs in (range(0, 2), range(2, 3)):
        model = small_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wm = Master_analyzer(model, tmp_path, verbose=False)
            train(wm, model, epochs, x)
        seen.append(heatmap_matrix(load_history(wm.store)))
        wm.close()
    matrix, _, _, epochs = seen[-1]
    assert list(dict.fromkeys(epochs.tolist())) == [0, 1, 2]
    np.testing.assert_array_equal(matrix[:, :6], seen[0][0])  # the first process's columns, as saved
    layers_files = sorted(p.name for p in (tmp_path / "gradients").glob("*_layers.npz"))
    assert layers_files == ["epoch_000_layers.npz", "epoch_001_layers.npz", "epoch_002_layers.npz"]  # once each
