"""torch.compile: wrapping a compiled model, and statistics that leave Dynamo's graphs alone.

The model is compiled with ``fullgraph=True`` (any graph break would raise) and the cheap
``aot_eager`` backend: the point is what Dynamo captures and when it recompiles, not the
generated code. Counts come from ``torch._dynamo.utils.counters`` and recompilation is made
an error with ``torch._dynamo.config.error_on_recompile``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

from BBDecoder import Master_analyzer
from BBDecoder.kernels import gradstats as _gradstats

STEPS = 5


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128, 40)  # 5120 weights: above 4096, so the compiled statistics kernel runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.relu(self.conv(x)))))


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, 6, 6, generator=generator), torch.randint(0, 3, (4,), generator=generator)


def snapshot() -> dict[str, dict[str, int]]:
    return {name: dict(values) for name, values in counters.items() if values}


def train(model: nn.Module, wm: Master_analyzer | None, steps: range, **collect: Any) -> list[float]:
    """SGD steps through ``wm`` (or plainly when ``None``); returns the losses."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in steps:
        x, y = data(step)
        out = model(x) if wm is None else wm.forward_propagation(x)
        loss = F.cross_entropy(out, y)
        optimizer.zero_grad()
        if wm is None:
            loss.backward()
        else:
            wm.backward_propagation(loss, collect_grads=True, **collect)
        optimizer.step()
        losses.append(loss.item())
    return losses


def compiled(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    model = Net()
    return model, torch.compile(model, backend="aot_eager", fullgraph=True)


def test_wrapping_a_compiled_model(tmp_path: Path) -> None:
    model, fast = compiled()
    wm = Master_analyzer(fast, tmp_path, [4, 3, 6, 6], verbose=False)
    assert wm.model is fast and wm.inner is model
    assert [layer.name for layer in wm.layers] == ["conv", "relu", "pool", "flatten", "fc"]
    assert wm.summary()[-1]["output_shape"] == [4, 40]
    x, _ = data(0)
    torch.testing.assert_close(wm.forward_propagation(x), model(x))
    assert model.training  # the analyses' eval passes left the flag as it was


def test_statistics_add_no_graph_break_and_no_recompile(tmp_path: Path) -> None:
    """5 steps with collect_grads=True capture exactly what 5 plain steps capture."""
    _, plain = compiled()
    plain_losses = train(plain, None, range(STEPS))
    plain_counts = snapshot()
    assert plain_counts["stats"]["unique_graphs"] == 1 and "graph_break" not in plain_counts

    torch._dynamo.reset()
    counters.clear()
    model, fast = compiled()
    wm = Master_analyzer(fast, tmp_path, None, verbose=False, include_bias=True)
    losses = train(model, wm, range(1))  # step 1 compiles
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses += train(model, wm, range(1, STEPS))
    assert snapshot() == plain_counts
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = wm.save_collected_grads(0)
    assert rows


def test_analyses_between_steps_do_not_recompile(tmp_path: Path) -> None:
    """Temporary hooks, eval passes and Grad-CAM on the inner module leave the compiled graph valid."""
    model, fast = compiled()
    wm = Master_analyzer(fast, tmp_path, [4, 3, 6, 6], verbose=False)
    train(model, wm, range(2))
    before = snapshot()
    x, _ = data(9)
    with torch._dynamo.config.patch(error_on_recompile=True):
        wm.get_sim(x, [0, "fc"], dim=1)
        wm.get_inter_features(x, "conv")
        wm.grad_cam("conv", x)
        wm.layer_costs(x, repeats=1, warmup=0)
        wm.visualize_weight_hist(["conv", "fc"])
        train(model, wm, range(2, 4))
    assert snapshot() == before


def test_explain_finds_one_graph_without_breaks(tmp_path: Path) -> None:
    model, fast = compiled()
    Master_analyzer(fast, tmp_path, [4, 3, 6, 6], verbose=False)
    explanation = torch._dynamo.explain(model)(data(0)[0])
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_compiled_statistics_kernel_compiles_once(tmp_path: Path) -> None:
    """The compiled statistics backend: one compilation, then no recompile while training goes on."""
    previous = _gradstats.set_backend("compiled")
    try:
        _gradstats.reset_compile_state()
        model, fast = compiled()
        wm = Master_analyzer(fast, tmp_path, None, verbose=False, include_bias=True)
        train(model, wm, range(1))
        if not _gradstats.is_compiled_available():
            pytest.skip("no working C++ compiler for Inductor here")
        first = snapshot()
        with torch._dynamo.config.patch(error_on_recompile=True):
            train(model, wm, range(1, STEPS))
            train(model, wm, range(STEPS, STEPS + 2), layer_inds=["fc"])  # another selection, other sizes
        assert first["stats"]["unique_graphs"] == 2  # the model's graph and the statistics kernel's
        assert snapshot() == first and "graph_break" not in first
    finally:
        _gradstats.set_backend(previous)
        _gradstats.reset_compile_state()
