"""Lightning ``BBDecoderCallback``: what it records, when, and that the module stays untouched.

Each fit trains a tiny CNN for 2 epochs on random data on the CPU. A second, test-only
callback copies every ``.grad`` in float64 at the same event (``on_before_optimizer_step``)
and the saved CSV rows are checked against statistics computed from those copies.
Figures are written as a 1-pixel PNG without drawing (drawing is most of a save's time on
a small CPU; the numbers do not depend on it); the slow example test draws them for real.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning.pytorch")
import cv2  # noqa: E402
import matplotlib.figure  # noqa: E402
import numpy as np  # noqa: E402

from BBDecoder.core.hooks import count_module_hooks  # noqa: E402
from BBDecoder.errors import BBDecoderTypeError, BBDecoderValueError  # noqa: E402
from BBDecoder.integrations.lightning import BBDecoderCallback  # noqa: E402
from BBDecoder.kernels import gradstats  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLES, BATCH = 32, 8  # 4 optimizer steps per epoch without accumulation
RTOL = 1e-5


class TinyModule(L.LightningModule):
    """conv → relu → flatten → linear, on 1×6×6 inputs; SGD, or fused Adam."""

    def __init__(self, fused: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(4 * 6 * 6, 3)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.fused:
            return torch.optim.Adam(self.parameters(), lr=1e-2, fused=True)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class GradSnapshot(L.Callback):
    """Float64 copies of every gradient at ``on_before_optimizer_step``, keyed by global step.

    Lightning unscales AMP gradients before this event unless the optimizer unscales in
    ``step()`` (fused Adam); then the copy is divided by the scale here.
    """

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", 0) else 1
        self.steps[trainer.global_step] = {
            name: p.grad.detach().double() / scale for name, p in pl_module.named_parameters() if p.grad is not None
        }


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(SAMPLES, 1, 6, 6, generator=generator), torch.randint(0, 3, (SAMPLES,)))
    return DataLoader(data, batch_size=BATCH)


def trainer(callbacks: list[Any], **kwargs: Any) -> Any:
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return L.Trainer(callbacks=callbacks, **options)


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
        expected = {
            "mean_abs": g.abs().mean(),
            "max_abs": g.abs().max(),
            "l1": g.abs().sum(),
            "l2": g.norm(),
        }
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(float(value), rel=RTOL), (step, name, key)
        assert row["nonfinite"] == "0"
        seen.setdefault(step, set()).add(name)
    for step, names in seen.items():  # every weight (biases are left out by default), nothing else
        assert names == {n for n in steps[step] if not n.endswith("bias")}, step
    return set(seen)


def fit(tmp_path: Path, module: TinyModule | None = None, **kwargs: Any) -> tuple[Any, GradSnapshot, TinyModule, Path]:
    torch.manual_seed(0)
    module = module or TinyModule()
    out = tmp_path / "run"
    snapshot = GradSnapshot()
    callback = BBDecoderCallback(out, **kwargs.pop("callback", {}))
    keys, hooks = list(module.state_dict()), count_module_hooks(module)
    trainer(callbacks=[callback, snapshot], **kwargs).fit(module, loader())
    assert list(module.state_dict()) == keys
    assert count_module_hooks(module) == hooks
    return callback, snapshot, module, out


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


# ------------------------------------------------------------------------------ tests
def test_every_optimizer_step_is_recorded_before_clipping(tmp_path: Path) -> None:
    callback, snapshot, module, out = fit(tmp_path, gradient_clip_val=1e-3, callback={"depth": 2})
    assert sorted(snapshot.steps) == list(range(8))  # 2 epochs × 4 steps
    assert check_rows(read_rows(out, 0), snapshot.steps) == {0, 1, 2, 3}  # iteration = trainer.global_step
    assert check_rows(read_rows(out, 1), snapshot.steps) == {4, 5, 6, 7}
    # recorded before Lightning clips to a total norm of 1e-3: the norms are far above it
    total = math.sqrt(sum(float(g.norm()) ** 2 for g in snapshot.steps[0].values()))
    assert total > 100 * 1e-3
    assert callback.analyzer.inner is module
    assert (out / "report.html").is_file()
    weights = sorted(p.name for p in (out / "weights").rglob("hist_call*.png"))
    assert len(weights) == 2 * 3  # conv, linear (depth 2: features.0, head) and the features block, per epoch
    assert not list(out.rglob("*-1.*"))  # nothing saved twice


def test_gradient_accumulation_records_once_per_optimizer_step(tmp_path: Path) -> None:
    _, snapshot, _, out = fit(tmp_path, accumulate_grad_batches=2, callback={"weight_hist": False})
    assert sorted(snapshot.steps) == [0, 1, 2, 3]  # 4 batches an epoch, 2 per step
    assert check_rows(read_rows(out, 0), snapshot.steps) == {0, 1}
    assert check_rows(read_rows(out, 1), snapshot.steps) == {2, 3}
    assert not (out / "weights").exists()


def test_collect_every_counts_optimizer_steps(tmp_path: Path) -> None:
    _, snapshot, _, out = fit(tmp_path, callback={"collect_every": 3, "weight_hist": False})
    assert check_rows(read_rows(out, 0), snapshot.steps) == {0, 3}
    assert check_rows(read_rows(out, 1), snapshot.steps) == {6}


@pytest.mark.parametrize("fused", [False, True], ids=["unscaled-by-lightning", "fused-adam-still-scaled"])
def test_mixed_precision_records_unscaled_gradients(tmp_path: Path, fused: bool) -> None:
    from lightning.pytorch.plugins import MixedPrecision

    # fp16 AMP with a GradScaler on the CPU ("16-mixed" alone falls back to bf16 there)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    _, snapshot, _, out = fit(tmp_path, TinyModule(fused=fused), plugins=[plugin], callback={"weight_hist": False})
    assert check_rows(read_rows(out, 0), snapshot.steps) == {0, 1, 2, 3}
    assert check_rows(read_rows(out, 1), snapshot.steps) == {4, 5, 6, 7}


def test_resumed_fit_continues_the_numbering(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, out, checkpoint = TinyModule(), tmp_path / "run", tmp_path / "epoch0.ckpt"
    first = trainer([BBDecoderCallback(out)], max_epochs=1)
    first.fit(module, loader())
    first.save_checkpoint(checkpoint)

    snapshot = GradSnapshot()
    trainer([BBDecoderCallback(out), snapshot], max_epochs=2).fit(TinyModule(), loader(), ckpt_path=checkpoint)
    assert sorted(snapshot.steps) == [4, 5, 6, 7]
    assert check_rows(read_rows(out, 1), snapshot.steps) == {4, 5, 6, 7}
    assert {int(r["iteration"]) for r in read_rows(out, 0)} == {0, 1, 2, 3}  # the first process's file is kept
    calls = sorted(p.name for p in (out / "weights").rglob("hist_call*.png") if "head" in p.parent.name)
    assert calls == ["hist_call001.png", "hist_call002.png"]  # the weight-histogram numbering continues too


def test_bad_arguments_fail_at_construction_or_fit_start(tmp_path: Path) -> None:
    with pytest.raises(BBDecoderValueError, match="collect_every must be at least 1"):
        BBDecoderCallback(tmp_path, collect_every=0)
    with pytest.raises(BBDecoderTypeError, match="collect_every must be a positive int"):
        BBDecoderCallback(tmp_path, collect_every=1.5)
    with pytest.raises(BBDecoderValueError, match="model cannot be passed"):
        BBDecoderCallback(tmp_path, model=nn.Linear(2, 2))
    module = TinyModule()
    hooks = count_module_hooks(module)
    with pytest.raises(ValueError, match="nope"):  # an unknown layer name: raised at fit start, not mid-epoch
        trainer([BBDecoderCallback(tmp_path / "run", layer_inds="nope")], max_epochs=1).fit(module, loader())
    assert count_module_hooks(module) == hooks


def test_example_script_writes_a_report(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("lightning_train", EXAMPLES / "lightning_train.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    sys.modules.pop("lightning_train", None)
    spec.loader.exec_module(example)
    report = example.main(["--out", str(tmp_path / "out"), "--epochs", "2", "--samples", "128"])
    assert report == tmp_path / "out" / "report.html" and report.is_file()
    assert len(read_rows(tmp_path / "out", 1)) > 0


@pytest.mark.slow
def test_example_runs_as_a_script(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "lightning_train.py"), "--out", str(tmp_path / "out"), "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "report.html").is_file() and "open the report" in done.stdout
    assert cv2.imread(str(tmp_path / "out" / "gradients" / "epoch_001_flow.png")).shape[0] > 100  # drawn for real


class SavedSnapshot(GradSnapshot):
    """A snapshot that rank 0 also saves to ``path`` (the fit runs in worker processes)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_rank == 0:
            torch.save(self.steps, self.path)


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_every_rank_collects_and_rank_0_writes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    out, saved = tmp_path / "run", tmp_path / "grads.pt"
    module = TinyModule()
    run = trainer([BBDecoderCallback(out), SavedSnapshot(saved)], strategy="ddp_fork", devices=2)
    run.fit(module, loader())
    steps = torch.load(saved)
    assert sorted(steps) == [0, 1, 2, 3]  # 4 batches an epoch split over 2 ranks: 2 steps an epoch
    assert check_rows(read_rows(out, 0), steps) == {0, 1}  # DDP's averaged gradients, as on every rank
    assert check_rows(read_rows(out, 1), steps) == {2, 3}
    assert (out / "report.html").is_file()
    assert not list(out.rglob("*-1.*"))  # one writer: no name was taken twice
