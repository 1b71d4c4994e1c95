"""TensorBoard export: events read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import MLP, SmallCNN

from BBDecoder import BBDecoderTypeError, BBDecoderValueError, Master_analyzer, MissingDependencyError
from BBDecoder.analyses.weights import LayerHistograms, ParamHistogram, collect_histograms, tensor_histogram
from BBDecoder.core.layers import Layer
from BBDecoder.export.tensorboard import write_scalars as _write_scalars
from BBDecoder.output.schema import GradientRow

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def read_events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    return accumulator


def typed(rows: list[dict[str, Any]]) -> list[GradientRow]:
    """The event's typed rows; a missing number (None, "nan") is NaN."""

    def number(value: Any) -> float:
        return float("nan") if value is None else float(value)

    fields = ("mean_abs", "max_abs", "l1", "l2", "nonfinite")
    return [
        GradientRow(
            r["epoch"], r["iteration"], r["layer_id"], r["layer_name"], r["param"], *(number(r[k]) for k in fields)
        )
        for r in rows
    ]


def histograms(layer_id: int, layer_name: str, params: list[dict[str, Any]], call: int = 0) -> LayerHistograms:
    """A layer's histograms given as TensorBoard's fields (min, max, num, sum, sum_squares, edges, counts)."""
    layer = LayerHistograms(layer_id, layer_name, "Linear", call)
    for item in params:
        counts = np.asarray(item["bucket_counts"], dtype=np.int64)
        limits = np.asarray(item["bucket_limits"], dtype=np.float64)
        edges = limits if len(limits) == len(counts) + 1 else np.concatenate([[item["min"]], limits])
        layer.params.append(
            ParamHistogram(
                name=item["param"], shape=(item["num"],), edges=edges, counts=counts, numel=item["num"],
                finite=item["num"], mean=item["sum"] / item["num"], std=0.0, min=item["min"], max=item["max"],
                sum=item["sum"], sum_squares=item["sum_squares"], zeros_fraction=0.0, saturation_fraction=0.0,
            )
        )  # fmt: skip
    return layer


def gradient_rows() -> list[dict[str, Any]]:
    rows = []
    for iteration in range(4):
        for layer_id, name, param in ((0, "net.fc0", "weight"), (2, "net/odd <name>", "0.bias")):
            base = 0.1 * (iteration + 1) + layer_id
            rows.append(
                {"epoch": 0, "iteration": iteration + 10, "layer_id": layer_id, "layer_name": name, "param": param,
                 "mean_abs": base, "max_abs": 2 * base, "l1": 3 * base, "l2": 4 * base,
                 "nonfinite": 1 if iteration == 3 and layer_id == 2 else 0}
            )  # fmt: skip
    return rows


@pytest.fixture
def analyzer(tmp_path: Path) -> Master_analyzer:
    wm = Master_analyzer(MLP(), tmp_path / "run", verbose=False, tensorboard_dir=tmp_path / "tb")
    yield wm
    wm.close()


def test_gradient_scalars_round_trip(analyzer: Master_analyzer, tmp_path: Path) -> None:
    rows = gradient_rows()
    analyzer.events.emit("gradients_saved", epoch=0, rows=typed(rows))
    analyzer.close()
    events = read_events(tmp_path / "tb")
    tags = set(events.Tags()["scalars"])
    assert tags >= {"grad_l2/0 net.fc0.weight", "grad_mean_abs/2 net_odd <name>.0.bias"}
    for stat in ("l2", "l1", "mean_abs", "max_abs"):
        for layer_id, name, param in ((0, "net.fc0", "weight"), (2, "net_odd <name>", "0.bias")):
            written = events.Scalars(f"grad_{stat}/{layer_id} {name}.{param}")
            expected = [(r["iteration"], r[stat]) for r in rows if r["layer_id"] == layer_id]
            assert [e.step for e in written] == [step for step, _ in expected]
            np.testing.assert_allclose([e.value for e in written], [v for _, v in expected], rtol=1e-6)
    nonfinite = events.Scalars("grad_nonfinite/2 net_odd <name>.0.bias")
    assert [(e.step, e.value) for e in nonfinite] == [(13, 1.0)]


def test_weight_histograms_round_trip(analyzer: Master_analyzer, tmp_path: Path) -> None:
    layer = {"layer_id": 0, "layer_name": "net.fc0", "param": "weight", "min": -1.0, "max": 2.0, "num": 6,
             "sum": 3.0, "sum_squares": 9.5, "bucket_limits": [0.0, 1.0, 2.0], "bucket_counts": [2, 3, 1]}  # fmt: skip
    edges = dict(layer, param="bias", bucket_limits=[-1.0, 0.0, 1.0, 2.0])  # given as all edges
    analyzer.events.emit("weights_histogram", call=3, weights=[histograms(0, "net.fc0", [layer, edges])], grads=[])
    analyzer.close()
    events = read_events(tmp_path / "tb")
    for param in ("weight", "bias"):
        (event,) = events.Histograms(f"weights/0 net.fc0.{param}")
        value = event.histogram_value
        assert event.step == 3
        assert (value.min, value.max, value.num, value.sum, value.sum_squares) == (-1.0, 2.0, 6, 3.0, 9.5)
        assert list(value.bucket_limit) == [0.0, 1.0, 2.0]
        assert list(value.bucket) == [2, 3, 1]
    assert not [t for t in events.Tags()["histograms"] if t.startswith("gradients/")]  # no .grad yet


def test_gradient_histograms_of_current_grads(analyzer: Master_analyzer, tmp_path: Path) -> None:
    model = analyzer.inner
    loss = model(torch.randn(16, 10)).square().mean()
    loss.backward()
    grad = model.net.fc0.weight.grad.clone()
    analyzer.visualize_weight_hist(0, bins=10)  # the event carries the current gradients' histograms too
    assert torch.equal(model.net.fc0.weight.grad, grad)  # untouched
    analyzer.close()
    (event,) = read_events(tmp_path / "tb").Histograms("gradients/0 net.fc0.weight")
    value = event.histogram_value
    reference = grad.double().numpy().ravel()
    assert value.num == reference.size
    np.testing.assert_allclose([value.min, value.max], [reference.min(), reference.max()], rtol=1e-6)
    np.testing.assert_allclose(value.sum, reference.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(value.sum_squares, (reference**2).sum(), rtol=1e-5)
    counts, _ = np.histogram(reference, bins=10, range=(reference.min(), reference.max()))
    assert len(value.bucket) == 10 and sum(value.bucket) == reference.size
    assert np.abs(np.asarray(value.bucket) - counts).sum() <= 2  # float32 vs float64 at bin edges


def gradient_histogram(values: torch.Tensor, bins: int) -> ParamHistogram | None:
    """What the event carries for one gradient tensor (the weights' own device histogram)."""
    param = torch.nn.Parameter(torch.zeros_like(values))
    param.grad = values
    module = torch.nn.Module()
    module.p = param
    (layer,) = collect_histograms([Layer(0, "m", module, 1)], bins, 0, grads=True)
    return layer.params[0] if layer.params and layer.params[0].finite else None


def test_histogram_summary_against_numpy() -> None:
    torch.manual_seed(1)
    values = torch.randn(5000)
    values[::97] = float("nan")
    values[5] = float("inf")
    summary = gradient_histogram(values, bins=32)
    assert summary is not None
    finite = values[torch.isfinite(values)].double().numpy()
    assert summary.finite == finite.size
    np.testing.assert_allclose(summary.sum, finite.sum(), rtol=1e-5)
    np.testing.assert_allclose(summary.sum_squares, (finite**2).sum(), rtol=1e-5)
    counts, edges = np.histogram(finite, bins=32, range=(finite.min(), finite.max()))
    np.testing.assert_allclose(summary.edges[1:], edges[1:], rtol=1e-6)
    assert summary.edges[-1] == summary.max
    assert np.abs(np.asarray(summary.counts) - counts).sum() <= 2


def test_histogram_summary_edge_cases() -> None:
    constant = gradient_histogram(torch.full((7,), 0.5), bins=16)
    assert constant is not None
    assert constant.min == constant.max == 0.5 and sorted(constant.counts.tolist())[-1] == 7  # one bucket
    assert gradient_histogram(torch.full((3,), float("nan")), bins=8) is None
    half = gradient_histogram(torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), bins=2)
    assert half is not None and half.finite == 3 and half.sum == 6.0
    assert tensor_histogram(torch.tensor([1.0, 2.0]), 2).dtype == torch.float64  # exact sums


def test_real_analyses_feed_tensorboard(tmp_path: Path) -> None:
    model = SmallCNN()
    wm = Master_analyzer(model, tmp_path / "run", verbose=False, tensorboard_dir=tmp_path / "tb")
    if not hasattr(wm, "save_collected_grads") or not hasattr(wm, "visualize_weight_hist"):
        pytest.skip("gradient or weight analyses not available")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        loss = F.cross_entropy(wm(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        wm.backward_propagation(loss, collect_grads=True, layer_inds=[0, "fc"])
        optimizer.step()
    fc_id = wm.layers.one("fc").id
    written = wm.save_collected_grads(0)
    wm.visualize_weight_hist(["conv1", "fc"])
    wm.close()
    table = next(Path(p) for p in written if str(p).endswith(".csv"))
    with table.open() as stream:
        rows = list(csv.DictReader(stream))
    events = read_events(tmp_path / "tb")
    assert len(rows) == 3 * 2  # 3 iterations x 2 weight tensors
    for row in rows:
        scalars = events.Scalars(f"grad_l2/{row['layer_id']} {row['layer_name']}.{row['param']}")
        by_step = {e.step: e.value for e in scalars}
        np.testing.assert_allclose(by_step[int(row["iteration"])], float(row["l2"]), rtol=1e-5)
    fc = model.fc.weight.detach().double()
    (event,) = events.Histograms(f"weights/{fc_id} fc.weight")
    assert event.histogram_value.num == fc.numel()
    np.testing.assert_allclose(event.histogram_value.sum, fc.sum().item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(event.histogram_value.max, fc.max().item(), rtol=1e-6)
    assert sum(event.histogram_value.bucket) == fc.numel()
    (grad_event,) = events.Histograms(f"gradients/{fc_id} fc.weight")
    np.testing.assert_allclose(grad_event.histogram_value.sum, model.fc.weight.grad.double().sum().item(), atol=1e-6)


def test_activation_health_and_update_ratios_feed_tensorboard(tmp_path: Path) -> None:
    """The saved CSVs' numbers, as scalars: act_<stat>/<ID name> per pass, update_ratio/<ID name.param> per step."""
    torch.manual_seed(0)
    model = SmallCNN()
    wm = Master_analyzer(model, tmp_path / "run", verbose=False, tensorboard_dir=tmp_path / "tb")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    wm.watch_optimizer(optimizer, "fc")
    for _ in range(3):
        loss = F.cross_entropy(wm(torch.randn(4, 3, 8, 8), collect_acts=True), torch.tensor([0, 1, 2, 3]))
        optimizer.zero_grad()
        wm.backward_propagation(loss, collect_grads=True, layer_inds="fc")
        optimizer.step()
    written = wm.save_collected_grads(0)
    wm.close()
    events = read_events(tmp_path / "tb")

    def csv_rows(name: str) -> list[dict[str, str]]:
        with next(Path(p) for p in written if str(p).endswith(name)).open() as stream:
            return list(csv.DictReader(stream))

    acts, updates = csv_rows("_activations.csv"), csv_rows("_updates.csv")
    assert acts and updates
    for row in acts:
        tag = f"{row['layer_id']} {row['layer_name']}"
        for stat in ("mean", "std", "max_abs", "dead_frac"):
            by_step = {e.step: e.value for e in events.Scalars(f"act_{stat}/{tag}")}
            np.testing.assert_allclose(by_step[int(row["iteration"])], float(row[stat]), rtol=1e-5, atol=1e-7)
    for row in updates:
        by_step = {e.step: e.value for e in events.Scalars(f"update_ratio/{row['layer_id']} fc.{row['param']}")}
        np.testing.assert_allclose(by_step[int(row["step"])], float(row["ratio"]), rtol=1e-5)
    assert not [t for t in events.Tags()["scalars"] if t.startswith("act_saturated_frac/")]  # no bounded layer: nan


def test_missing_gradients_are_left_out(analyzer: Master_analyzer, tmp_path: Path) -> None:
    rows = gradient_rows()[:2]
    rows[0] = dict(rows[0], l2=float("nan"), l1="nan", mean_abs=None)
    analyzer.events.emit("gradients_saved", epoch=0, rows=typed(rows))
    analyzer.close()
    tags = set(read_events(tmp_path / "tb").Tags()["scalars"])
    assert "grad_l2/0 net.fc0.weight" not in tags and "grad_max_abs/0 net.fc0.weight" in tags
    assert "grad_l2/2 net_odd <name>.0.bias" in tags


def test_scalars_without_the_batched_path() -> None:
    class Plain:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float, int]] = []

        def add_scalar(self, tag: str, value: float, global_step: int) -> None:
            self.calls.append((tag, value, global_step))

    writer = Plain()
    _write_scalars(writer, {3: [("a", 1.0), ("b", 2.0)], 4: [("a", 5.0)]})
    assert writer.calls == [("a", 1.0, 3), ("b", 2.0, 3), ("a", 5.0, 4)]


def test_without_tensorboard_dir_events_are_ignored(tmp_path: Path) -> None:
    wm = Master_analyzer(MLP(), tmp_path, verbose=False)
    wm.events.emit("gradients_saved", epoch=0, rows=typed(gradient_rows()))
    wm.events.emit("weights_histogram", call=0, weights=[], grads=[])
    assert not wm.events.wanted("gradients_saved")
    wm.close()
    wm.close()  # idempotent
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_close_is_idempotent_and_files_stay_outside_save_path(analyzer: Master_analyzer, tmp_path: Path) -> None:
    analyzer.events.emit("gradients_saved", epoch=0, rows=typed(gradient_rows()))
    analyzer.close()
    analyzer.close()
    analyzer.events.emit("gradients_saved", epoch=1, rows=typed(gradient_rows()))  # after close: ignored, no error
    assert list((tmp_path / "tb").glob("events.out.tfevents*"))
    assert not list((tmp_path / "run").rglob("events.out.tfevents*"))


def test_missing_tensorboard_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match=r"pip install BBDecoder\[tensorboard\]"):
        Master_analyzer(MLP(), tmp_path, verbose=False, tensorboard_dir=tmp_path / "tb")


def test_bad_tensorboard_dir(tmp_path: Path) -> None:
    with pytest.raises(BBDecoderTypeError, match=r"tensorboard_dir must be a str or os\.PathLike, got int 5"):
        Master_analyzer(MLP(), tmp_path, verbose=False, tensorboard_dir=5)
    with pytest.raises(BBDecoderValueError, match=r"tensorboard_dir='' is empty"):
        Master_analyzer(MLP(), tmp_path, verbose=False, tensorboard_dir="")
