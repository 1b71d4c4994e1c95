"""Gradient statistics: numbers against float64 references, files, alerts, AMP, no host sync."""

from __future__ import annotations

import csv
import gc
import json
import math
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from models import MLP, ZOO, FrozenNet, NestedNet, ResidualNet, SmallCNN, TokenModel
from sync import SyncCounter
from torch import nn

from BBDecoder import (
    BBDecoderTypeError,
    BBDecoderValueError,
    BBDecoderWarning,
    GradientAlertWarning,
    LayerSelectionError,
    Master_analyzer,
)
from BBDecoder.analyses.gradients import CSV_HEADER
from BBDecoder.analyses.gradients.save import heatmap_matrix, load_history
from BBDecoder.kernels import gradstats as _gradstats
from BBDecoder.plots.gradients import _log_limits, gradient_flow_figure

GOLDEN_HEADER = "epoch,iteration,layer_id,layer_name,param,mean_abs,max_abs,l1,l2,nonfinite"


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def eager_backend() -> Iterator[None]:
    """Most tests use eager code: compiling takes tens of seconds on a small CPU."""
    previous = _gradstats.set_backend("eager")
    yield
    _gradstats.set_backend(previous)


def make(model: nn.Module, path: Path, **kwargs: Any) -> Master_analyzer:
    return Master_analyzer(model, path, None, verbose=False, **kwargs)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def by_kind(paths: list[Path], kind: str) -> Path:
    suffix = {"flow": "_flow.png", "csv": "_grads.csv", "alerts": "_alerts.json", "npz": "_layers.npz"}[kind]
    (match,) = [p for p in paths if p.name.endswith(suffix)]
    return match


def reference(grad: torch.Tensor | None) -> dict[str, float]:
    """Float64 statistics computed the obvious way."""
    if grad is None:
        return dict.fromkeys(("mean_abs", "max_abs", "l1", "l2", "nonfinite"), math.nan)
    g = grad.detach().double().reshape(-1)
    return {
        "mean_abs": g.abs().mean().item(),
        "max_abs": g.abs().max().item(),
        "l1": g.abs().sum().item(),
        "l2": torch.linalg.vector_norm(g).item(),
        "nonfinite": float((~torch.isfinite(g)).sum().item()),
    }


def full_name(row: dict[str, str]) -> str:
    return row["param"] if row["layer_name"] == "(model)" else f"{row['layer_name']}.{row['param']}"


def assert_rows_match(rows: list[dict[str, str]], refs: dict[str, dict[str, float]], rtol: float = 1e-5) -> None:
    assert {full_name(r) for r in rows} == set(refs)
    for row in rows:
        expected = refs[full_name(row)]
        for key, value in expected.items():
            got = float(row[key])
            if math.isnan(value):
                assert math.isnan(got), (row, key)
            else:
                assert got == pytest.approx(value, rel=rtol, abs=1e-30), (full_name(row), key, got, value)


def loss_of(model: nn.Module, shape: list[int]) -> torch.Tensor:
    out = model(torch.randn(*shape))
    return out.float().pow(2).mean() + out.float().mean()


# ---------------------------------------------------------------------------- numbers
@pytest.mark.parametrize("backend", ["eager", "foreach"])
@pytest.mark.parametrize("name", ["cnn", "mlp", "residual", "tokens", "nested"])
def test_statistics_match_float64_reference(tmp_path: Path, name: str, backend: str) -> None:
    _gradstats.set_backend(backend)
    constructor, shape = ZOO[name]
    model = constructor()
    wm = make(model, tmp_path, include_bias=True, vanish_threshold=0.0)  # a bias before BatchNorm has ~0 grad
    wm.backward_propagation(loss_of(model, shape), collect_grads=True)
    refs = {n: reference(p.grad) for n, p in model.named_parameters()}
    rows = read_csv(by_kind(wm.save_collected_grads(0), "csv"))
    assert_rows_match(rows, refs)
    assert {r["iteration"] for r in rows} == {"0"}


def test_weights_only_by_default_and_bias_per_call(tmp_path: Path) -> None:
    model = TokenModel()
    wm = make(model, tmp_path)
    wm.backward_propagation(loss_of(model, [2, 6, 3]), collect_grads=True)
    params = {full_name(r) for r in read_csv(by_kind(wm.save_collected_grads(0), "csv"))}
    assert "block.self_attn.in_proj_weight" in params and "embed.weight" in params
    assert not any(p.endswith("bias") for p in params)  # in_proj_bias, out_proj.bias, …
    wm.backward_propagation(loss_of(model, [2, 6, 3]), collect_grads=True, include_bias=True)
    params = {full_name(r) for r in read_csv(by_kind(wm.save_collected_grads(1), "csv"))}
    assert params == {n for n, _ in model.named_parameters()}


def test_channels_last_gradients_are_read_without_copy(tmp_path: Path) -> None:
    model = SmallCNN().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    model(x).square().sum().backward()
    grad = model.conv2.weight.grad
    assert not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last)
    flat = _gradstats.flat(grad)
    assert flat.untyped_storage().data_ptr() == grad.untyped_storage().data_ptr()
    assert sorted(flat.tolist()) == sorted(grad.reshape(-1).tolist())
    stats, order = _gradstats.grad_stats([flat])
    ref = reference(grad)
    assert order == [0]
    np.testing.assert_allclose(stats[0, :3].double().numpy(), [ref["l1"], ref["l2"], ref["max_abs"]], rtol=1e-5)


def test_half_and_double_gradients(tmp_path: Path) -> None:
    grads = [torch.randn(300, dtype=torch.float64), torch.randn(50).half(), torch.randn(70).bfloat16()]
    grads[1][3] = float("inf")
    for backend in ("eager", "foreach"):
        _gradstats.set_backend(backend)
        for g in grads:
            stats, _ = _gradstats.grad_stats([_gradstats.flat(g)])
            ref = reference(g)
            assert stats.dtype == torch.float32
            assert stats[0, 3].item() == ref["nonfinite"]
            if ref["nonfinite"]:
                assert math.isinf(stats[0, 0].item()) and math.isinf(stats[0, 2].item())
            else:
                np.testing.assert_allclose(stats[0, :3].numpy(), [ref["l1"], ref["l2"], ref["max_abs"]], rtol=1e-5)


def test_nan_and_inf_entries(tmp_path: Path) -> None:
    g = torch.randn(1000)
    g[[3, 500]] = float("nan")
    g[7] = -float("inf")
    for backend in ("eager", "foreach"):
        _gradstats.set_backend(backend)
        stats, _ = _gradstats.grad_stats([_gradstats.flat(g)])
        l1, l2, top, bad = stats[0].tolist()
        assert math.isnan(l1) and math.isnan(l2) and math.isnan(top)  # amax semantics: NaN wins
        assert bad == 3.0


# ----------------------------------------------------------------- compiled fast path
def example_gradients(large: bool) -> list[torch.Tensor]:
    """Real gradients (small ones, or up to 4800 elements), a NaN/inf tensor and a 1-element one."""
    torch.manual_seed(1)
    width = 120 if large else 40
    model = nn.Sequential(nn.Linear(40, width), nn.Tanh(), nn.Linear(width, 30), nn.Linear(30, 1))
    model(torch.randn(8, 40)).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    grads.append(torch.tensor([1.0, float("nan"), float("inf"), -2.0]))
    if large:
        grads += [torch.randn(5000, dtype=torch.float64), torch.randn(6000).half()]
    return [_gradstats.flat(g) for g in grads]


def compare_backends(grads: list[torch.Tensor]) -> None:
    results = {}
    for backend in ("eager", "compiled"):
        _gradstats.set_backend(backend)
        placed = torch.full((len(grads), 4), math.nan)
        for dtype in {g.dtype for g in grads}:
            positions = [i for i, g in enumerate(grads) if g.dtype == dtype]
            stats, order = _gradstats.grad_stats([grads[i] for i in positions])
            for row, position in enumerate(order):
                if position >= 0:
                    placed[positions[position]] = stats[row]
        results[backend] = placed
    torch.testing.assert_close(results["compiled"], results["eager"], rtol=1e-5, atol=0, equal_nan=True)


def test_compiled_equals_eager() -> None:
    """One compiled graph (about 15 s cold on two cores, 2 s with Inductor's disk cache)."""
    _gradstats.reset_compile_state()
    compare_backends(example_gradients(large=False))
    if not _gradstats.is_compiled_available():
        pytest.skip("torch.compile is not available here; the eager fallback was used")


@pytest.mark.slow
def test_compiled_equals_eager_large_half_double() -> None:
    """Tensors past Inductor's 4096-element cascade-sum line, float16 and float64: four graphs."""
    _gradstats.reset_compile_state()
    compare_backends(example_gradients(large=True))
    if not _gradstats.is_compiled_available():
        pytest.skip("torch.compile is not available here; the eager fallback was used")


def test_compile_failure_falls_back_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(fn: Any, **kwargs: Any) -> Any:
        def run(*args: Any) -> Any:
            raise RuntimeError("no C++ compiler")

        return run

    _gradstats.reset_compile_state()
    monkeypatch.setattr(torch, "compile", broken_compile)
    try:
        grads = example_gradients(large=True)  # tensors above 4096 elements take the compiled path
        _gradstats.set_backend("compiled")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stats, order = _gradstats.grad_stats(grads)
        assert not _gradstats.is_compiled_available()
        assert _gradstats.backend_for(torch.device("cpu")) == "eager"
        _gradstats.set_backend("eager")
        expected, _ = _gradstats.grad_stats(grads)
        assert order == list(range(len(grads)))
        torch.testing.assert_close(stats, expected, equal_nan=True)
    finally:
        _gradstats.reset_compile_state()


def test_auto_compiles_only_large_models() -> None:
    _gradstats.set_backend("auto")
    cpu = torch.device("cpu")
    assert _gradstats.backend_for(cpu, 10_000) == "eager"
    assert _gradstats.backend_for(cpu, _gradstats.COMPILE_MIN_ELEMENTS) == "compiled"
    assert _gradstats.backend_for(torch.device("meta"), 10) == "foreach"


# ------------------------------------------------------------------ missing, frozen
def test_frozen_and_unused_are_missing_not_zero(tmp_path: Path) -> None:
    model = FrozenNet()
    wm = make(model, tmp_path, include_bias=True)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        wm.backward_propagation(loss_of(model, [3, 5]), collect_grads=True)
    paths = wm.save_collected_grads(0)
    rows = read_csv(by_kind(paths, "csv"))
    assert len(rows) == 2 * 6
    for row in rows:
        missing = row["layer_name"] in ("frozen", "unused")
        values = [row[k] for k in ("mean_abs", "max_abs", "l1", "l2", "nonfinite")]
        assert (values == ["nan"] * 5) == missing, row
    summary = json.loads(by_kind(paths, "alerts").read_text())
    status = {s["label"]: s["status"] for s in summary["summary"]}
    assert status["0 frozen.weight"] == "frozen" and status["2 unused.weight"] == "missing"
    assert status["1 trainable.weight"] == "ok"
    assert set(summary["missing"]) == {"0 frozen.weight", "0 frozen.bias", "2 unused.weight", "2 unused.bias"}
    assert summary["alerts"] == []  # missing is not an alert


def test_zero_gradients_are_zero_and_vanishing(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path)
    wm.backward_propagation(model(torch.randn(3, 10)).sum() * 0.0, collect_grads=True)
    with pytest.warns(GradientAlertWarning) as caught:
        paths = wm.save_collected_grads(0)
    rows = read_csv(by_kind(paths, "csv"))
    assert {r["l2"] for r in rows} == {"0"} and {r["nonfinite"] for r in rows} == {"0"}
    (warning,) = [str(w.message) for w in caught]  # one warning per save, one line per alert
    header, *messages = warning.splitlines()
    assert "3 vanishing tensor(s)" in header and "gradients/epoch_000_alerts.json" in header
    assert len(messages) == 3 and all("below vanish_threshold" in m for m in messages)
    assert any("layer 0 'net', parameter 'fc0.weight'" in m for m in messages)


# ---------------------------------------------------------------------- NaN loss
def test_nan_loss_alert_names_layer_once(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path, depth=2)
    for step in range(4):
        model.zero_grad()
        loss = loss_of(model, [3, 10])
        if step >= 2:
            loss = loss * float("nan")
        wm.backward_propagation(loss, collect_grads=True, layer_inds=["net.fc0", "net.fc2"])
    with pytest.warns(GradientAlertWarning) as caught:
        paths = wm.save_collected_grads(0)
    (warning,) = [str(w.message) for w in caught]  # one warning per save, one line per alert
    header, *lines = warning.splitlines()
    assert header.startswith("gradient alerts, epoch 0: 2 non-finite tensor(s)")
    messages = sorted(line.strip() for line in lines)
    assert messages == [
        "layer 1 'net.fc0', parameter 'weight': the gradient holds NaN/Inf for the first time at iteration 2 "
        "(320 non-finite entries)",
        "layer 5 'net.fc2', parameter 'weight': the gradient holds NaN/Inf for the first time at iteration 2 "
        "(48 non-finite entries)",
    ]
    rows = read_csv(by_kind(paths, "csv"))
    assert [r["nonfinite"] for r in rows if r["layer_name"] == "net.fc0"] == ["0", "0", "320", "320"]
    report = json.loads(by_kind(paths, "alerts").read_text())
    assert [(a["kind"], a["layer_id"], a["param"], a["iteration"]) for a in report["alerts"]] == [
        ("nonfinite", 1, "weight", 2),
        ("nonfinite", 5, "weight", 2),
    ]
    assert report["skipped_iterations"] == []  # no scaler: nothing is skipped
    # the next epoch still lists the tensors, but warns no more
    model.zero_grad()
    wm.backward_propagation(loss_of(model, [3, 10]) * float("nan"), collect_grads=True, layer_inds=["net.fc0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = wm.save_collected_grads(1)
    assert json.loads(by_kind(paths, "alerts").read_text())["alerts"] == []  # not the first time any more
    assert [a["iteration"] for a in wm.gradient_alerts()] == [2, 2]


def test_exploding_alert(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path, explode_threshold=0.5)
    wm.backward_propagation(loss_of(model, [3, 10]) * 1e4, collect_grads=True, layer_inds=0)
    with pytest.warns(GradientAlertWarning, match=r"exceeds explode_threshold=0\.5 from iteration 0"):
        wm.save_collected_grads(0)
    assert {a["kind"] for a in wm.gradient_alerts()} == {"exploding"}


# ------------------------------------------------------------- collect_every, ids
def test_collect_every(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path)
    for _ in range(7):
        model.zero_grad()
        wm.backward_propagation(loss_of(model, [3, 10]), collect_grads=True, collect_every=3)
    wm.backward_propagation(loss_of(model, [3, 10]))  # not collected: still counts as an iteration
    model.zero_grad()
    wm.backward_propagation(loss_of(model, [3, 10]), collect_grads=True, collect_every=3)
    rows = read_csv(by_kind(wm.save_collected_grads(0), "csv"))
    assert sorted({int(r["iteration"]) for r in rows}) == [0, 3, 6]


def test_selectors_by_name_and_id(tmp_path: Path) -> None:
    model = ResidualNet()
    by_name = make(model, tmp_path / "a")
    by_id = make(model, tmp_path / "b")
    loss = loss_of(model, [2, 3, 8, 8])
    by_name.backward_propagation(loss, collect_grads=True, layer_inds=["fc", "layer1"], retain_graph=True)
    ids = [by_id.layers.names.index("layer1"), -1]  # fc is the last layer
    model.zero_grad()
    by_id.backward_propagation(loss, collect_grads=True, layer_inds=ids)
    a = read_csv(by_kind(by_name.save_collected_grads(0), "csv"))
    b = read_csv(by_kind(by_id.save_collected_grads(0), "csv"))
    assert [(r["layer_id"], r["layer_name"], r["param"]) for r in a] == [
        (r["layer_id"], r["layer_name"], r["param"]) for r in b
    ]
    assert a[0]["layer_name"] == "layer1" and a[0]["param"] == "0.conv1.weight"
    assert a[-1]["layer_name"] == "fc" and a[-1]["param"] == "weight"


def test_nested_layers_record_each_tensor_once_under_deepest(tmp_path: Path) -> None:
    model = NestedNet()
    wm = make(model, tmp_path, depth=2)
    wm.backward_propagation(loss_of(model, [3, 4]), collect_grads=True, layer_inds=["features", "features.1"])
    rows = read_csv(by_kind(wm.save_collected_grads(0), "csv"))
    assert [(r["layer_name"], r["param"]) for r in rows] == [("features", "0.0.weight"), ("features.1", "0.weight")]
    refs = {n: reference(p.grad) for n, p in model.named_parameters() if n.endswith("weight") and "features" in n}
    assert_rows_match(rows, refs)


# ------------------------------------------------------------------- no host sync
def test_sync_counter_catches_syncs() -> None:
    t = torch.ones(2)
    with SyncCounter() as counter:
        bool(t[0])
        t.sum().item()
        float(t[1])
        t.tolist()
    assert counter.calls == ["__bool__", "item", "__float__", "tolist"]


@pytest.mark.parametrize("backend", ["eager", "foreach"])
def test_backward_propagation_never_syncs(tmp_path: Path, backend: str) -> None:
    _gradstats.set_backend(backend)
    model = FrozenNet()  # missing gradients too
    wm = make(model, tmp_path, include_bias=True)
    scaler = torch.amp.GradScaler("cpu")
    for step in range(70):  # past the first buffer growth (64 rows)
        model.zero_grad(set_to_none=True)
        loss = loss_of(model, [3, 5]) * (float("nan") if step == 5 else 1.0)
        with SyncCounter() as counter:
            wm.backward_propagation(
                loss, collect_grads=True, layer_inds=None, scaler=scaler if step % 2 else None, collect_every=1
            )
        assert counter.calls == [], f"step {step}: {counter.calls}"
    assert wm._grads.recorder.rows == 70


# ---------------------------------------------------------------------- CSV header
def test_csv_header_golden(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path)
    wm.backward_propagation(loss_of(model, [3, 10]), collect_grads=True)
    path = by_kind(wm.save_collected_grads(0), "csv")
    assert path.read_text(encoding="utf-8").splitlines()[0] == GOLDEN_HEADER
    assert ",".join(CSV_HEADER) == GOLDEN_HEADER


# ---------------------------------------------------------------------- AMP scaler
def test_scaler_statistics_are_unscaled_and_skips_marked(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path, include_bias=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    refs = []
    skipped_by_scaler = []
    for step in range(3):
        optimizer.zero_grad()
        loss = loss_of(model, [3, 10])
        if step == 1:
            loss = loss * float("inf")
        wm.backward_propagation(loss, collect_grads=True, scaler=scaler)
        scale = scaler.get_scale()
        refs.append({n: reference(p.grad / scale) for n, p in model.named_parameters()})
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
        skipped_by_scaler.append(all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)))
    paths = wm.save_collected_grads(0)  # no warning: the NaN step was skipped by the scaler
    rows = read_csv(by_kind(paths, "csv"))
    for step in (0, 2):
        assert_rows_match([r for r in rows if r["iteration"] == str(step)], refs[step])
    assert all(float(r["nonfinite"]) > 0 for r in rows if r["iteration"] == "1")
    report = json.loads(by_kind(paths, "alerts").read_text())
    assert skipped_by_scaler == [False, True, False]
    assert report["skipped_iterations"] == [1]
    assert report["alerts"] == []
    assert {s["status"] for s in report["summary"]} == {"ok"}  # a skipped step is not an error


# -------------------------------------------------------------------- accumulation
def test_gradient_accumulation(tmp_path: Path) -> None:
    """Several backward calls per optimizer step: each row describes the accumulated .grad."""
    model = SmallCNN()
    wm = make(model, tmp_path)
    model.zero_grad()
    micro = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    separate = []
    for x in micro:  # per micro-batch gradients, for the reference
        model.zero_grad()
        model(x).square().mean().backward()
        separate.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad()
    for x in micro:
        wm.backward_propagation(model(x).square().mean(), collect_grads=True, collect_every=1)
    rows = read_csv(by_kind(wm.save_collected_grads(0), "csv"))
    for k in range(3):
        accumulated = {n: sum(s[n] for s in separate[: k + 1]) for n in separate[0] if not n.endswith("bias")}
        assert_rows_match(
            [r for r in rows if r["iteration"] == str(k)], {n: reference(g) for n, g in accumulated.items()}
        )


# ------------------------------------------------------------------------ memory
def run_memory_check(tmp_path: Path, iterations: int) -> None:
    """62-tensor model: the buffer grows with iterations × tensors × 4 numbers, nothing else is kept."""
    _gradstats.set_backend("foreach")
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(31)])  # 62 parameter tensors
    wm = make(model, tmp_path, include_bias=True)
    x = torch.randn(2, 3)
    activations = []
    for _ in range(iterations):
        model.zero_grad(set_to_none=True)
        out = model(x)
        activations.append(weakref.ref(out))  # held by the graph: alive only while a graph is
        wm.backward_propagation(out.sum(), collect_grads=True)
    grads = [weakref.ref(p.grad) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    del out
    gc.collect()
    assert all(r() is None for r in activations) and all(g() is None for g in grads)  # no graph, no gradient
    recorder = wm._grads.recorder
    assert recorder.rows == iterations and len(recorder.iterations) == iterations
    data = recorder.data
    assert data is not None and data.dtype == torch.float32
    assert iterations <= data.shape[0] < 2 * iterations and data.shape[1] == 62 + 1 and data.shape[2] == 4
    rows = wm._gradient_epoch(0)
    assert rows.values.shape == (iterations, 62, 4) and not np.isnan(rows.values).any()
    wm._grads.recorder.clear()
    assert recorder.rows == 0 and not recorder.iterations


def test_memory_keeps_only_statistics(tmp_path: Path) -> None:
    run_memory_check(tmp_path, 300)


@pytest.mark.slow
def test_memory_ten_thousand_iterations(tmp_path: Path) -> None:
    run_memory_check(tmp_path, 10_000)


# ------------------------------------------------------------------ files and store
def test_files_manifest_and_no_overwrite(tmp_path: Path) -> None:
    model = SmallCNN()
    wm = make(model, tmp_path)
    wm.backward_propagation(loss_of(model, [2, 3, 8, 8]), collect_grads=True)
    first = wm.save_collected_grads(3)
    assert {p.name for p in first} == {
        "epoch_003_flow.png",
        "epoch_003_norms.png",
        "epoch_003_grads.csv",
        "epoch_003_heatmap.png",
        "epoch_003_layers.npz",  # this epoch's per-layer norms, stored once; the heatmap is assembled on read
        "epoch_003_alerts.json",
    }
    assert all(p.parent == tmp_path.resolve() / "gradients" for p in first)
    before = {p: p.read_bytes() for p in first}
    wm.backward_propagation(loss_of(model, [2, 3, 8, 8]), collect_grads=True)
    second = wm.save_collected_grads(3)  # same epoch again: new names, old files untouched
    assert not set(first) & set(second)
    assert all(p.read_bytes() == data for p, data in before.items())
    entries = wm.store.outputs("gradients")
    assert len(entries) == 12
    assert {e["kind"] for e in entries} == {"flow", "norms", "csv", "layers", "heatmap", "alerts"}
    assert all(e["epoch"] == 3 and set(e) == {"section", "path", "time", "epoch", "kind"} for e in entries)
    png = by_kind(first, "flow").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_nothing_collected_warns_and_writes_nothing(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path)
    wm.backward_propagation(loss_of(model, [3, 10]))  # not collected
    with pytest.warns(BBDecoderWarning, match="no gradient statistics were collected"):
        assert wm.save_collected_grads(0) == []
    assert wm.store.outputs("gradients") == []
    assert not (tmp_path / "gradients").exists()


def test_save_folder_inside_save_path_or_where_the_user_said(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = MLP()
    wm = make(model, tmp_path / "run")
    root = wm.store.root
    wm.backward_propagation(loss_of(model, [3, 10]), collect_grads=True)
    paths = wm.save_collected_grads(0, save_folder="grads_a")
    assert all(p.parent == (tmp_path / "run" / "grads_a").resolve() for p in paths)
    wm.backward_propagation(loss_of(model, [3, 10]), collect_grads=True)
    inside = tmp_path / "run" / "deep" / "b"
    assert all(p.parent == inside.resolve() for p in wm.save_collected_grads(1, save_folder=inside))
    # issue 11.6: the original API's save_folder='./saves' style: a folder outside save_path is honoured
    monkeypatch.chdir(root)
    written = []
    folders = ((tmp_path / "elsewhere", tmp_path / "elsewhere"), ("../escape", tmp_path / "escape"))
    for epoch, (outside, where) in enumerate(folders, 2):
        wm.backward_propagation(loss_of(model, [3, 10]), collect_grads=True)
        paths = wm.save_collected_grads(epoch, save_folder=outside)
        assert paths and all(p.parent == where for p in paths)
        rows = read_csv(by_kind(paths, "csv"))
        assert rows and {r["epoch"] for r in rows} == {str(epoch)}
        written += paths
    entries = {e["path"]: e for e in wm.store.outputs("gradients")}
    for path in written:  # each listed in save_path's manifest, relative to it
        entry = entries[f"../{path.relative_to(tmp_path).as_posix()}"]
        assert entry["external"] is True and wm.store.locate(entry) == path
    outside_files = {p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents}
    assert outside_files == set(written)  # nothing else was written outside save_path


def test_heatmap_spans_epochs_and_matches_csv(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path, include_bias=True)
    csvs = []
    for epoch in range(2):
        for _ in range(3 + epoch):
            model.zero_grad()
            wm.backward_propagation(loss_of(model, [3, 10]), collect_grads=True, layer_inds=[0])
        paths = wm.save_collected_grads(epoch)
        csvs.append(read_csv(by_kind(paths, "csv")))
    with np.load(by_kind(paths, "npz")) as data:  # each epoch's own columns, stored once
        assert list(data["iterations"]) == [3, 4, 5, 6] and int(data["epoch"]) == 1
    l2, layers, iterations, epochs = heatmap_matrix(load_history(wm.store))  # what a new process reads back
    assert list(layers) == ["0 net"]
    assert list(iterations) == list(range(7)) and list(epochs) == [0, 0, 0, 1, 1, 1, 1]
    rows = csvs[0] + csvs[1]
    for column, iteration in enumerate(iterations):
        squares = [float(r["l2"]) ** 2 for r in rows if int(r["iteration"]) == iteration]
        assert l2[0, column] == pytest.approx(math.sqrt(sum(squares)), rel=1e-5)


def test_notify_rows_equal_csv(tmp_path: Path) -> None:
    model = FrozenNet()
    wm = make(model, tmp_path)
    events: list[dict[str, Any]] = []
    wm.events.subscribe("gradients_saved", lambda **data: events.append(data))
    wm.backward_propagation(loss_of(model, [3, 5]), collect_grads=True)
    rows = read_csv(by_kind(wm.save_collected_grads(4), "csv"))
    (event,) = events
    assert event["epoch"] == 4 and len(event["rows"]) == len(rows)
    for row, text in zip(event["rows"], rows, strict=True):
        plain = row.to_json()  # a typed GradientRow; its JSON form has None for a missing number
        assert list(plain) == list(CSV_HEADER)
        assert (plain["layer_id"], plain["layer_name"], plain["param"]) == (
            int(text["layer_id"]),
            text["layer_name"],
            text["param"],
        )
        if text["l2"] == "nan":
            assert plain["l2"] is None and plain["nonfinite"] is None  # missing gradient
        else:
            assert plain["l2"] == pytest.approx(float(text["l2"]), rel=1e-8)
            assert float(plain["nonfinite"]).is_integer()


def test_model_and_gradients_untouched(tmp_path: Path) -> None:
    model = ResidualNet()
    model.train()
    model.layer1.eval()
    wm = make(model, tmp_path)
    loss = loss_of(model, [2, 3, 8, 8])
    plain = ResidualNet()
    plain.load_state_dict(model.state_dict())
    wm.backward_propagation(loss, collect_grads=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    wm.save_collected_grads(0)
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name])
    assert model.training and not model.layer1.training
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert list(model.state_dict()) == list(plain.state_dict())


# ------------------------------------------------------------------------- errors
def test_input_errors(tmp_path: Path) -> None:
    model = MLP()
    wm = make(model, tmp_path)
    good = loss_of(model, [3, 10])
    with pytest.raises(BBDecoderTypeError, match=r"loss must be a torch\.Tensor"):
        wm.backward_propagation(1.0)  # type: ignore[arg-type]
    with pytest.raises(BBDecoderValueError, match="does not require grad"):
        wm.backward_propagation(good.detach())
    with pytest.raises(BBDecoderValueError, match=r"shape \(3, 3\)"):
        wm.backward_propagation(model(torch.randn(3, 10)))
    with pytest.raises(BBDecoderTypeError, match="'collect_evry'"):
        wm.backward_propagation(good, collect_grads=True, collect_evry=2)
    with pytest.raises(BBDecoderValueError, match="collect_every=0"):
        wm.backward_propagation(good, collect_grads=True, collect_every=0)
    with pytest.raises(BBDecoderTypeError, match="collect_grads must be True or False"):
        wm.backward_propagation(good, collect_grads="yes")  # type: ignore[arg-type]
    with pytest.raises(BBDecoderTypeError, match=r"scaler must be a torch\.amp\.GradScaler"):
        wm.backward_propagation(good, scaler=object())  # type: ignore[arg-type]
    with pytest.raises(LayerSelectionError, match="no layer named 'fc9'"):
        wm.backward_propagation(good, collect_grads=True, layer_inds="fc9")
    assert good.grad_fn is not None and all(p.grad is None for p in model.parameters())  # checked before backward
    with pytest.raises(BBDecoderTypeError, match="ep must be an int"):
        wm.save_collected_grads("1")  # type: ignore[arg-type]
    with pytest.raises(BBDecoderValueError, match="ep=-1"):
        wm.save_collected_grads(-1)
    with pytest.raises(BBDecoderValueError, match="explode_threshold must be above vanish_threshold"):
        make(MLP(), tmp_path / "x", vanish_threshold=1.0, explode_threshold=0.5)


def test_selection_without_parameters(tmp_path: Path) -> None:
    model = SmallCNN()
    wm = make(model, tmp_path)
    with pytest.raises(LayerSelectionError, match=r"selects no parameter tensor.*'relu' \(ReLU\)"):
        wm.backward_propagation(loss_of(model, [2, 3, 8, 8]), collect_grads=True, layer_inds="relu")


# --------------------------------------------------------------------------- plots
def test_flow_chart_axis_holds_every_bar() -> None:
    mean = np.array([1e-12, 3e-4, 2.0, np.nan, 0.0, np.nan])
    top = np.array([5e-11, 1e-2, 9e2, np.nan, 0.0, np.inf])
    status = ["ok", "ok", "ok", "frozen", "zero", "nonfinite"]
    labels = [f"{i} layer.param{i}" for i in range(6)]
    figure = gradient_flow_figure(labels, mean, top, status, title="t", vanish_threshold=1e-8)
    (axes,) = figure.axes
    low, high = axes.get_xlim()
    assert low < 1e-12 and high > 9e2
    assert axes.get_xscale() == "log"
    texts = " ".join(t.get_text() for t in axes.texts)
    assert "frozen" in texts and "zero" in texts and "nonfinite" in texts
    tick_colors = [t.get_color() for t in axes.get_yticklabels()]
    assert tick_colors[0] == "black" and tick_colors[4] != "black"
    assert _log_limits(np.array([np.nan, 0.0])) == (1e-12, 1.0)
