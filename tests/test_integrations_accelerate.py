"""accelerate and plain loops: ``collect_grads()`` after ``accelerator.backward(loss)``.

A tiny model trains for 2 epochs on the CPU with gradient accumulation; the gradients are
copied in float64 right where ``collect_grads`` reads them, and the saved CSV rows are
checked against statistics computed from those copies. Also: importing BBDecoder imports
no training framework. Figures are written as a 1-pixel PNG without drawing (drawing is
most of a save's time on a small CPU; the numbers do not depend on it).
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import matplotlib.figure
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from BBDecoder import Master_analyzer
from BBDecoder.core.hooks import count_module_hooks
from BBDecoder.kernels import gradstats

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _eager_statistics() -> Iterator[None]:
    """Eager gradient statistics: compiling the kernel takes tens of seconds on a small CPU."""
    previous = gradstats.set_backend("eager")
    yield
    gradstats.set_backend(previous)


@pytest.fixture(autouse=True)
def _quick_figures(monkeypatch: pytest.MonkeyPatch) -> None:
    png = cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))[1].tobytes()

    def savefig(self: Any, fname: Any, *args: Any, **kwargs: Any) -> None:
        data = b"<svg xmlns='http://www.w3.org/2000/svg'/>" if kwargs.get("format") == "svg" else png
        if hasattr(fname, "write"):
            fname.write(data)
        else:
            Path(fname).write_bytes(data)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)


@pytest.fixture
def accelerate() -> Iterator[Any]:
    """The accelerate module, with its process-wide state reset around the test."""
    module = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield module
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def read_rows(folder: Path, epoch: int) -> list[dict[str, str]]:
    with open(folder / "gradients" / f"epoch_{epoch:03d}_grads.csv", newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def check_rows(rows: list[dict[str, str]], steps: dict[int, dict[str, torch.Tensor]]) -> set[int]:
    """Every row equals the float64 statistics of its step's gradient; returns the iterations seen."""
    seen: dict[int, set[str]] = {}
    for row in rows:
        step = int(row["iteration"])
        name = row["param"] if row["layer_name"] == "(model)" else f"{row['layer_name']}.{row['param']}"
        g = steps[step][name]
        expected = {"mean_abs": g.abs().mean(), "max_abs": g.abs().max(), "l1": g.abs().sum(), "l2": g.norm()}
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(float(value), rel=RTOL), (step, name, key)
        assert row["nonfinite"] == "0"
        seen.setdefault(step, set()).add(name)
    for step, names in seen.items():
        assert names == {n for n in steps[step] if not n.endswith("bias")}, step
    return set(seen)


def test_collect_grads_after_accelerator_backward(tmp_path: Path, accelerate: Any) -> None:
    torch.manual_seed(0)
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    keys, hooks = list(model.state_dict()), count_module_hooks(model)
    prepared, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(data, batch_size=4))
    out = tmp_path / "run"
    wm = Master_analyzer(prepared, out, verbose=False)
    steps: dict[int, dict[str, torch.Tensor]] = {}
    for epoch in range(2):
        for inputs, targets in loader:
            with accelerator.accumulate(prepared):
                accelerator.backward(F.cross_entropy(prepared(inputs), targets))
                if accelerator.sync_gradients:
                    wm.collect_grads(scaler=accelerator.scaler)
                    steps[len(steps)] = {n: p.grad.double() for n, p in model.named_parameters()}
                    accelerator.clip_grad_norm_(prepared.parameters(), 1e-3)
                optimizer.step()
                optimizer.zero_grad()
        wm.save_collected_grads(epoch)
    wm.build_report()
    wm.close()
    assert len(steps) == 8  # 8 micro-batches an epoch, 2 per optimizer step
    assert check_rows(read_rows(out, 0), steps) == {0, 1, 2, 3}  # iteration = optimizer step
    assert check_rows(read_rows(out, 1), steps) == {4, 5, 6, 7}
    assert max(float(r["l2"]) for r in read_rows(out, 0)) > 10 * 1e-3  # recorded before clipping
    assert list(model.state_dict()) == keys and count_module_hooks(model) == hooks
    assert (out / "report.html").is_file()


def test_example_writes_a_report(tmp_path: Path, accelerate: Any) -> None:
    spec = importlib.util.spec_from_file_location("accelerate_train_example", EXAMPLES / "accelerate_train.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(["--out", str(tmp_path / "out"), "--epochs", "2", "--samples", "128"])
    assert report == tmp_path / "out" / "report.html" and report.is_file()
    assert {int(r["iteration"]) for r in read_rows(tmp_path / "out", 1)} == {2, 3}  # 4 batches, 2 per step


def test_frameworks_are_imported_only_by_their_integration() -> None:
    code = """
import sys, BBDecoder, BBDecoder.integrations
print(sorted(m for m in ("lightning", "pytorch_lightning", "transformers", "accelerate") if m in sys.modules))
sys.modules.update(dict.fromkeys(("lightning", "pytorch_lightning", "transformers")))  # as if not installed
from BBDecoder.errors import MissingDependencyError
for name in ("lightning", "transformers"):
    try:
        __import__("BBDecoder.integrations." + name)
    except MissingDependencyError as error:
        print(error)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded, lightning, transformers = done.stdout.strip().splitlines()
    assert loaded == "[]"
    assert lightning.endswith("pip install lightning") and transformers.endswith("pip install transformers")
