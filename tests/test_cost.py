"""Per-layer cost: hand-computed FLOPs, totals, time attribution, files, and no side effects."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import matplotlib.image
import pytest
import torch
from models import ZOO, FrozenNet, RejectingModel, ResidualNet
from torch import nn
from torch.nn.modules import module as module_globals
from torch.utils.flop_counter import FlopCounterMode

from BBDecoder import BBDecoderTypeError, BBDecoderValueError, Master_analyzer, ModelForwardError
from BBDecoder.analyses.cost import COST_KEYS
from BBDecoder.core.hooks import count_module_hooks


def analyzer(model: nn.Module, path: Path, depth: int = 1) -> Master_analyzer:
    return Master_analyzer(model, path, verbose=False, depth=depth)


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 7)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2)  # (1, 3, 9, 9) → (1, 4, 4, 4)
        self.b = nn.Conv2d(4, 4, 3, padding=1, groups=2)  # → (1, 4, 4, 4)
        self.c = nn.Conv2d(4, 6, 1, bias=False)  # → (1, 6, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(4, 3)
        self.right = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.left(x) + self.right(y)


class Sleeper(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class Reused(nn.Module):
    """``shared`` runs twice; a raw parameter is used outside every child."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.weight = nn.Parameter(torch.randn(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.shared(x)) @ self.weight


def by_name(rows: list[dict]) -> dict[str, dict]:
    return {row["name"]: row for row in rows}


# ----------------------------------------------------------------------------- FLOPs


def test_linear_flops_by_hand(tmp_path: Path) -> None:
    rows = by_name(analyzer(TwoLinear(), tmp_path).layer_costs([3, 10]))
    # forward: 2·N·in·out (a multiply-add is 2 FLOPs; bias adds are not counted)
    assert rows["fc1"]["forward_flops"] == 2 * 3 * 10 * 7 == 420
    assert rows["fc2"]["forward_flops"] == 2 * 3 * 7 * 4 == 168
    assert rows["act"]["forward_flops"] == 0
    # backward: fc2 computes grad of its input and of its weight; fc1 only of its weight
    # (the batch itself needs no gradient in training)
    assert rows["fc2"]["backward_flops"] == 2 * 168
    assert rows["fc1"]["backward_flops"] == 420
    assert rows["fc1"]["params"] == 77 and rows["fc2"]["params"] == 32
    assert rows["fc1"]["activation_bytes"] == 3 * 7 * 4  # float32 (3, 7)
    assert list(rows["fc1"]) == list(COST_KEYS)


def test_conv_flops_by_hand(tmp_path: Path) -> None:
    rows = by_name(analyzer(Convs(), tmp_path).layer_costs(torch.randn(1, 3, 9, 9)))
    # 2 · N · C_out · H_out · W_out · (C_in / groups) · k_h · k_w
    a, b, c = 2 * 1 * 4 * 4 * 4 * 3 * 3 * 3, 2 * 1 * 4 * 4 * 4 * 2 * 3 * 3, 2 * 1 * 6 * 4 * 4 * 4 * 1 * 1
    assert (rows["a"]["forward_flops"], rows["b"]["forward_flops"], rows["c"]["forward_flops"]) == (a, b, c)
    # backward: a needs only its weight gradient (its input is the batch); c both gradients
    assert (rows["a"]["backward_flops"], rows["c"]["backward_flops"]) == (a, 2 * c)
    # b's weight gradient: torch 2.x's formula ignores groups (counts groups × the true FLOPs);
    # accept the exact count and that one
    assert rows["b"]["backward_flops"] in (2 * b, b + 2 * b)
    assert rows["c"]["activation_bytes"] == 6 * 4 * 4 * 4


@pytest.mark.parametrize("name", sorted(ZOO))
def test_layer_sums_equal_model_total(name: str, tmp_path: Path) -> None:
    factory, shape = ZOO[name]
    model = factory()
    rows = analyzer(model, tmp_path).layer_costs(shape)
    with FlopCounterMode(display=False) as counter:  # an independent count of the whole model
        model.eval()
        model(torch.zeros(shape))
        model.train()
    assert counter.get_total_flops() > 0
    assert sum(row["forward_flops"] for row in rows) == counter.get_total_flops()


def test_nested_depth_parents_include_children(tmp_path: Path) -> None:
    rows = by_name(analyzer(ResidualNet(), tmp_path, depth=2).layer_costs([2, 3, 8, 8]))
    for key in ("forward_flops", "backward_flops", "params"):
        assert rows["layer1"][key] == rows["layer1.0"][key] + rows["layer1.1"][key] > 0
        assert rows["layer2"][key] == rows["layer2.0"][key]


def test_reused_layer_and_ops_outside_layers(tmp_path: Path) -> None:
    wm = analyzer(Reused(), tmp_path)
    (row,) = wm.layer_costs([2, 6])
    assert row["forward_flops"] == 2 * (2 * 2 * 6 * 6)  # both calls
    assert row["activation_bytes"] == 2 * (2 * 6 * 4)
    (entry,) = [e for e in wm.store.outputs("costs") if e["kind"] == "csv"]
    # the matmul with the raw parameter belongs to no layer: only in the model's total
    assert entry["total_forward_flops"] == row["forward_flops"] + 2 * 2 * 6 * 2


def test_frozen_and_unused_layers(tmp_path: Path) -> None:
    rows = by_name(analyzer(FrozenNet(), tmp_path).layer_costs([3, 5]))
    assert rows["frozen"]["forward_flops"] == 2 * 3 * 5 * 8 and rows["frozen"]["backward_flops"] == 0
    assert rows["trainable"]["backward_flops"] == 2 * 3 * 8 * 3  # weight only: nothing before needs a gradient
    assert rows["unused"] == {**rows["unused"], "forward_flops": 0, "backward_flops": 0, "forward_ms": 0.0}
    assert rows["unused"]["activation_bytes"] == 0


# ----------------------------------------------------------------------------- time


def test_time_is_attributed_to_the_slow_layer(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), Sleeper(0.01), nn.Linear(4, 2))
    rows = analyzer(model, tmp_path).layer_costs([1, 4], repeats=3, warmup=0)
    assert rows[1]["forward_ms"] >= 10.0
    assert rows[1]["forward_ms"] == max(row["forward_ms"] for row in rows)
    assert all(row["forward_ms"] > 0 for row in rows)


# ----------------------------------------------------------------------------- inputs


def test_input_forms(tmp_path: Path) -> None:
    wm = analyzer(TwoInputs(), tmp_path)
    from_sizes = wm.layer_costs([[2, 4], [2, 5]])
    from_tensors = wm.layer_costs((torch.randn(2, 4), torch.randn(2, 5)))
    for rows in (from_sizes, from_tensors):
        assert [r["forward_flops"] for r in rows] == [2 * 2 * 4 * 3, 2 * 2 * 5 * 3]
    single = analyzer(TwoLinear(), tmp_path / "b")
    assert single.layer_costs(torch.Size([3, 10]))[0]["forward_flops"] == 420


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("3x10", BBDecoderTypeError, r"input_size_or_example must be .*got str '3x10'"),
        ([3, 0], BBDecoderValueError, r"input_size_or_example must be .*got \[3, 0\]"),
        ([3.0, 10], BBDecoderValueError, r"got \[3\.0, 10\]"),
        ([], BBDecoderValueError, r"got \[\]"),
        (None, BBDecoderTypeError, r"got NoneType"),
    ],
)
def test_bad_input(value: object, error: type[Exception], message: str, tmp_path: Path) -> None:
    with pytest.raises(error, match=message):
        analyzer(TwoLinear(), tmp_path).layer_costs(value)


def test_bad_repeats_and_model_errors(tmp_path: Path) -> None:
    wm = analyzer(TwoLinear(), tmp_path)
    with pytest.raises(BBDecoderValueError, match="repeats must be an int >= 1, got repeats=0"):
        wm.layer_costs([3, 10], repeats=0)
    with pytest.raises(BBDecoderValueError, match="warmup must be an int >= 0, got warmup=-1"):
        wm.layer_costs([3, 10], warmup=-1)
    model = RejectingModel()
    with pytest.raises(ModelForwardError, match=r"layer_costs.*inside layer 1 'second'"):
        analyzer(model, tmp_path / "b").layer_costs([2, 5])
    assert count_module_hooks(model) == 0 and model.training


# ----------------------------------------------------------------------------- side effects and files


def test_model_left_exactly_as_it_was(tmp_path: Path) -> None:
    model = ResidualNet()
    model.layer1.eval()
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    model.conv1.weight.grad = None
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: m.training for n, m in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    global_hooks = (len(module_globals._global_forward_hooks), len(module_globals._global_forward_pre_hooks))
    wm = analyzer(model, tmp_path)
    wm.layer_costs([2, 3, 8, 8], repeats=2)
    for name, param in model.named_parameters():
        assert (param.grad is None) == (grads[name] is None), name
        if param.grad is not None:
            assert torch.equal(param.grad, grads[name]), name
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert count_module_hooks(model) == 0 and wm.hooks.active == 0
    assert (len(module_globals._global_forward_hooks), len(module_globals._global_forward_pre_hooks)) == global_hooks
    assert torch.is_grad_enabled()


def test_csv_figures_and_manifest(tmp_path: Path) -> None:
    wm = analyzer(ResidualNet(), tmp_path)
    rows = wm.layer_costs([2, 3, 8, 8], repeats=3)
    entries = wm.store.outputs("costs")
    assert sorted(e["kind"] for e in entries) == ["csv", "flops", "time"]
    (table,) = [e for e in entries if e["kind"] == "csv"]
    with (tmp_path / table["path"]).open(newline="") as stream:
        saved = list(csv.DictReader(stream))
    assert [int(r["id"]) for r in saved] == [r["id"] for r in rows]
    for row, line in zip(rows, saved, strict=True):
        assert line["name"] == row["name"]
        for key in ("params", "forward_flops", "backward_flops", "activation_bytes"):
            assert int(line[key]) == row[key], key
        assert float(line["forward_ms"]) == pytest.approx(row["forward_ms"])
        assert float(line["forward_ms_p25"]) <= row["forward_ms"] <= float(line["forward_ms_p75"])
    assert table["total_forward_flops"] == sum(r["forward_flops"] for r in rows)
    assert table["total_backward_flops"] == sum(r["backward_flops"] for r in rows)
    for entry in entries:
        if entry["kind"] != "csv":
            assert matplotlib.image.imread(tmp_path / entry["path"]).shape[0] > 200
    wm.layer_costs([2, 3, 8, 8], repeats=1)
    assert sorted({e["call"] for e in wm.store.outputs("costs")}) == [1, 2]


def test_summary_shows_cost_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wm = Master_analyzer(ResidualNet(), tmp_path, [2, 3, 8, 8], verbose=False)
    wm.verbose = True
    rows = wm.summary(costs=True)
    printed = capsys.readouterr().out
    assert "Fwd FLOPs" in printed and "Fwd ms" in printed
    assert rows[0]["forward_flops"] == 2 * 2 * 8 * 8 * 8 * 3 * 9


def test_summary_costs_are_those_layer_costs_measured(tmp_path: Path) -> None:
    """summary(costs=True) after layer_costs(batch) shows that batch's numbers and measures nothing again."""
    wm = Master_analyzer(ResidualNet(), tmp_path, [8, 3, 8, 8], verbose=False)
    measured = {row["id"]: row["forward_flops"] for row in wm.layer_costs(torch.randn(2, 3, 8, 8), repeats=1)}
    rows = wm.summary(costs=True)
    assert {row["id"]: row["forward_flops"] for row in rows} == measured  # batch 2, not input_size's 8
    assert sorted({e["call"] for e in wm.store.outputs("costs")}) == [1]  # no second measurement written
    fresh = Master_analyzer(ResidualNet(), tmp_path / "fresh", [2, 3, 8, 8], verbose=False)
    assert {row["id"]: row["forward_flops"] for row in fresh.summary(costs=True)} == measured  # before any: one pass
