"""Update-to-weight ratio: a known Δw, SGD/Adam/a Lion-style optimizer against float64, the far rule, hooks, no sync."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import MLP, SmallCNN
from sync import SyncCounter
from torch import nn

from BBDecoder import (
    BBDecoderTypeError,
    BBDecoderValueError,
    LayerSelectionError,
    Master_analyzer,
    UpdateAlertWarning,
    UpdateWatch,
)
from BBDecoder.analyses.updates import MAD_SCALE, UpdateEpoch, UpdateRule, _Column, find_update_alerts, update_summary
from BBDecoder.output.schema import UPDATE_CSV_HEADER, UpdateEpochReport, UpdateRow

GOLDEN_HEADER = "epoch,step,layer_id,layer_name,param,update_norm,weight_norm,ratio"


class AddOptimizer(torch.optim.Optimizer):
    """Adds a fixed tensor to each parameter: a Δw known in advance, from no gradient formula at all."""

    def __init__(self, params: Iterable[nn.Parameter], deltas: list[torch.Tensor]) -> None:
        super().__init__(params, {})
        self.deltas = deltas

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        for p, delta in zip(params, self.deltas, strict=True):
            if p.grad is not None:
                p.add_(delta)


class Lion(torch.optim.Optimizer):
    """The Lion update rule (Chen et al. 2023): sign of an interpolated momentum, decoupled weight decay."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 1e-3, betas=(0.9, 0.99), weight_decay=0.1) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                m = state["m"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)


def make(model: nn.Module, path: Path, **kwargs: Any) -> Master_analyzer:
    return Master_analyzer(model, path, None, verbose=False, **kwargs)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def named(paths: list[Path], suffix: str) -> Path:
    (match,) = [p for p in paths if p.name.endswith(suffix)]
    return match


def train(wm: Master_analyzer, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[dict]:
    """Steps of training; returns the float64 reference ‖Δw‖, ‖w‖ of every weight at every step."""
    refs = []
    for _ in range(steps):
        x = torch.randn(8, *model_input(model))
        loss = F.cross_entropy(model(x), torch.randint(0, 3, (8,)))
        optimizer.zero_grad()
        loss.backward()
        before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        optimizer.step()
        refs.append(
            {
                n: (torch.linalg.vector_norm(p.detach().double() - before[n]).item(), before[n].norm().item())
                for n, p in model.named_parameters()
            }
        )
    return refs


def model_input(model: nn.Module) -> tuple[int, ...]:
    return (3, 8, 8) if isinstance(model, SmallCNN) else (10,)


def full_name(row: dict[str, str]) -> str:
    return f"{row['layer_name']}.{row['param']}"


# --------------------------------------------------------------------- the numbers
def test_a_known_update(tmp_path: Path) -> None:
    """‖Δw‖ and ‖w‖ by hand: w = [3, 4] (‖w‖ = 5), Δw = [0.03, -0.04] (‖Δw‖ = 0.05)."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0]]))
    optimizer = AddOptimizer(model.parameters(), [torch.tensor([[0.03, -0.04]])])
    wm = make(model, tmp_path)
    wm.watch_optimizer(optimizer)
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    (row,) = read_csv(named(wm.save_collected_grads(0), "_updates.csv"))
    assert (row["epoch"], row["step"], row["layer_id"], row["layer_name"], row["param"]) == (
        "0",
        "0",
        "0",
        "0",
        "weight",
    )
    assert float(row["update_norm"]) == pytest.approx(0.05, rel=1e-6)
    assert float(row["weight_norm"]) == pytest.approx(5.0, rel=1e-7)
    assert float(row["ratio"]) == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
        lambda ps: torch.optim.Adam(ps, lr=1e-2),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
        lambda ps: Lion(ps, lr=1e-3),
    ],
    ids=["sgd", "sgd-momentum", "adam", "adamw", "lion"],
)
def test_optimizers_match_float64_reference(tmp_path: Path, make_optimizer: Callable) -> None:
    model = SmallCNN(num_classes=3)
    optimizer = make_optimizer(model.parameters())
    wm = make(model, tmp_path, include_bias=True)
    with wm.watch_optimizer(optimizer):
        refs = train(wm, model, optimizer, 3)
    rows = read_csv(named(wm.save_collected_grads(0), "_updates.csv"))
    assert len(rows) == 3 * len(list(model.parameters()))
    for row in rows:
        update, weight = refs[int(row["step"])][full_name(row)]
        assert float(row["update_norm"]) == pytest.approx(update, rel=1e-5, abs=1e-9)
        assert float(row["weight_norm"]) == pytest.approx(weight, rel=1e-6)
        if weight > 0:
            assert float(row["ratio"]) == pytest.approx(update / weight, rel=1e-5, abs=1e-9)


def test_csv_header_golden_and_missing_gradients(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    wm = make(model, tmp_path)
    wm.watch_optimizer(optimizer)
    model[0](torch.randn(2, 3)).sum().backward()  # layer 1 gets no gradient
    optimizer.step()
    path = named(wm.save_collected_grads(0), "_updates.csv")
    assert path.read_text(encoding="utf-8").splitlines()[0] == GOLDEN_HEADER
    assert ",".join(UPDATE_CSV_HEADER) == GOLDEN_HEADER
    rows = {r["layer_name"]: r for r in read_csv(path)}
    assert rows["1"]["update_norm"] == rows["1"]["weight_norm"] == rows["1"]["ratio"] == "nan"
    assert float(rows["0"]["ratio"]) > 0


def test_collect_every_and_step_numbers_continue(tmp_path: Path) -> None:
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wm = make(model, tmp_path, depth=2)
    watch = wm.watch_optimizer(optimizer, "net.fc0", collect_every=3)
    train(wm, model, optimizer, 7)
    watch.remove()
    train(wm, model, optimizer, 2)  # not watched: not counted
    wm.watch_optimizer(optimizer, "net.fc0", collect_every=3)
    train(wm, model, optimizer, 3)
    rows = read_csv(named(wm.save_collected_grads(0), "_updates.csv"))
    assert [r["step"] for r in rows] == ["0", "3", "6", "9"]
    assert {r["layer_name"] for r in rows} == {"net.fc0"}


def test_the_copy_lives_for_one_step_only(tmp_path: Path) -> None:
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wm = make(model, tmp_path)
    watch = wm.watch_optimizer(optimizer)
    seen: list[int] = []

    def inside(opt: Any, args: Any, kwargs: Any) -> None:
        pending = watch._pending
        seen.append(sum(t.numel() for group in pending[2] for t in group) if pending else -1)

    optimizer.register_step_pre_hook(inside)  # runs after the watch's pre-hook
    train(wm, model, optimizer, 2)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert seen == [weights, weights]  # one copy of the watched tensors during the step
    assert watch._pending is None  # and none between steps


def test_step_never_syncs(tmp_path: Path) -> None:
    model = SmallCNN(num_classes=3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    wm = make(model, tmp_path)
    wm.watch_optimizer(sgd)
    for step in range(70):  # past the first buffer growth (64 rows)
        model.zero_grad(set_to_none=step % 2 == 0)
        loss = F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.randint(0, 3, (4,)))
        loss.backward()
        if step % 3 == 0:
            model.fc.weight.grad = None  # a missing gradient now and then
        with SyncCounter() as counter:
            sgd.step()
        assert counter.calls == [], f"step {step}: {counter.calls}"
    assert wm._updates.recorder.rows == 70


def test_adam_syncs_no_more_than_without_watch(tmp_path: Path) -> None:
    def count(watch: bool) -> int:
        torch.manual_seed(0)
        model = MLP()
        adam = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=False)
        wm = make(model, tmp_path / str(watch))
        if watch:
            wm.watch_optimizer(adam)
        model(torch.randn(3, 10)).sum().backward()
        with SyncCounter() as counter:
            adam.step()
        return len(counter.calls)

    assert count(True) == count(False)


# ------------------------------------------------------------------- the handle
def test_handle_removes_its_hooks(tmp_path: Path) -> None:
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wm = make(model, tmp_path)
    hooks = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks)
    with wm.watch_optimizer(optimizer) as watch:
        assert isinstance(watch, UpdateWatch) and watch.active
        assert all(len(h) == 1 for h in hooks)
        with pytest.raises(BBDecoderValueError, match="already watched"):
            wm.watch_optimizer(optimizer)
    assert not watch.active and all(len(h) == 0 for h in hooks)
    watch.remove()  # idempotent
    again = wm.watch_optimizer(optimizer)
    wm.close()
    assert not again.active and all(len(h) == 0 for h in hooks)


def test_bad_arguments(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path, depth=2)
    optimizer = torch.optim.SGD(model.net.fc0.parameters(), lr=0.1)
    with pytest.raises(BBDecoderTypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        wm.watch_optimizer(model)  # type: ignore[arg-type]
    with pytest.raises(LayerSelectionError, match="selects no parameter tensor that this SGD updates"):
        wm.watch_optimizer(optimizer, "net.fc1")
    with pytest.raises(BBDecoderValueError, match="collect_every=0"):
        wm.watch_optimizer(optimizer, collect_every=0)
    watch = wm.watch_optimizer(optimizer)  # only the tensors the optimizer updates
    assert watch.labels == ["1 net.fc0.weight"]


# -------------------------------------------------------------- the far rule
def epoch_of(medians: dict[str, float], steps: int = 4) -> UpdateEpoch:
    """One tensor per layer with ‖w‖ = 1 and ‖Δw‖ = the given ratio at every step."""
    columns = [_Column(i + 1, i, name, "weight") for i, name in enumerate(medians)]
    update = np.tile(np.array(list(medians.values()), dtype=np.float64), (steps, 1))
    return UpdateEpoch(0, np.arange(steps), columns, update, np.ones_like(update), np.ones_like(update, dtype=bool))


def test_far_rule_by_hand() -> None:
    ratios = {"a": 1e-3, "b": 2e-3, "c": 5e-4, "d": 1e-3, "small": 1e-6, "large": 0.05, "zero": 0.0}
    data = epoch_of(ratios)
    summary, center, spread, far = update_summary(data, UpdateRule())
    logs = np.log10([1e-3, 2e-3, 5e-4, 1e-3, 1e-6, 0.05])  # the zero layer takes no part
    assert center == pytest.approx(float(np.median(logs)))
    assert spread == pytest.approx(MAD_SCALE * float(np.median(np.abs(logs - np.median(logs)))))
    assert far == pytest.approx(max(1.0, 3 * spread))
    status = {s.layer_name: s.status for s in summary}
    assert status == {
        "a": "ok",
        "b": "ok",
        "c": "ok",
        "d": "ok",
        "small": "small",
        "large": "large",
        "zero": "not updated",
    }
    alerts = find_update_alerts(data, summary, UpdateRule(), center, far)
    kinds = {a.layer_name: a.kind for a in alerts}
    assert kinds == {"small": "update_small", "large": "update_large", "zero": "update_small"}
    assert "frozen in effect" in next(a.message for a in alerts if a.layer_name == "small")
    assert "about to diverge" in next(a.message for a in alerts if a.layer_name == "large")
    assert "changed nothing at any step" in next(a.message for a in alerts if a.layer_name == "zero")


def test_a_layer_in_the_healthy_band_is_never_far() -> None:
    """GPT-2's ln_f under AdamW: γ ≈ 1 moves 1e-3 a step while the std-0.02 matrices move 1e-2."""
    ratios = {"wte": 2e-2, "h.0": 1.5e-2, "h.1": 1.2e-2, "h.2": 1.8e-2, "ln_f": 4.6e-4, "stuck": 2e-6}
    summary, center, _, far = update_summary(epoch_of(ratios), UpdateRule())
    status = {s.layer_name: s.status for s in summary}
    assert -far > math.log10(4.6e-4) - center  # the relative rule alone would call ln_f far below
    assert status["ln_f"] == "ok" and status["stuck"] == "small"
    wide = UpdateRule(healthy_low=1e-3)  # the band is part of the rule
    assert {s.layer_name: s.status for s in update_summary(epoch_of(ratios), wide)[0]}["ln_f"] == "small"


def test_absolute_limits_apply_when_every_layer_is_off() -> None:
    data = epoch_of({"a": 0.3, "b": 0.5, "c": 0.4})
    summary, *_ = update_summary(data, UpdateRule())
    assert {s.status for s in summary} == {"large"}  # all alike, yet each above large_ratio
    summary, *_ = update_summary(epoch_of({"a": 1e-3, "b": 3e-3}), UpdateRule())
    assert {s.status for s in summary} == {"ok"}  # two layers: no relative rule


def test_end_to_end_alerts_for_a_layer_with_lr_zero(tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 3)
    )
    optimizer = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.0},  # frozen in effect
            {"params": [p for i in (2, 4, 5) for p in model[i].parameters()], "lr": 0.01},
        ]
    )
    wm = make(model, tmp_path)
    wm.watch_optimizer(optimizer)
    for _ in range(5):
        loss = F.cross_entropy(model(torch.randn(8, 10)), torch.randint(0, 3, (8,)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    received: list[Any] = []
    wm.events.subscribe("updates_saved", lambda epoch, rows: received.append(rows))
    with pytest.warns(UpdateAlertWarning, match=r"layer 0 '0': updates are tiny.*frozen in effect"):
        paths = wm.save_collected_grads(0)
    report = UpdateEpochReport.from_json(json.loads(named(paths, "_update_alerts.json").read_text()))
    assert [(a.kind, a.layer_name) for a in report.alerts] == [("update_small", "0")]
    assert {s.layer_name: s.status for s in report.summary}["0"] == "not updated"
    assert wm.update_alerts()[0]["kind"] == "update_small"
    ((*_, first),) = received
    assert isinstance(first, UpdateRow)
    assert math.isfinite(report.median_log10)


@pytest.mark.parametrize("count", [5, 40])
def test_figure_stays_readable(count: int) -> None:
    """Under 4,000 px on the long side at the store's 110 dpi, no text under 8 px (pages hold 40 layers)."""
    import io

    from matplotlib.text import Text
    from PIL import Image

    from BBDecoder.plots.updates import update_ratio_figure

    rng = np.random.default_rng(0)
    ratios = 10.0 ** rng.normal(-3, 0.5, (count, 2000))  # long epochs are binned
    status = ["ok"] * count
    status[0], status[-1] = "small", "large"
    figure = update_ratio_figure(
        [f"{i} layer{i}.conv" for i in range(count)],
        np.arange(2000),
        ratios,
        np.median(ratios, axis=1),
        status,
        center=-3.0,
        far=1.0,
        small=1e-7,
        large=0.1,
    )
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    buffer.seek(0)
    with Image.open(buffer) as image:
        assert max(image.size) <= 4000, image.size
    sizes = [t.get_fontsize() * 110 / 72 for t in figure.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert min(sizes) >= 8.0
