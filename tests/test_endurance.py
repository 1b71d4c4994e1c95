"""Long runs: repeated analysis calls leave no hook and no memory growth."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from models import SmallCNN

from BBDecoder import Master_analyzer
from BBDecoder.core.hooks import count_module_hooks


def rss_mb() -> float:
    """Resident memory of this process, in MB."""
    with open(f"/proc/{os.getpid()}/statm") as stream:
        return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tensor_hooks(model: torch.nn.Module) -> int:
    return sum(len(p._backward_hooks or {}) for p in model.parameters())


def repeat_without_growth(call: Callable[[], object], model: torch.nn.Module, calls: int, budget_mb: float) -> float:
    """Call ``calls`` times; no hook may stay, and memory must not keep growing.

    A leak grows with every call; the allocator's and matplotlib's caches fill early. So the
    second half of the calls must add less than half the budget, and the whole run less than
    twice the budget.
    """
    for _ in range(10):  # warm-up: allocator pools, lazy imports, matplotlib font and glyph caches
        call()
    gc.collect()
    marks = [rss_mb()]
    for _ in range(2):
        for _ in range(calls // 2):
            call()
            assert count_module_hooks(model) == 0 and tensor_hooks(model) == 0
        gc.collect()
        marks.append(rss_mb())
    late = marks[2] - marks[1]
    assert late < budget_mb / 2, f"resident memory grew by {late:.1f} MB over the last {calls // 2} calls"
    assert marks[2] - marks[0] < 2 * budget_mb, f"resident memory grew by {marks[2] - marks[0]:.1f} MB"
    return marks[2] - marks[0]


def _analyses(tmp_path: Path) -> tuple[Master_analyzer, dict[str, Callable[[], object]]]:
    model = SmallCNN()
    wm = Master_analyzer(model, tmp_path, verbose=False)
    x = torch.randn(2, 3, 8, 8)
    return wm, {
        "get_sim": lambda: wm.get_sim(x, [0, 3], dim=1),
        "grad_cam": lambda: wm.grad_cam("conv2", x),
        "get_inter_features": lambda: wm.get_inter_features(x, "conv2"),
    }


@pytest.mark.parametrize(("name", "calls"), [("get_sim", 60), ("grad_cam", 40), ("get_inter_features", 20)])
def test_repeated_calls_leave_no_hooks_and_no_growth(tmp_path: Path, name: str, calls: int) -> None:
    wm, analyses = _analyses(tmp_path)
    repeat_without_growth(analyses[name], wm.model, calls, budget_mb=30)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["get_sim", "grad_cam", "get_inter_features"])
def test_thousand_calls(tmp_path: Path, name: str) -> None:
    wm, analyses = _analyses(tmp_path)
    repeat_without_growth(analyses[name], wm.model, 1000, budget_mb=50)


def test_twenty_thousand_collected_iterations_keep_only_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    wm = Master_analyzer(model, tmp_path, verbose=False, include_bias=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(4, 8), torch.randn(4, 4)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(wm.forward_propagation(x), y)
        optimizer.zero_grad()
        wm.backward_propagation(loss, collect_grads=True)
        optimizer.step()

    for _ in range(200):
        step()
    gc.collect()
    before = rss_mb()
    iterations = 20_000
    for _ in range(iterations):
        step()
    gc.collect()
    statistics_mb = 2 * (iterations + 200) * 4 * 5 * 4 / 2**20  # buffer doubling: at most 2x rows × tensors × 5 × f32
    growth = rss_mb() - before
    assert growth < 50 + statistics_mb, f"resident memory grew by {growth:.1f} MB (statistics: {statistics_mb:.1f} MB)"
    assert count_module_hooks(model) == 0
    paths = wm.save_collected_grads(0)
    csv_rows = next(p for p in paths if p.suffix == ".csv").read_text().count("\n") - 1
    assert csv_rows == (iterations + 200) * 4  # every iteration of every tensor (2 weights + 2 biases)
