"""The HTML report, built from a synthetic ``save_path`` written with the Store."""

from __future__ import annotations

import html.parser
import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from BBDecoder.errors import SavePathError
from BBDecoder.output.store import RUN_NAME, Store, safe_name
from BBDecoder.report import REPORT_NAME, build_report, collect
from BBDecoder.report.builder import format_bytes, format_cell, format_si

HOSTILE = '<script>alert("pwned")</script>'
HOSTILE_ATTR = '"><img src=x onerror=alert(1)>'
LAYERS = [
    {"id": 0, "name": "conv1", "type": "Conv2d", "params": 448, "trainable_params": 448},
    {"id": 1, "name": HOSTILE, "type": "ReLU", "params": 0, "trainable_params": 0},
    {"id": 2, "name": HOSTILE_ATTR, "type": "Linear", "params": 170, "trainable_params": 170},
]


def png(width: int = 40, height: int = 30, value: int = 128) -> bytes:
    """A small solid-colour PNG (its size identifies it in tests)."""
    image = np.full((height, width, 3), value, dtype=np.uint8)
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def make_save_path(root: Path, *, epochs: int = 3, hostile: bool = True) -> Store:
    """A save_path with one output of every section and kind the report knows."""
    store = Store(root)
    layers = LAYERS if hostile else [dict(layer, name=f"layer{layer['id']}") for layer in LAYERS]
    store.write_json(
        RUN_NAME,
        {
            "library": "BBDecoder",
            "version": "0.0-test",
            "torch": "2.x",
            "model": "SynthNet",
            "depth": 1,
            "input_size": [1, 3, 16, 16],
            "created": "2024-01-01T00:00:00+00:00",
            "sessions": [{}],
            "layers": layers,
        },
        overwrite=True,
    )
    store.write_bytes("architecture/architecture.png", png(120, 200), section="architecture")
    store.write_text("architecture/architecture.gv", "digraph {}", section="architecture")
    for epoch in range(epochs):
        meta = {"epoch": epoch}
        store.write_bytes(
            f"gradients/flow_epoch{epoch}.png", png(100 + epoch, 50), section="gradients", meta={**meta, "kind": "flow"}
        )
        store.write_bytes(
            f"gradients/norms_epoch{epoch}.png",
            png(60, 40 + epoch),
            section="gradients",
            meta={**meta, "kind": "norms"},
        )
        store.write_csv(
            f"gradients/grads_epoch{epoch}.csv",
            ["epoch", "iteration"],
            [[epoch, 0]],
            section="gradients",
            meta={**meta, "kind": "csv"},
        )
        store.write_bytes(
            f"gradients/heatmap_epoch{epoch}.png",
            png(80, 80, 10 * epoch),
            section="gradients",
            meta={**meta, "kind": "heatmap"},
        )
    alerts = [
        {
            "kind": "nonfinite",
            "layer_id": 2,
            "layer_name": layers[2]["name"],
            "param": "weight",
            "iteration": 7,
            "epoch": 1,
            "value": 3.0,
            "message": f"layer 2 {layers[2]['name']!r}, parameter 'weight': the gradient holds NaN/Inf for the first "
            "time at iteration 7 (3 non-finite entries)",
        },
        {
            "kind": "vanishing",
            "layer_id": 0,
            "layer_name": "conv1",
            "param": "weight",
            "iteration": 3,
            "epoch": 1,
            "value": 1e-12,
            "message": "layer 0 'conv1', parameter 'weight': mean |grad| averages 1e-12 over epoch 1, below "
            "vanish_threshold=1e-08",
        },
    ]
    report = {"epoch": 1, "alerts": alerts, "skipped_iterations": [5, 6], "summary": []}  # save_collected_grads' layout
    store.write_json("gradients/alerts_epoch1.json", report, section="gradients", meta={"epoch": 1, "kind": "alerts"})
    for call in range(2):
        for layer in (layers[0], layers[2]):
            meta = {"layer_id": layer["id"], "layer_name": layer["name"], "call": call}
            name = f"{layer['id']}_{safe_name(layer['name'])}"
            store.write_bytes(
                f"weights/{name}_call{call}.png", png(70, 50), section="weights", meta={**meta, "kind": "histogram"}
            )
            store.write_npz(
                f"weights/{name}_call{call}.npz",
                {"counts": np.arange(3)},
                section="weights",
                meta={**meta, "kind": "data"},
            )
            store.write_bytes(
                f"weights/{name}_evolution.png", png(90, 60), section="weights", meta={**meta, "kind": "evolution"}
            )
        store.write_bytes(
            f"similarity/bar_call{call}.png", png(50, 50), section="similarity", meta={"call": call, "kind": "bar"}
        )
        store.write_bytes(
            f"similarity/trend_call{call}.png", png(110, 50), section="similarity", meta={"call": call, "kind": "trend"}
        )
        for sample in range(3):
            store.write_bytes(
                f"gradcam/call{call}_sample{sample}.png",
                png(32, 32, 40 * sample),
                section="gradcam",
                meta={"call": call, "sample": sample, "kind": "overlay", "layer_id": 0, "layer_name": "conv1"},
            )
        store.write_npy(
            f"gradcam/call{call}_maps.npy",
            np.zeros((3, 4, 4)),
            section="gradcam",
            meta={"call": call, "kind": "maps", "layer_id": 0, "layer_name": "conv1"},
        )
    store.write_csv(
        "similarity/similarity.csv",
        ["call", "layer_id", "value"],
        [[0, 0, 0.5]],
        section="similarity",
        meta={"kind": "csv"},
    )
    feature_layer = layers[1]
    folder = f"features/{feature_layer['id']}_{safe_name(feature_layer['name'])}"
    base = {"layer_id": feature_layer["id"], "layer_name": feature_layer["name"]}
    for frame in range(epochs):
        store.write_bytes(
            f"{folder}/frame_{frame:04d}.png",
            png(64, 48 + frame),
            section="features",
            meta={**base, "frame": frame, "tag": f"epoch {frame}", "kind": "picture"},
        )
        store.write_npy(
            f"{folder}/frame_{frame:04d}.npy",
            np.zeros((2, 2)),
            section="features",
            meta={**base, "frame": frame, "tag": f"epoch {frame}", "kind": "raw"},
        )
    store.write_bytes(f"{folder}_evolution.webm", b"\x1aE\xdf\xa3", section="video", meta={**base, "kind": "webm"})
    store.write_bytes(f"{folder}_evolution.mp4", b"\x00\x00\x00\x18ftyp", section="video", meta={**base, "kind": "mp4"})
    store.write_bytes(
        f"{folder}_contact_sheet.png", png(150, 40), section="video", meta={**base, "kind": "contact_sheet"}
    )
    store.write_csv(
        "costs/layer_costs.csv",
        ["id", "name", "params", "forward_flops", "backward_flops", "forward_ms", "activation_bytes"],
        [[0, "conv1", 448, 2_000_000, 4_000_000, 0.25, 8192], [2, layers[2]["name"], 170, 320, 640, 0.01, 40]],
        section="costs",
        meta={"kind": "csv"},
    )
    store.write_bytes("costs/flops.png", png(60, 30), section="costs", meta={"kind": "flops"})
    store.write_bytes("costs/time.png", png(61, 30), section="costs", meta={"kind": "time"})
    return store


class _Links(html.parser.HTMLParser):
    """Collect every src/href and the text of <script> blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.tags: list[tuple[str, dict[str, Any]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.append((tag, values))
        for key in ("src", "href"):
            if values.get(key):
                self.links.append((tag, str(values[key])))


def parse(text: str) -> _Links:
    parser = _Links()
    parser.feed(text)
    return parser


def slider_frames(text: str) -> list[list[dict[str, Any]]]:
    return [json.loads(attrs["data-frames"]) for tag, attrs in parse(text).tags if "data-frames" in attrs]


@pytest.fixture
def report(tmp_path: Path) -> tuple[Path, str]:
    make_save_path(tmp_path / "run")
    path = build_report(tmp_path / "run")
    return path, path.read_text(encoding="utf-8")


def test_report_is_written_into_save_path(report: tuple[Path, str], tmp_path: Path) -> None:
    path, text = report
    assert path == (tmp_path / "run" / REPORT_NAME).resolve()
    assert text.startswith("<!doctype html>")
    assert "SynthNet" in text


def test_hostile_names_are_escaped_everywhere(report: tuple[Path, str]) -> None:
    _, text = report
    assert HOSTILE not in text
    assert "<img src=x" not in text
    assert "&lt;script&gt;alert(" in text
    # exactly the one inline script of the page, and no element or handler the names injected
    scripts = [attrs for tag, attrs in parse(text).tags if tag == "script"]
    assert len(scripts) == 1
    assert not any(key.startswith("on") for _, attrs in parse(text).tags for key in attrs)
    # inside the slider JSON the names come back intact after parsing
    captions = [img["caption"] for frames in slider_frames(text) for f in frames for img in f["images"]]
    assert any(HOSTILE_ATTR in caption for caption in captions)


def test_every_relative_link_resolves(report: tuple[Path, str]) -> None:
    path, text = report
    links = [link for _, link in parse(text).links]
    links += [img["src"] for frames in slider_frames(text) for f in frames for img in f["images"]]
    local = [link for link in links if not link.startswith(("#", "data:"))]
    assert len(local) > 20
    for link in local:
        assert not re.match(r"^[a-z]+://", link), f"external or absolute link {link!r}"
        target = path.parent / urllib.parse.unquote(link)
        assert target.exists(), f"{link!r} does not resolve"


def test_self_contained_no_external_resources(report: tuple[Path, str]) -> None:
    _, text = report
    tags = parse(text).tags
    assert not [a for t, a in tags if t == "script" and a.get("src")]
    assert not [a for t, a in tags if t == "link" and a.get("rel") == "stylesheet"]
    assert "http://" not in text and "https://" not in text


def test_gradient_slider_holds_every_epoch_in_order(report: tuple[Path, str]) -> None:
    _, text = report
    frames = slider_frames(text)[0]
    assert [f["label"] for f in frames] == ["epoch 0", "epoch 1", "epoch 2"]
    assert [f["images"][0]["src"] for f in frames] == [f"gradients/flow_epoch{e}.png" for e in range(3)]
    assert frames[1]["images"][1]["src"] == "gradients/norms_epoch1.png"
    # the last epoch is shown before any script runs, and the heatmap is the newest one
    assert 'src="gradients/flow_epoch2.png"' in text
    assert 'src="gradients/heatmap_epoch2.png"' in text
    assert 'src="gradients/heatmap_epoch0.png"' not in text


def test_alerts_come_first_and_are_listed(report: tuple[Path, str]) -> None:
    _, text = report
    assert text.index('id="alerts"') < text.index('id="summary"') < text.index('id="gradients"')
    context_alerts = re.findall(r'<li class="alert (\w+)">', text)
    assert context_alerts == ["error", "warning", "info"]  # NaN/Inf, vanishing, skipped AMP steps
    assert "NaN/Inf gradient" in text and "for the first time at iteration 7" in text
    assert "2 step(s) skipped by the GradScaler: iterations 5, 6" in text
    assert "mean |grad| averages 1e-12" in text


def test_alerts_as_a_plain_list_and_duplicates(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_json(RUN_NAME, {"model": "M", "layers": LAYERS}, overwrite=True)
    alert = {"kind": "exploding", "layer_id": 0, "layer_name": "conv1", "param": "weight", "iteration": 4,
             "message": "conv1.weight: mean |grad| exceeds explode_threshold=1000"}  # fmt: skip
    for epoch in (0, 1):  # the same alert saved twice is listed once
        report = {"schema": 2, "epoch": 0, "alerts": [{**alert, "epoch": 0, "value": 2e3}]}
        store.write_json(f"g/alerts{epoch}.json", report, section="gradients", meta={"epoch": 0, "kind": "alerts"})
    context = collect(store)
    assert [(a["title"], a["severity"], a["text"]) for a in context["alerts"]] == [
        ("Exploding gradient", "error", alert["message"])
    ]
    assert context["alert_counts"] == {"error": 1, "warning": 0, "info": 0}
    assert [row["alert"] for row in context["layers"]] == [True, False, False]


def test_collect_merges_costs_and_flags_alerted_layers(tmp_path: Path) -> None:
    context = collect(make_save_path(tmp_path))
    by_id = {row["id"]: row for row in context["layers"]}
    assert by_id[0]["forward_flops"] == 2_000_000 and by_id[2]["activation_bytes"] == 40
    assert by_id[1]["forward_flops"] is None
    assert [row["alert"] for row in context["layers"]] == [True, False, True]
    assert context["totals"] == {"layers": 3, "params": 618}
    feature = context["features"]["layers"][0]
    assert [v["type"] for v in feature["videos"]] == ["video/webm", "video/mp4"]  # webm first: browsers play it
    assert [f["label"] for f in feature["frames"]] == ["epoch 0", "epoch 1", "epoch 2"]
    assert feature["raw_count"] == 3
    gradcam = context["gradcam"]["frames"]
    assert len(gradcam) == 2 and [len(f["images"]) for f in gradcam] == [3, 3]
    assert [w["id"] for w in context["weights"]["layers"]] == [0, 2]


def test_empty_save_path_degrades_gracefully(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_json(RUN_NAME, {"model": "Bare", "layers": LAYERS[:1]}, overwrite=True)
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert text.count("Not run.") == 10  # alerts, architecture and the eight analyses
    assert "wm.visualize_weight_hist(layer_inds)" in text
    assert slider_frames(text) == []
    assert "<img" not in text


def test_only_some_sections(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.write_json(RUN_NAME, {"model": "Partial", "layers": LAYERS}, overwrite=True)
    store.write_bytes("gradients/flow_epoch0.png", png(), section="gradients", meta={"epoch": 0, "kind": "flow"})
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert "No alerts" in text  # gradients were checked and nothing fired
    assert len(slider_frames(text)) == 1
    assert text.count("Not run.") == 8  # architecture and seven analyses


def test_missing_files_are_skipped_and_listed(tmp_path: Path) -> None:
    store = make_save_path(tmp_path)
    (tmp_path / "gradients" / "flow_epoch1.png").unlink()
    (tmp_path / "costs" / "flops.png").unlink()
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert "flow_epoch1.png" in text  # named in the "no longer exist" list...
    assert 'src="gradients/flow_epoch1.png"' not in text  # ...but never linked
    assert all("flow_epoch1" not in img["src"] for f in slider_frames(text)[0] for img in f["images"])
    assert "2 files listed in manifest.json no longer exist" in text
    assert store.root.joinpath(REPORT_NAME).is_file()


def test_manifest_path_escaping_save_path_is_ignored(tmp_path: Path) -> None:
    store = make_save_path(tmp_path / "run", hostile=False)
    manifest = json.loads((store.root / "manifest.json").read_text())
    manifest.append({"section": "gradients", "path": "../outside.png", "epoch": 9, "kind": "flow"})
    (tmp_path / "outside.png").write_bytes(png())
    (store.root / "manifest.json").write_text(json.dumps(manifest))
    text = build_report(store.root).read_text(encoding="utf-8")
    assert "outside.png" in text and 'src="../outside.png"' not in text


def test_rebuilding_replaces_the_report(tmp_path: Path) -> None:
    make_save_path(tmp_path, epochs=1)
    first = build_report(tmp_path)
    Store(tmp_path).write_bytes(
        "gradients/flow_epoch5.png", png(), section="gradients", meta={"epoch": 5, "kind": "flow"}
    )
    second = build_report(tmp_path)
    assert first == second and not (tmp_path / "report-1.html").exists()
    assert "flow_epoch5.png" in second.read_text(encoding="utf-8")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert all(entry["path"] != REPORT_NAME for entry in manifest)


def test_unknown_sections_are_linked(tmp_path: Path) -> None:
    store = make_save_path(tmp_path, hostile=False)
    store.write_text("extra/notes.txt", "hello", section="extra")
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert 'id="other"' in text and 'href="extra/notes.txt"' in text


def test_not_a_save_path(tmp_path: Path) -> None:
    with pytest.raises(SavePathError, match="missing"):
        build_report(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SavePathError, match="a file"):
        build_report(tmp_path / "file.txt")
    with pytest.raises(SavePathError, match="BBDecoder output folder"):
        build_report(tmp_path)
    assert not (tmp_path / "nope").exists()


def test_analyzer_build_report(tmp_path: Path) -> None:
    from models import MLP

    from BBDecoder import Master_analyzer

    model = MLP()
    model.net.add_module(HOSTILE, MLP((3, 2)))
    with Master_analyzer(model, tmp_path, verbose=False, depth=2) as wm:
        path = wm.build_report()
        context = collect(wm.store)
    assert context["totals"]["params"] == sum(p.numel() for p in model.parameters())  # parents not counted twice
    assert context["totals"]["layers"] == len(wm.layers)
    text = path.read_text(encoding="utf-8")
    assert path.parent == tmp_path.resolve()
    assert "net.fc0" in text and HOSTILE not in text
    assert f"net.{HOSTILE}".replace("<", "&lt;").replace(">", "&gt;").replace('"', "&#34;") in text


@pytest.mark.parametrize(
    ("value", "si", "size", "cell"),
    [
        (0, "0", "0 B", "0"),
        (999, "999", "999 B", "999"),
        (1_500, "1.5 k", "1.46 KiB", "1,500"),
        (2_000_000, "2 M", "1.91 MiB", "2,000,000"),
        (3.5e9, "3.5 G", "3.26 GiB", "3,500,000,000"),
        (0.25, "0.25", "0 B", "0.25"),
        (None, "", "", ""),
        ("12", "12", "12 B", "12"),
    ],
)
def test_number_formatting(value: Any, si: str, size: str, cell: str) -> None:
    assert format_si(value) == si
    assert format_bytes(value) == size
    assert format_cell(value) == cell


def test_activation_health_and_update_ratios_have_sections_and_alerts(tmp_path: Path) -> None:
    """The alerts of every health file reach the report (not only the gradients'), and each analysis its section."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch import nn

    from BBDecoder import Master_analyzer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every unit of the ReLU dead
    wm = Master_analyzer(model, tmp_path, verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wm.watch_optimizer(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            loss = F.cross_entropy(wm(torch.randn(4, 8), collect_acts=True), torch.tensor([0, 1, 2, 3]))
            optimizer.zero_grad()
            wm.backward_propagation(loss, collect_grads=True)
            optimizer.step()
        wm.save_collected_grads(0)
    context = collect(wm.store)
    kinds = {(a["kind"], a["layer_name"]) for a in context["alerts"]}
    assert ("dead", "1") in kinds  # from epoch_000_activation_alerts.json
    assert {kind for kind, _ in kinds} >= {"dead", "update_small"}  # the dead layer's weights stop moving
    assert {a["title"] for a in context["alerts"] if a["kind"] == "update_small"} == {"Update too small"}
    for section in ("activations", "updates"):
        (frame,) = context[section]["frames"]
        assert frame["label"] == "epoch 0" and frame["images"][0]["src"].startswith(f"{section}/epoch_000_")
    assert context["activations"]["heatmap"]["src"] == "activations/epoch_000_activation_heatmap.png"
    html = wm.build_report().read_text()
    assert 'id="activations"' in html and 'id="updates"' in html
    assert "activations/epoch_000_activations.csv" in html and "Other files" not in html
