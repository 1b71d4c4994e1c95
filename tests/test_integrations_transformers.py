"""Hugging Face ``BBDecoderCallback``: what ``Trainer`` runs record, when, and that the model stays untouched.

Each run trains a tiny ``BertForSequenceClassification`` (2 layers, hidden size 32, built
from a config: nothing is downloaded) for 2 epochs on random tokens on the CPU. A second,
test-only callback copies every ``.grad`` in float64 at the same event
(``on_pre_optimizer_step``) and the saved CSV rows are checked against statistics computed
from those copies. Figures are written as a 1-pixel PNG without drawing (drawing is most of
a save's time on a small CPU; the numbers do not depend on it).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
import cv2  # noqa: E402
import matplotlib.figure  # noqa: E402
import numpy as np  # noqa: E402

from BBDecoder.core.hooks import count_module_hooks  # noqa: E402
from BBDecoder.errors import BBDecoderTypeError, BBDecoderValueError  # noqa: E402
from BBDecoder.integrations.transformers import BBDecoderCallback  # noqa: E402
from BBDecoder.kernels import gradstats  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLES, BATCH, TOKENS, VOCAB = 16, 4, 8, 64  # 4 optimizer steps per epoch without accumulation
RTOL = 1e-5


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, VOCAB, (SAMPLES, TOKENS), generator=generator)
        self.labels = torch.randint(0, 2, (SAMPLES,), generator=generator)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(TOKENS, dtype=torch.long),
            "labels": self.labels[i],
        }


class GradSnapshot(transformers.TrainerCallback):
    """Float64 copies of every gradient at ``on_pre_optimizer_step``, keyed by global step."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, torch.Tensor]] = {}

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.steps[state.global_step] = {
            name: p.grad.detach().double() for name, p in model.named_parameters() if p.grad is not None
        }


def tiny_bert() -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=TOKENS,
        num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def train(tmp_path: Path, callback: BBDecoderCallback, resume: Path | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Train with ``callback`` and a snapshot; checks the model is unchanged; returns (snapshot, trainer)."""
    model = tiny_bert()
    snapshot = GradSnapshot()
    options = {
        "output_dir": str(tmp_path / "hf"),
        "per_device_train_batch_size": BATCH,
        "num_train_epochs": 2,
        "learning_rate": 1e-3,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "seed": 0,
        **kwargs,
    }
    keys, hooks = list(model.state_dict()), count_module_hooks(model)
    trainer = transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**options),
        train_dataset=RandomTokens(),
        callbacks=[callback, snapshot],
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    assert list(model.state_dict()) == keys
    assert count_module_hooks(model) == hooks
    assert callback.analyzer.inner is model
    return snapshot, trainer


def read_rows(folder: Path, epoch: int) -> list[dict[str, str]]:
    with open(folder / "gradients" / f"epoch_{epoch:03d}_grads.csv", newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def check_rows(
    rows: list[dict[str, str]], steps: dict[int, dict[str, torch.Tensor]], bias: bool = False, prefix: str = ""
) -> set[int]:
    """Every row equals the float64 statistics of its step's gradient; returns the iterations seen."""
    seen: dict[int, set[str]] = {}
    for row in rows:
        step = int(row["iteration"])
        name = row["param"] if row["layer_name"] == "(model)" else f"{row['layer_name']}.{row['param']}"
        g = steps[step][name]
        expected = {"mean_abs": g.abs().mean(), "max_abs": g.abs().max(), "l1": g.abs().sum(), "l2": g.norm()}
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(float(value), rel=RTOL, abs=1e-30), (step, name, key)
        assert row["nonfinite"] == "0"
        seen.setdefault(step, set()).add(name)
    for step, names in seen.items():  # every tensor with a gradient (biases only when asked), nothing else
        assert names == {n for n in steps[step] if n.startswith(prefix) and (bias or not n.endswith("bias"))}, step
    return set(seen)


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
def test_every_optimizer_step_is_recorded_after_clipping(tmp_path: Path) -> None:
    out = tmp_path / "run"
    callback = BBDecoderCallback(out, include_bias=True, vanish_threshold=0, weight_hist="classifier")
    snapshot, _ = train(tmp_path, callback, max_grad_norm=1e-3)
    assert sorted(snapshot.steps) == list(range(8))  # 2 epochs × 4 steps
    assert check_rows(read_rows(out, 0), snapshot.steps, bias=True) == {0, 1, 2, 3}  # iteration = state.global_step
    assert check_rows(read_rows(out, 1), snapshot.steps, bias=True) == {4, 5, 6, 7}
    # recorded after Trainer clipped to max_grad_norm: the whole model's gradient norm is 1e-3
    for step in (0, 7):
        rows = [r for r in read_rows(out, step // 4) if int(r["iteration"]) == step]
        assert math.sqrt(sum(float(r["l2"]) ** 2 for r in rows)) == pytest.approx(1e-3, rel=1e-4)
    assert (out / "report.html").is_file()
    assert len(list((out / "weights").rglob("hist_call*.png"))) == 2  # one per epoch
    assert not list(out.rglob("*-1.*"))  # nothing saved twice


def test_gradient_accumulation_records_once_per_optimizer_step(tmp_path: Path) -> None:
    out = tmp_path / "run"
    snapshot, _ = train(tmp_path, BBDecoderCallback(out, weight_hist=False), gradient_accumulation_steps=2)
    assert sorted(snapshot.steps) == [0, 1, 2, 3]  # 4 batches an epoch, 2 per step
    assert check_rows(read_rows(out, 0), snapshot.steps) == {0, 1}
    assert check_rows(read_rows(out, 1), snapshot.steps) == {2, 3}


def test_save_every_for_step_based_runs(tmp_path: Path) -> None:
    out = tmp_path / "run"
    callback = BBDecoderCallback(out, save_every=4, collect_every=2, layer_inds="classifier", weight_hist=False)
    snapshot, _ = train(tmp_path, callback, max_steps=6)
    assert sorted(snapshot.steps) == list(range(6))
    assert check_rows(read_rows(out, 0), snapshot.steps, prefix="classifier.") == {0, 2}  # steps 0-3, saved at step 4
    assert check_rows(read_rows(out, 1), snapshot.steps, prefix="classifier.") == {4}  # 4-5, saved at the end
    assert not (out / "gradients" / "epoch_002_grads.csv").exists()


def test_resumed_training_continues_the_numbering(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(tmp_path, BBDecoderCallback(out, weight_hist="classifier"), num_train_epochs=1, save_strategy="epoch")
    (checkpoint,) = (tmp_path / "hf").glob("checkpoint-*")
    snapshot, _ = train(tmp_path, BBDecoderCallback(out, weight_hist="classifier"), resume=checkpoint)
    assert sorted(snapshot.steps) == [4, 5, 6, 7]
    assert check_rows(read_rows(out, 1), snapshot.steps) == {4, 5, 6, 7}
    assert {int(r["iteration"]) for r in read_rows(out, 0)} == {0, 1, 2, 3}  # the first process's file is kept
    calls = sorted(p.name for p in (out / "weights").rglob("hist_call*.png"))
    assert calls == ["hist_call001.png", "hist_call002.png"]


def test_fp16_gradients_are_unscaled_whether_or_not_the_scaler_has_run(tmp_path: Path) -> None:
    """On a GPU ``fp16=True`` gives accelerate's optimizer a GradScaler (none on the CPU, so it is built here).

    ``Trainer`` unscales before ``on_pre_optimizer_step``; should the gradients still be
    scaled (another path), the callback sees it in the scaler's state and unscales them.
    """
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    try:
        Accelerator(cpu=True)
        optimizer = AcceleratedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), False, scaler)
        callback, state = BBDecoderCallback(tmp_path / "run", weight_hist=False), SimpleNamespace(global_step=0)
        callback.on_train_begin(None, state, None, model=model)
        scaler.scale(model(torch.randn(4, 6)).square().mean()).backward()
        truth = {n: p.grad.double() / 2.0**10 for n, p in model.named_parameters()}
        callback.on_pre_optimizer_step(None, state, None, optimizer=optimizer)  # still scaled
        scaler.unscale_(optimizer.optimizer)
        state.global_step = 1  # Trainer counts the step taken in between
        callback.on_pre_optimizer_step(None, state, None, optimizer=optimizer)  # unscaled, as Trainer leaves them
        callback.on_epoch_end(None, state, None)
        callback.on_train_end(None, state, None)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert check_rows(read_rows(tmp_path / "run", 0), {0: truth, 1: truth}) == {0, 1}


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(BBDecoderValueError, match="save_every must be at least 1"):
        BBDecoderCallback(tmp_path, save_every=0)
    with pytest.raises(BBDecoderTypeError, match="save_every must be a positive int"):
        BBDecoderCallback(tmp_path, save_every="10")
    with pytest.raises(BBDecoderValueError, match="model cannot be passed"):
        BBDecoderCallback(tmp_path, model=None)


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("hf_trainer_example", EXAMPLES / "hf_trainer.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_example_writes_a_report(tmp_path: Path) -> None:
    report = load_example().main(["--out", str(tmp_path / "out"), "--epochs", "1"])
    assert report == tmp_path / "out" / "report.html" and report.is_file()
    assert read_rows(tmp_path / "out", 0)


@pytest.mark.slow
def test_example_runs_as_a_script(tmp_path: Path) -> None:
    command = [sys.executable, str(EXAMPLES / "hf_trainer.py"), "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [*command, "--max-steps", "12", "--save-every", "5"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "report.html").is_file() and "open the report" in done.stdout
    assert [len({r["iteration"] for r in read_rows(tmp_path / "out", ep)}) for ep in range(3)] == [5, 5, 2]
