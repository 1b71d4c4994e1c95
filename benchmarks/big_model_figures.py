"""Regenerate ``assets/big_model/``: the figures of a full-size ResNet-50-shaped model at depth 2.

The model is ``tests/models.py``'s ``ResNet50Like`` at ResNet-50's real width (25.6 M
parameters, 107 weight tensors at depth 2, 26 layers), trained for a few SGD steps on
random 64×64 images so the gradients and weights move. The script runs every analysis
whose figures issue 13 was about, through the public API, then copies a handful of the
figures (each checked to stay under 400 KB) and a screenshot of the report's top into
``assets/big_model/``:

* ``flow.png``: the gradient-flow overview, one row per bottleneck block (107 tensors
  would be 107 bar pairs); ``flow_tensors_page1.png``: the first page of the per-tensor detail;
* ``norms.png``: the first page of per-layer L1/L2 norms (integer iterations, one log scale);
* ``heatmap.png``: per-layer L2 norm over the steps;
* ``weights_layer1.0.png``: a bottleneck block's 12 tensors as panels;
* ``weights_layer3.png``: the 63 tensors of ``layer3`` summarised, and
  ``weights_layer3_drift.png``: their drift over the calls;
* ``flops.png``: forward and backward FLOPs per layer;
* ``architecture.png``: the architecture graph at its natural resolution;
* ``report.png``: the top of the report (headless Chromium, when installed).

Run: ``python benchmarks/big_model_figures.py [--steps 12] [--out assets/big_model]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from models import ResNet50Like  # noqa: E402

from BBDecoder import Master_analyzer  # noqa: E402
from BBDecoder.plots.gradients import gradient_flow_pages  # noqa: E402
from BBDecoder.report import build_report  # noqa: E402

LIMIT = 400_000


def run(folder: Path, steps: int) -> Path:
    torch.manual_seed(0)
    model = ResNet50Like(width=64, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wm = Master_analyzer(model, folder, [2, 3, 64, 64], depth=2, verbose=False)
        layers = ["conv1", "bn1", "layer1.0", "layer3", "fc"]
        wm.visualize_weight_hist(layers)
        for step in range(steps):
            x = torch.randn(4, 3, 64, 64)
            y = torch.arange(4) % 10
            loss = F.cross_entropy(wm.forward_propagation(x), y)
            optimizer.zero_grad()
            wm.backward_propagation(loss, collect_grads=True)
            optimizer.step()
            if step == steps // 2:
                wm.visualize_weight_hist(layers)
        wm.save_collected_grads(0)
        wm.visualize_weight_hist(layers)
        wm.layer_costs([2, 3, 64, 64], repeats=3)
    return build_report(folder)


def latest(
    folder: Path, section: str, kind: str | None, *, first: bool = False, suffix: str = "", **match: str
) -> Path:
    """The newest (or first) file of ``section`` and ``kind`` in the run's manifest."""
    entries = [
        e
        for e in json.loads((folder / "manifest.json").read_text())
        if e.get("section") == section
        and (kind is None or e.get("kind") == kind)
        and str(e["path"]).endswith(suffix)
        and all(e.get(k) == v for k, v in match.items())
    ]
    if not entries:
        raise FileNotFoundError(f"no {section}/{kind} {match} file in {folder}")
    return folder / entries[0 if first else -1]["path"]


def flow_pages(folder: Path) -> Path:
    """The per-tensor flow pages, drawn from the epoch's saved summary (alerts.json)."""
    record = json.loads(latest(folder, "gradients", "alerts").read_text())
    rows = record["summary"]
    pages = gradient_flow_pages(
        [r["label"] for r in rows],
        np.array([np.nan if r["mean_abs"] is None else r["mean_abs"] for r in rows], dtype=float),
        np.array([np.nan if r["max_abs"] is None else r["max_abs"] for r in rows], dtype=float),
        [r["status"] for r in rows],
        title="Gradient flow per tensor, epoch 0",
    )
    target = folder / "flow_tensors_page1.png"
    pages[0].savefig(target, dpi=110, bbox_inches="tight")
    return target


def screenshot(report: Path, target: Path) -> bool:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return False
    command = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=8000",
        f"--screenshot={target}",
        "--window-size=1400,2200",
        report.as_uri(),
    ]
    subprocess.run(command, check=False, capture_output=True, timeout=120)
    return target.is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "big_model")
    args = parser.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "resnet50"
        report = run(folder, args.steps)
        chosen = {
            "flow.png": latest(folder, "gradients", "flow"),
            "flow_tensors_page1.png": flow_pages(folder),
            "norms.png": latest(folder, "gradients", "norms", first=True),
            "heatmap.png": latest(folder, "gradients", "heatmap", suffix=".png"),
            "weights_layer1.0.png": latest(folder, "weights", "histogram", layer_name="layer1.0"),
            "weights_layer3.png": latest(folder, "weights", "histogram", layer_name="layer3"),
            "weights_layer3_drift.png": latest(folder, "weights", "evolution", layer_name="layer3"),
            "flops.png": latest(folder, "costs", "flops"),
            "architecture.png": latest(folder, "architecture", None, suffix=".png"),
        }
        for name, source in chosen.items():
            shutil.copyfile(source, args.out / name)
        if screenshot(report, args.out / "report.png"):
            chosen["report.png"] = args.out / "report.png"
    for name in chosen:
        size = (args.out / name).stat().st_size
        flag = "" if size < LIMIT else f"  (over {LIMIT // 1000} KB)"
        print(f"{args.out / name}: {size / 1000:.0f} KB{flag}")


if __name__ == "__main__":
    main()
