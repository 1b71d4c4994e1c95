"""Activation health: numbers against float64 references and hand-computed cases, hooks, files, alerts, no sync."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from models import MLP, SmallCNN, TokenModel
from sync import SyncCounter
from torch import nn

from BBDecoder import (
    ActivationAlertWarning,
    BBDecoderTypeError,
    BBDecoderValueError,
    BBDecoderWarning,
    LayerSelectionError,
    Master_analyzer,
)
from BBDecoder.analyses.activations import (
    SATURATION_MARGIN,
    activation_bounds,
    activation_stats,
    unit_convention,
    unit_dim,
)
from BBDecoder.core.hooks import count_module_hooks
from BBDecoder.output.schema import ACTIVATION_CSV_HEADER, ActivationEpochReport, ActivationRow

GOLDEN_HEADER = "epoch,iteration,layer_id,layer_name,mean,std,max_abs,zero_frac,dead_frac,saturated_frac"


def make(model: nn.Module, path: Path, **kwargs: Any) -> Master_analyzer:
    return Master_analyzer(model, path, None, verbose=False, **kwargs)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def named(paths: list[Path], suffix: str) -> Path:
    (match,) = [p for p in paths if p.name.endswith(suffix)]
    return match


def reference(output: torch.Tensor, dim: int | None, bounds: tuple[float, float] | None) -> list[float]:
    """The six statistics in float64, the obvious way (NumPy)."""
    x = output.detach().double().numpy()
    if dim is None:
        dead = float(np.all(x == 0))
    else:
        moved = np.moveaxis(x, dim, 0).reshape(x.shape[dim], -1)
        dead = float(np.mean(np.all(moved == 0, axis=1)))
    if bounds is None:
        saturated = math.nan
    else:
        lo, hi = bounds
        band = SATURATION_MARGIN * (hi - lo)
        saturated = float(np.mean((x <= lo + band) | (x >= hi - band)))
    return [float(x.mean()), float(x.std()), float(np.abs(x).max()), float(np.mean(x == 0)), dead, saturated]


def assert_close(got: list[float], want: list[float], rtol: float = 2e-5) -> None:
    for g, w in zip(got, want, strict=True):
        if math.isnan(w):
            assert math.isnan(g)
        else:
            assert g == pytest.approx(w, rel=rtol, abs=1e-6)


class Probe(nn.Module):
    """Identity that remembers how many hooks the model had when it ran."""

    def __init__(self, root: list[nn.Module]) -> None:
        super().__init__()
        self._root = root
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(count_module_hooks(self._root[0]))
        return x


class Killer(nn.Module):
    """Zeroes the first ``dead`` features from its ``start``-th call on."""

    def __init__(self, dead: int, start: int) -> None:
        super().__init__()
        self.dead, self.start, self.calls = dead, start, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > self.start:
            x = x.clone()
            x[:, : self.dead] = 0
        return x


# --------------------------------------------------------------------- the numbers
@pytest.mark.parametrize(
    ("shape", "dim", "bounds"),
    [
        ((6, 5, 4, 3), 1, None),
        ((7, 9), 1, (0.0, 1.0)),
        ((4, 6, 8), 2, (-1.0, 1.0)),
        ((4, 6, 8), 1, None),
        ((11,), None, None),
    ],
)
def test_statistics_match_float64_reference(shape: tuple[int, ...], dim: int | None, bounds: Any) -> None:
    x = torch.randn(*shape) * 2
    squash = {(0.0, 1.0): torch.sigmoid, (-1.0, 1.0): torch.tanh}.get(bounds)
    x = squash(x * 3) if squash is not None else torch.relu(x)
    if dim is not None:  # two units dead for the whole batch
        index = [slice(None)] * x.ndim
        index[dim] = slice(0, 2)
        x[tuple(index)] = 0
    got = activation_stats(x, dim, bounds).tolist()
    assert got[-1] == 1.0
    assert_close(got[:6], reference(x, dim, bounds))


def test_dead_units_hand_computed() -> None:
    """A linear layer whose weights make 3 of its 6 units negative for every input: ReLU kills them."""
    linear = nn.Linear(4, 6)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.copy_(torch.tensor([-1.0, -2.0, -0.5, 1.0, 2.0, 0.0]))
        linear.weight[5, 0] = 1.0  # unit 5 follows input 0: positive for half of the batch
    x = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [2.0, 0, 0, 0], [-2.0, 0, 0, 0]])
    out = torch.relu(linear(x))
    # units 0-2 dead; unit 3 = 1, unit 4 = 2 everywhere; unit 5 = relu(x0): 1, 0, 2, 0
    mean, std, max_abs, zero_frac, dead_frac, saturated, _ = activation_stats(out, 1, None).tolist()
    values = [0, 0, 0, 1, 2, 1, 0, 0, 0, 1, 2, 0, 0, 0, 0, 1, 2, 2, 0, 0, 0, 1, 2, 0]
    assert mean == pytest.approx(sum(values) / 24)
    assert std == pytest.approx(float(np.std(values)))
    assert max_abs == 2.0
    assert zero_frac == pytest.approx(14 / 24)
    assert dead_frac == 0.5  # units 0, 1, 2 of 6
    assert math.isnan(saturated)


def test_saturation_hand_computed() -> None:
    # sigmoid: within 1% of [0, 1] means <= 0.01 or >= 0.99
    x = torch.tensor([[0.005, 0.5, 0.995, 0.98], [0.0, 1.0, 0.3, 0.011]])
    assert activation_stats(x, 1, (0.0, 1.0))[5].item() == pytest.approx(4 / 8)
    # hardtanh(-2, 2): band 0.04 at each end
    y = torch.tensor([[-2.0, -1.97, -1.9, 0.0, 1.95, 2.0]])
    assert activation_stats(y, 1, (-2.0, 2.0))[5].item() == pytest.approx(3 / 6)


@pytest.mark.parametrize(
    ("module", "bounds"),
    [
        (nn.Sigmoid(), (0.0, 1.0)),
        (nn.Hardsigmoid(), (0.0, 1.0)),
        (nn.Tanh(), (-1.0, 1.0)),
        (nn.Softsign(), (-1.0, 1.0)),
        (nn.Hardtanh(-3.0, 0.5), (-3.0, 0.5)),
        (nn.ReLU6(), (0.0, 6.0)),
        (nn.Sequential(nn.Linear(2, 2), nn.Tanh()), (-1.0, 1.0)),
        (nn.ReLU(), None),
        (nn.Linear(2, 2), None),
        (nn.Sequential(nn.Tanh(), nn.Linear(2, 2)), None),
    ],
)
def test_bounded_activations(module: nn.Module, bounds: Any) -> None:
    assert activation_bounds(module) == bounds


def test_unit_dimension_rules() -> None:
    assert unit_convention(nn.Conv1d(2, 3, 3)) == "first"
    assert unit_convention(nn.BatchNorm1d(3)) == "first"
    assert unit_convention(nn.Linear(3, 3)) == "last"
    assert unit_convention(nn.TransformerEncoderLayer(8, 2, batch_first=True)) == "last"
    assert unit_convention(nn.Sequential(nn.Linear(2, 2), nn.Conv1d(2, 2, 1), nn.ReLU())) == "first"
    assert unit_convention(nn.ReLU()) == "inherit"
    assert unit_dim((4, 3, 8, 8), "inherit", None) == 1  # (N, C, H, W): channels
    assert unit_dim((4, 10), "last", None) == 1  # (N, D): features
    assert unit_dim((4, 6, 8), "first", None) == 1  # Conv1d (N, C, L)
    assert unit_dim((4, 6, 8), "last", None) == 2  # tokens (N, T, D)
    assert unit_dim((4, 6, 8), "inherit", ((4, 6, 8), 1)) == 1  # a ReLU after a Conv1d
    assert unit_dim((4, 6, 8), "inherit", ((4, 6, 9), 1)) == 2  # another shape: the last dim
    assert unit_dim((5,), "first", None) is None


# ------------------------------------------------------------------ end to end
def test_recorded_numbers_match_reference(tmp_path: Path) -> None:
    model = SmallCNN()
    model.train()
    wm = make(model, tmp_path)
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: outputs.__setitem__(name, o.detach().clone()))
        for name, module in model.named_children()
    ]
    wm.forward_propagation(torch.randn(6, 3, 8, 8), collect_acts=True)
    for handle in handles:
        handle.remove()
    rows = read_csv(named(wm.save_collected_grads(3), "_activations.csv"))
    assert [r["layer_name"] for r in rows] == [name for name, _ in model.named_children()]
    for row in rows:
        out = outputs[row["layer_name"]]
        dim = 1 if out.ndim >= 2 else None
        want = reference(out, dim, None)
        assert row["epoch"] == "3" and row["iteration"] == "0"
        assert_close([float(row[k]) for k in ACTIVATION_CSV_HEADER[4:]], want)


def test_csv_header_golden_and_schema_round_trip(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path, depth=2)
    wm.forward_propagation(torch.randn(5, 10), collect_acts=True, layer_inds=["net.act0", "net.fc2"])
    paths = wm.save_collected_grads(0)
    path = named(paths, "_activations.csv")
    assert path.read_text(encoding="utf-8").splitlines()[0] == GOLDEN_HEADER
    assert ",".join(ACTIVATION_CSV_HEADER) == GOLDEN_HEADER
    report = ActivationEpochReport.from_json(json.loads(named(paths, "_activation_alerts.json").read_text()))
    assert [s.layer_name for s in report.summary] == ["net.act0", "net.fc2"]
    assert report.summary[0].bounds == [-1.0, 1.0] and report.summary[1].bounds is None
    assert report.alerts == [] and report.recorded_iterations == 1


def test_tokens_use_the_last_dimension(tmp_path: Path) -> None:
    model = TokenModel()
    wm = make(model, tmp_path)
    wm.forward_propagation(torch.randn(4, 6, 3), collect_acts=True, layer_inds="embed")
    (summary,) = json.loads(named(wm.save_collected_grads(0), "_activation_alerts.json").read_text())["summary"]
    assert summary["unit_dim"] == 2 and summary["units"] == 8


def test_collect_every_k_calls_and_iteration_numbers(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path)
    for _ in range(7):
        wm.forward_propagation(torch.randn(3, 10), collect_acts=3, layer_inds=0)
    rows = read_csv(named(wm.save_collected_grads(0), "_activations.csv"))
    assert [r["iteration"] for r in rows] == ["0", "3", "6"]


def test_no_hooks_outside_recorded_steps_and_modes_kept(tmp_path: Path) -> None:
    root: list[nn.Module] = []
    probe = Probe(root)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), probe, nn.ReLU())
    root.append(model)
    twin = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Identity(), nn.ReLU())
    twin.load_state_dict(model.state_dict(), strict=False)
    model.train()
    twin.train()
    wm = make(model, tmp_path)
    x = torch.randn(8, 4)
    for step in range(4):
        torch.manual_seed(step)
        got = wm.forward_propagation(x, collect_acts=2)
        torch.manual_seed(step)
        assert torch.equal(got, twin(x))  # the same dropout mask: train mode kept, outputs unchanged
    assert probe.seen[0] > 0 and probe.seen[1] == 0 and probe.seen[2] > 0 and probe.seen[3] == 0
    assert count_module_hooks(model) == 0 and wm.hooks.active == 0
    assert torch.equal(model[1].running_mean, twin[1].running_mean)
    assert model.training and all(m.training for m in model.modules())


def test_model_keywords_pass_through(tmp_path: Path) -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
            return self.fc(x) * scale

    model = Scaled()
    wm = make(model, tmp_path)
    x = torch.randn(2, 3)
    assert torch.equal(wm.forward_propagation(x, scale=2.0, collect_acts=True, layer_inds="fc"), model(x, scale=2.0))
    assert torch.equal(wm(x, scale=3.0), model(x, scale=3.0))


def test_a_layer_that_did_not_run_is_nan(tmp_path: Path) -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    wm = make(Branchy(), tmp_path)
    wm.forward_propagation(torch.randn(3, 2), collect_acts=True)
    paths = wm.save_collected_grads(0)
    rows = {r["layer_name"]: r for r in read_csv(named(paths, "_activations.csv"))}
    assert all(rows["b"][k] == "nan" for k in ACTIVATION_CSV_HEADER[4:])
    assert rows["a"]["mean"] != "nan"
    summary = {s["layer_name"]: s for s in json.loads(named(paths, "_activation_alerts.json").read_text())["summary"]}
    assert summary["b"]["status"] == "not run"


def test_forward_propagation_never_syncs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3), nn.Sigmoid())
    wm = make(model, tmp_path)
    x = torch.randn(2, 2, 6, 6)
    for step in range(70):  # past the first buffer growth (64 rows)
        with SyncCounter() as counter:
            wm.forward_propagation(x, collect_acts=True, layer_inds=None if step % 2 else [1, 4])
        assert counter.calls == [], f"step {step}: {counter.calls}"
    assert wm._acts.recorder.rows == 70


# ---------------------------------------------------------------------- alerts
def test_dead_alert_says_since_when_across_epochs(tmp_path: Path) -> None:
    killer = Killer(dead=5, start=7)
    model = nn.Sequential(nn.Linear(4, 6), killer, nn.Linear(6, 2))
    wm = make(model, tmp_path)
    for _ in range(10):
        wm.forward_propagation(torch.randn(4, 4), collect_acts=2, layer_inds=1)
    with pytest.warns(ActivationAlertWarning, match=r"layer 1 '1': 83% of units dead since iteration 8"):
        wm.save_collected_grads(0)
    for _ in range(10):
        wm.forward_propagation(torch.randn(4, 4), collect_acts=2, layer_inds=1)
    wm.save_collected_grads(1)  # still dead: alerted again, warned only once
    alerts = wm.activation_alerts()
    assert [(a["epoch"], a["kind"], a["iteration"]) for a in alerts] == [(0, "dead", 8), (1, "dead", 8)]
    assert alerts[0]["value"] == pytest.approx(5 / 6)

    again = make(model, tmp_path)  # a new process on the same folder continues the history
    for _ in range(4):
        again.forward_propagation(torch.randn(4, 4), collect_acts=2, layer_inds=1)
    with pytest.warns(ActivationAlertWarning, match="since iteration 8 of epoch 0"):
        again.save_collected_grads(2)


def test_saturated_alert(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh())
    with torch.no_grad():
        model[0].weight.mul_(100)
    wm = make(model, tmp_path)
    wm.forward_propagation(torch.randn(32, 3), collect_acts=True)
    with pytest.warns(ActivationAlertWarning, match=r"layer 1 '1' \(Tanh\): \d+% of outputs saturated"):
        paths = wm.save_collected_grads(0)
    report = ActivationEpochReport.from_json(json.loads(named(paths, "_activation_alerts.json").read_text()))
    (alert,) = report.alerts
    assert alert.kind == "saturated" and alert.value >= wm.saturated_threshold
    assert report.summary[1].status == "saturated"


def test_healthy_layers_raise_no_alert(tmp_path: Path) -> None:
    model = SmallCNN()
    wm = make(model, tmp_path)
    for _ in range(3):
        wm.forward_propagation(torch.randn(8, 3, 8, 8), collect_acts=True)
    wm.save_collected_grads(0)  # the suite turns warnings into errors
    assert wm.activation_alerts() == []


# -------------------------------------------------------------- saving, events
def test_only_activations_collected_writes_and_does_not_warn(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path)
    received: list[Any] = []
    wm.events.subscribe("activations_saved", lambda epoch, rows: received.append((epoch, rows)))
    wm.forward_propagation(torch.randn(3, 10), collect_acts=True)
    paths = wm.save_collected_grads(4, save_folder="health")
    assert {p.name for p in paths} == {
        "epoch_004_activations.csv",
        "epoch_004_activations.png",
        "epoch_004_activation_layers.npz",
        "epoch_004_activation_heatmap.png",
        "epoch_004_activation_alerts.json",
    }
    assert all(p.parent == tmp_path / "health" for p in paths)
    ((epoch, rows),) = received
    assert epoch == 4 and all(isinstance(r, ActivationRow) for r in rows) and len(rows) == len(wm.layers)
    assert wm._acts.recorder.rows == 0
    with pytest.warns(BBDecoderWarning, match="no gradient statistics were collected"):
        assert wm.save_collected_grads(5) == []


def test_bad_arguments(tmp_path: Path) -> None:
    wm = make(MLP(), tmp_path)
    x = torch.randn(2, 10)
    with pytest.raises(BBDecoderTypeError, match="collect_acts must be True, False or a positive int"):
        wm.forward_propagation(x, collect_acts="yes")
    with pytest.raises(BBDecoderValueError, match="collect_acts=0"):
        wm.forward_propagation(x, collect_acts=0)
    with pytest.raises(LayerSelectionError, match="nope"):
        wm.forward_propagation(x, collect_acts=True, layer_inds="nope")
    with pytest.raises(LayerSelectionError):
        wm.forward_propagation(x, layer_inds=99)  # checked even when not recording


# ----------------------------------------------------------------- readability
@pytest.mark.parametrize("count", [5, 40, 500])
def test_figures_stay_readable(count: int) -> None:
    """Under 4,000 px on the long side at the store's 110 dpi, no text under 8 px (issue 13's rules)."""
    import io

    from matplotlib.text import Text
    from PIL import Image

    from BBDecoder.plots.activations import activation_health_figure, activation_heatmap_figure

    rng = np.random.default_rng(0)
    labels = [f"{i} layer{i // 4}.{i % 4}.relu" for i in range(count)]
    stats = {name: rng.random(min(count, 40)) for name in ("mean", "std", "max_abs", "zero_frac", "dead_frac")}
    stats["saturated_frac"] = np.where(rng.random(min(count, 40)) > 0.5, rng.random(min(count, 40)), np.nan)
    figures = [
        activation_health_figure(labels[:40], stats, ["ok"] * min(count, 40), title="health"),
        activation_heatmap_figure(
            rng.random((count, 300)),
            np.where(rng.random((count, 1)) > 0.7, rng.random((count, 300)), np.nan),
            labels,
            np.arange(300),
            np.repeat(np.arange(3), 100),
        ),
    ]
    for figure in figures:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        buffer.seek(0)
        with Image.open(buffer) as image:
            assert max(image.size) <= 4000, image.size
        sizes = [t.get_fontsize() * 110 / 72 for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]
        assert min(sizes) >= 8.0


def test_a_failed_activation_write_keeps_the_epoch_and_the_gradient_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gradients are saved and reported (event, warning) before the activation files; those stay held on failure."""
    from BBDecoder import OutputWriteError
    from BBDecoder.analyses import activations

    wm = Master_analyzer(MLP(), tmp_path, verbose=False)
    saved: list[int] = []
    wm.events.subscribe("gradients_saved", lambda **data: saved.append(data["epoch"]))
    wm.backward_propagation(wm.forward_propagation(torch.randn(4, 10), collect_acts=True).sum(), collect_grads=True)

    def full_disk(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(activations, "_write_epoch", full_disk)
    with pytest.raises(OutputWriteError, match=r"could not write the activation files: .*No space left.*still held"):
        wm.save_collected_grads(3)
    assert saved == [3] and (tmp_path / "gradients/epoch_003_grads.csv").is_file()
    monkeypatch.undo()
    written = wm.save_collected_grads(3)  # the held activation epoch, written once the cause is gone
    assert [p.name for p in written if p.suffix == ".csv"] == ["epoch_003_activations.csv"]


def test_thresholds_are_constructor_arguments_checked_when_set(tmp_path: Path) -> None:
    wm = Master_analyzer(MLP(), tmp_path, verbose=False, dead_threshold=0.9, saturated_threshold=0.1)
    assert (wm.dead_threshold, wm.saturated_threshold) == (0.9, 0.1)
    with pytest.raises(
        BBDecoderValueError, match=r"saturated_threshold must lie in \(0, 1\], got saturated_threshold=2"
    ):
        wm.saturated_threshold = 2
    with pytest.raises(BBDecoderTypeError, match="dead_threshold must be a number"):
        Master_analyzer(MLP(), tmp_path / "b", verbose=False, dead_threshold="half")
    assert wm.saturated_threshold == 0.1  # a refused value leaves the old one
