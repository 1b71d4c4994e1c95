"""visualize_weight_hist: histograms against numpy, statistics, files, history, errors."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from models import MLP, FrozenNet, HostileNames, ResidualNet, SmallCNN, TinyGPT
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from BBDecoder import BBDecoderTypeError, BBDecoderValueError, LayerSelectionError, Master_analyzer, SavePathError
from BBDecoder.analyses.weights import (
    WeightHistogramWarning,
    collect_histograms,
    histogram_arrays,
    load_histograms,
    tensor_histogram,
)
from BBDecoder.core.hooks import count_module_hooks
from BBDecoder.plots.weights import panel_layout, rebin

PNG = b"\x89PNG\r\n\x1a\n"


def analyzer(model: nn.Module, path: Path) -> Master_analyzer:
    return Master_analyzer(model, path, None, verbose=False)


def histogram_of(tensor: torch.Tensor, bins: int, chunk: int = 1 << 24) -> Any:
    """Run the collection on one tensor wrapped as a layer."""
    holder = nn.Module()
    holder.w = nn.Parameter(tensor, requires_grad=False)
    wm_layer = type("L", (), {"id": 0, "name": "holder", "type": "Module", "module": holder})()
    return collect_histograms([wm_layer], bins, 1, chunk=chunk)[0].params[0]


# ------------------------------------------------------------- the numbers
@pytest.mark.parametrize("chunk", [1 << 24, 5])
def test_counts_equal_numpy_on_the_same_edges(chunk: int) -> None:
    torch.manual_seed(3)
    tensor = torch.randn(37, 11) * 0.1
    tensor[0, :4] = 0.0
    got = histogram_of(tensor.clone(), 20, chunk)
    values = tensor.numpy().ravel()
    counts, _ = np.histogram(values, bins=got.edges)
    assert np.array_equal(got.counts, counts)
    assert got.counts.sum() == tensor.numel()
    assert got.edges[0] == values.min() and got.edges[-1] == values.max()
    assert np.allclose(got.edges, np.linspace(float(values.min()), float(values.max()), 21), rtol=0, atol=1e-12)
    reference = values.astype(np.float64)
    assert got.mean == pytest.approx(reference.mean(), rel=1e-12)
    assert got.std == pytest.approx(reference.std(), rel=1e-12)  # population std
    assert (got.min, got.max) == (reference.min(), reference.max())
    assert got.sum == pytest.approx(reference.sum(), rel=1e-12)
    assert got.sum_squares == pytest.approx((reference**2).sum(), rel=1e-12)
    assert got.zeros_fraction == pytest.approx(4 / tensor.numel())


def test_values_on_bin_edges_follow_numpy() -> None:
    """Integers 0..9 with 9 bins: every value lies on an edge; the last bin is closed."""
    tensor = torch.arange(10.0).repeat(3)
    got = histogram_of(tensor, 9)
    assert np.array_equal(got.edges, np.arange(10.0))
    assert np.array_equal(got.counts, np.histogram(tensor.numpy(), bins=got.edges)[0])
    assert got.counts.tolist() == [3] * 8 + [6]


def test_saturation_zeros_nonfinite_constant() -> None:
    tensor = torch.tensor([-1.0, -0.995, 0.0, 0.0, 0.5, 0.985, 0.99, 1.0])
    got = histogram_of(tensor, 10)
    # issue 13: two elements in each 1% end band of an 8-element tensor are a chance cluster, not a pile-up
    assert got.saturation_fraction == 0.0
    assert got.zeros_fraction == pytest.approx(2 / 8)

    broken = torch.tensor([1.0, float("nan"), 2.0, float("inf"), 3.0, -float("inf")])
    got = histogram_of(broken, 4)
    assert (got.numel, got.finite, got.nonfinite) == (6, 3, 3)
    assert (got.min, got.max, got.mean) == (1.0, 3.0, 2.0)
    assert got.counts.sum() == 3 and got.edges[0] == 1.0 and got.edges[-1] == 3.0

    constant = histogram_of(torch.ones(8), 5)  # e.g. BatchNorm weights at init
    assert constant.edges[0] == 0.5 and constant.edges[-1] == 1.5  # numpy's rule for a single value
    assert constant.counts.tolist() == [0, 0, 8, 0, 0]
    assert constant.std == 0.0 and constant.saturation_fraction == 0.0  # narrow (γ at init): not saturated

    zeros = histogram_of(torch.zeros(6), 3)
    assert zeros.saturation_fraction == 0.0 and zeros.zeros_fraction == 1.0

    nothing = histogram_of(torch.tensor([float("nan")] * 3), 2)
    assert nothing.finite == 0 and np.isnan(nothing.min) and nothing.counts.sum() == 0


def test_half_precision_parameters() -> None:
    tensor = torch.randn(64).half()
    got = histogram_of(tensor, 16)
    assert np.array_equal(got.counts, np.histogram(tensor.float().numpy(), bins=got.edges)[0])


def test_tensor_histogram_is_one_vector_per_tensor() -> None:
    vector = tensor_histogram(torch.randn(10), 7)
    assert vector.dtype == torch.float64 and vector.shape == (10 + 8 + 7,)


class HostTransfers(TorchDispatchMode):
    """Counts copies from an accelerator to the host and scalar reads (synchronisations)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[int] = []
        self.scalar_reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        sources = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type != "cpu"]
        targets = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        if sources and targets:
            self.copies += [t.numel() for t in targets]
        return out


def test_no_synchronisation_while_collecting() -> None:
    """No ``.item()``-style read during the whole collection (on a GPU each would stall it)."""
    model = ResidualNet()
    layers = [type("L", (), {"id": 0, "name": "all", "type": "ResidualNet", "module": model})()]
    with HostTransfers() as watch:
        collect_histograms(layers, 50, 1, chunk=100)
    assert watch.scalar_reads == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_gpu_only_the_histograms_reach_the_host(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2048, 2048), nn.LayerNorm(2048), nn.Linear(2048, 16)).cuda()
    wm = analyzer(model, tmp_path)
    with HostTransfers() as watch:
        results = collect_histograms(list(wm.layers), 100, 1)
    assert watch.scalar_reads == 0
    assert len(watch.copies) == 1  # one copy for every tensor of every layer
    assert watch.copies[0] == 6 * (10 + 201) < model[0].weight.numel() // 100
    for layer, result in zip(wm.layers, results, strict=True):
        for (_, param), got in zip(layer.module.named_parameters(), result.params, strict=True):
            host = param.detach().cpu().numpy()
            assert np.array_equal(got.counts, np.histogram(host, bins=got.edges)[0])
            assert got.mean == pytest.approx(host.astype(np.float64).mean(), rel=1e-9, abs=1e-12)
    paths = wm.visualize_weight_hist([0, 2])
    assert len(paths) == 6 and all(p.is_file() for p in paths)


# ---------------------------------------------------------- through the API
def test_files_manifest_and_npz_content(tmp_path: Path) -> None:
    model = SmallCNN()
    wm = analyzer(model, tmp_path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = wm.visualize_weight_hist([0, "fc"], bins=30)
    rel = [p.relative_to(tmp_path).as_posix() for p in paths]
    assert rel == [
        "weights/000_conv1/hist_call001.png",
        "weights/000_conv1/hist_call001.npz",
        "weights/000_conv1/evolution.png",
        "weights/007_fc/hist_call001.png",
        "weights/007_fc/hist_call001.npz",
        "weights/007_fc/evolution.png",
    ]
    for path in paths:
        assert path.read_bytes().startswith(PNG) if path.suffix == ".png" else path.stat().st_size > 0
    with np.load(paths[4], allow_pickle=False) as data:
        assert data["param_names"].tolist() == ["weight", "bias"]
        assert data["shapes"].tolist() == ["5x16", "5"]
        assert data["edges"].shape == (2, 31) and data["counts"].shape == (2, 30)
        assert (int(data["call"]), int(data["layer_id"]), str(data["layer_name"])) == (1, 7, "fc")
        weight = model.fc.weight.detach().numpy()
        assert np.array_equal(data["counts"][0], np.histogram(weight, bins=data["edges"][0])[0])
        assert data["mean"][0] == pytest.approx(weight.astype(np.float64).mean(), rel=1e-12)
        assert data["numel"].tolist() == [80, 5]
    entries = wm.store.outputs("weights")
    assert [(e["layer_id"], e["layer_name"], e["call"], e["kind"]) for e in entries] == [
        (0, "conv1", 1, "histogram"),
        (0, "conv1", 1, "data"),
        (0, "conv1", 1, "evolution"),
        (7, "fc", 1, "histogram"),
        (7, "fc", 1, "data"),
        (7, "fc", 1, "evolution"),
    ]
    # the model is untouched
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training and count_module_hooks(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_evolution_accumulates_and_continues_in_a_new_analyzer(tmp_path: Path) -> None:
    model = nn.Sequential(OrderedDict(net=nn.Linear(4, 3)))
    wm = analyzer(model, tmp_path)
    wm.visualize_weight_hist("net", bins=10)
    with torch.no_grad():
        model.net.weight.mul_(2)
    paths = wm.visualize_weight_hist("net", bins=10)
    assert paths[0].name == "hist_call002.png" and paths[2].name == "evolution.png"
    assert [h.call for h in wm._weight_history["net"]] == [1, 2]
    evolution = [e for e in wm.store.outputs("weights") if e["kind"] == "evolution"]
    assert len(evolution) == 1  # one file, redrawn in place
    first, second = (load_histograms(tmp_path / "weights/000_net" / f"hist_call00{k}.npz") for k in (1, 2))
    assert second.params[0].max == pytest.approx(2 * first.params[0].max, rel=1e-6)
    wm.close()

    again = analyzer(model, tmp_path)
    paths = again.visualize_weight_hist(["net"], bins=10)
    assert paths[0].name == "hist_call003.png"
    assert [h.call for h in again._weight_history["net"]] == [1, 2, 3]


def test_container_layer_shows_every_tensor(tmp_path: Path) -> None:
    model = ResidualNet()
    wm = analyzer(model, tmp_path)
    seen: list[dict[str, Any]] = []
    wm.events.subscribe("weights_histogram", lambda **data: seen.append(data))  # what TensorBoard receives
    wm.visualize_weight_hist("layer2", bins=16)
    names = [name for name, _ in model.layer2.named_parameters()]
    assert names == ["0.conv1.weight", "0.bn1.weight", "0.bn1.bias", "0.conv2.weight", "0.bn2.weight", "0.bn2.bias"]
    assert seen[0]["call"] == 1
    (layer,) = seen[0]["weights"]
    assert [entry.name for entry in layer.params] == names
    assert layer.layer_name == "layer2" and layer.layer_id == 4
    for entry, (_, param) in zip(layer.params, model.layer2.named_parameters(), strict=True):
        values = param.detach().double()
        assert len(entry.edges) - 1 == len(entry.counts) == 16
        assert entry.edges[-1] >= entry.max == values.max().item()
        assert entry.finite == values.numel() == entry.counts.sum()
        assert entry.sum == pytest.approx(values.sum().item(), rel=1e-9, abs=1e-12)
        assert entry.sum_squares == pytest.approx(values.square().sum().item(), rel=1e-12)


def test_tied_weights_are_histogrammed_once_and_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TinyGPT()
    model.lm_head.weight = model.transformer.wte.weight  # GPT-2's tie
    wm = Master_analyzer(model, tmp_path, depth=2, verbose=False)
    from BBDecoder.analyses import weights

    computed: list[tuple[int, ...]] = []
    real = weights.tensor_histogram

    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        computed.append(tuple(tensor.shape))
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(weights, "tensor_histogram", counted)
    wm.visualize_weight_hist(["transformer", "transformer.wte", "lm_head"], bins=8)
    # the embedding once, though three selected layers hold it; every other tensor of transformer once
    assert computed.count((50, 16)) == 1
    assert len(computed) == len({id(p) for p in model.parameters()})
    head = load_histograms(tmp_path / "weights/006_lm_head/hist_call001.npz").params[0]
    wte = load_histograms(tmp_path / "weights/001_transformer.wte/hist_call001.npz").params[0]
    assert head.tied == ("transformer.wte.weight",) and wte.tied == ("lm_head.weight",)
    assert np.array_equal(head.counts, wte.counts) and head.sum == wte.sum
    body = load_histograms(tmp_path / "weights/000_transformer/hist_call001.npz")
    assert [p.tied for p in body.params if p.name == "wte.weight"] == [("lm_head.weight",)]
    assert all(p.tied == () for p in body.params if p.name != "wte.weight")


def test_parameterless_layers(tmp_path: Path) -> None:
    model = SmallCNN()
    wm = analyzer(model, tmp_path)
    with pytest.warns(WeightHistogramWarning, match=r"2 'relu' \(ReLU\)"):
        paths = wm.visualize_weight_hist([0, "relu"])
    assert len(paths) == 3
    with pytest.raises(BBDecoderValueError, match=r"none of the selected layers has parameters.*'relu'.*'pool'"):
        wm.visualize_weight_hist(["relu", "pool"])


def test_argument_errors(tmp_path: Path) -> None:
    wm = analyzer(FrozenNet(), tmp_path)
    with pytest.raises(BBDecoderValueError, match="bins=0"):
        wm.visualize_weight_hist([0], bins=0)
    for bad in (2.5, True, "10"):
        with pytest.raises(BBDecoderTypeError, match="bins must be a positive int"):
            wm.visualize_weight_hist([0], bins=bad)  # type: ignore[arg-type]
    with pytest.raises(LayerSelectionError):
        wm.visualize_weight_hist([9])
    with pytest.raises(SavePathError, match=r"^save_folder='.*run\.json' is a file"):
        wm.visualize_weight_hist([0], tmp_path / "run.json")
    with pytest.raises(SavePathError, match=r"^save_folder='' names no folder"):
        wm.visualize_weight_hist([0], "")
    assert not (tmp_path / "weights").exists()


def test_save_folder_outside_save_path_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11.6: visualize_weight_hist(layer_inds, save_folder) writes where the user said."""
    wm = analyzer(FrozenNet(), tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")
    absolute = wm.visualize_weight_hist([0], tmp_path / "elsewhere")
    relative = wm.visualize_weight_hist([0], "../beside")
    assert [p.relative_to(tmp_path).as_posix() for p in absolute + relative] == [
        "elsewhere/000_frozen/hist_call001.png",
        "elsewhere/000_frozen/hist_call001.npz",
        "elsewhere/000_frozen/evolution.png",
        "beside/000_frozen/hist_call002.png",
        "beside/000_frozen/hist_call002.npz",
        "beside/000_frozen/evolution.png",
    ]
    with np.load(absolute[1]) as first, np.load(relative[1]) as second:
        assert first.files == second.files and int(first["call"]) == 1 and int(second["call"]) == 2
        assert all(np.array_equal(first[k], second[k]) for k in first.files if k != "call")  # the same weights
    entries = {e["path"]: e for e in wm.store.outputs("weights")}
    for path in absolute + relative:
        entry = entries[f"../{path.relative_to(tmp_path).as_posix()}"]
        assert entry["external"] is True and entry["layer_name"] == "frozen"
    outside = {p for p in tmp_path.rglob("*") if p.is_file() and (tmp_path / "run") not in p.parents}
    assert outside == set(absolute + relative)  # nothing else was written outside save_path


def test_save_folder_inside_save_path_and_frozen_layers(tmp_path: Path) -> None:
    wm = analyzer(FrozenNet(), tmp_path)
    relative = wm.visualize_weight_hist(["frozen", "unused"], "epochs/run1")
    absolute = wm.visualize_weight_hist([0], tmp_path / "abs")
    assert relative[0].parent == tmp_path / "epochs/run1/000_frozen"
    assert relative[3].parent == tmp_path / "epochs/run1/002_unused"
    assert absolute[0] == tmp_path / "abs/000_frozen/hist_call002.png"


def test_hostile_layer_names_stay_inside_save_path(tmp_path: Path) -> None:
    model = HostileNames()
    wm = Master_analyzer(model, tmp_path, None, depth=2, verbose=False)
    chosen = ["blocks./etc/passwd", "blocks.sub/dir", "blocks.<script>alert(1)</script>"]
    paths = wm.visualize_weight_hist(chosen, bins=8)
    folders = list(dict.fromkeys(p.parent.relative_to(tmp_path).as_posix() for p in paths))
    assert folders == [
        "weights/001_blocks._etc_passwd",
        "weights/003_blocks.sub_dir",
        "weights/002_blocks._script_alert_1_script",
    ]
    names = [e["layer_name"] for e in wm.store.outputs("weights")]
    assert names == [n for n in chosen for _ in range(3)]  # the manifest keeps the real names
    assert all(tmp_path in p.resolve().parents for p in paths)


# ------------------------------------------------------------------ helpers
def test_panel_layout_keeps_submodules_together() -> None:
    names = ["conv1.weight", "bn1.weight", "bn1.bias", "conv2.weight", "bn2.weight", "bn2.bias"]
    cells, rows, columns = panel_layout(names)
    assert (rows, columns) == (2, 3)
    assert cells == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    cells, rows, columns = panel_layout(["weight", "bias"])
    assert (rows, columns) == (1, 2)
    cells, rows, columns = panel_layout([f"{i}.w" for i in range(9)])
    assert columns == 3 and rows == 3 and len(set(cells)) == 9


def test_rebin_conserves_mass() -> None:
    edges = np.array([0.0, 1.0, 2.0, 4.0])
    counts = np.array([2, 0, 4])
    moved = rebin(edges, counts, np.linspace(-1, 5, 7))
    assert moved.sum() == pytest.approx(6)
    assert moved.tolist() == pytest.approx([0, 2, 0, 2, 2, 0])


def test_histogram_arrays_round_trip(tmp_path: Path) -> None:
    wm = analyzer(MLP(), tmp_path)
    result = collect_histograms([wm.layers[0]], 12, 4)[0]
    arrays = histogram_arrays(result)
    np.savez(tmp_path / "x.npz", **arrays)
    back = load_histograms(tmp_path / "x.npz")
    assert back.call == 4 and [p.name for p in back.params] == [p.name for p in result.params]
    for a, b in zip(back.params, result.params, strict=True):
        assert a.shape == b.shape and np.array_equal(a.edges, b.edges) and np.array_equal(a.counts, b.counts)
        assert (a.mean, a.std, a.saturation_fraction) == (b.mean, b.std, b.saturation_fraction)


def test_every_layer_with_parameters_by_default(tmp_path: Path) -> None:
    import warnings

    model = SmallCNN()
    wm = analyzer(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the parameter-free layers were not asked for: no warning
        wm.visualize_weight_hist()
    drawn = {entry["layer_name"] for entry in wm.store.outputs("weights") if entry["kind"] == "data"}
    assert drawn == {layer.name for layer in wm.layers if any(True for _ in layer.module.parameters())}
    with pytest.raises(BBDecoderValueError, match="no layer of the model holds parameters"):
        analyzer(nn.Sequential(nn.ReLU()), tmp_path / "empty").visualize_weight_hist()


def test_a_failing_figure_keeps_the_numbers_of_its_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from BBDecoder.plots import weights as weight_plots

    wm = analyzer(SmallCNN(), tmp_path)
    drawn = weight_plots.weight_histogram_figure

    def broken(layer: Any) -> Any:
        if layer.layer_name == "fc":
            raise RuntimeError("no figure for fc")
        return drawn(layer)

    monkeypatch.setattr(weight_plots, "weight_histogram_figure", broken)
    with pytest.raises(RuntimeError, match="no figure for fc"):
        wm.visualize_weight_hist([0, "fc"], bins=10)
    entries = [(e["layer_name"], e["kind"]) for e in wm.store.outputs("weights")]
    assert entries == [("conv1", "histogram"), ("conv1", "data"), ("conv1", "evolution"), ("fc", "data")]
    assert load_histograms(tmp_path / "weights/007_fc/hist_call001.npz").params[0].numel == 80
    monkeypatch.undo()
    paths = wm.visualize_weight_hist([0, "fc"], bins=10)  # the next call continues from what is on disk
    assert paths[3].name == "hist_call002.png" and paths[5].name == "evolution.png"
    assert [h.call for h in wm._weight_history["fc"]] == [1, 2]
