"""Every bad input gets one clear exception naming the argument and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import RejectingModel, ResidualNet, SmallCNN

from BBDecoder import (
    BBDecoderError,
    BBDecoderTypeError,
    BBDecoderValueError,
    BBDecoderWarning,
    LayerSelectionError,
    Master_analyzer,
    ModelForwardError,
    SavePathError,
)


@pytest.fixture
def wm(tmp_path: Path) -> Master_analyzer:
    return Master_analyzer(ResidualNet(), tmp_path, verbose=False)


@pytest.mark.parametrize(
    ("selector", "error", "message"),
    [
        (7, LayerSelectionError, r"layer ID 7 is out of range; valid IDs are 0\.\.6"),
        (-8, LayerSelectionError, r"layer ID -8 is out of range.*-7\.\.-1"),
        (True, BBDecoderTypeError, r"got bool True"),
        (None, LayerSelectionError, r"layer_inds=None"),
        (1.0, BBDecoderTypeError, r"got float 1\.0"),
        ("layer3", LayerSelectionError, r"no layer named 'layer3'; did you mean 'layer2', 'layer1'"),
        ("zzzz", LayerSelectionError, r"no layer named 'zzzz'; names at depth 1 include 'conv1'"),
        ([], LayerSelectionError, r"layer_inds=\[\]"),
        ([0, 2.5], BBDecoderTypeError, r"got float 2\.5"),
        ([0, None], BBDecoderTypeError, r"got NoneType None"),
        ({"a": 1}, BBDecoderTypeError, r"got dict"),
    ],
)
def test_bad_selectors(wm: Master_analyzer, selector: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        wm.layers.resolve(selector, "layer_inds")  # type: ignore[arg-type]
    assert "layer_inds" in str(info.value)
    assert isinstance(info.value, BBDecoderError)
    assert isinstance(info.value, (ValueError, TypeError))


def test_not_a_module(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got function"):
        Master_analyzer(lambda x: x, tmp_path)  # type: ignore[arg-type]


def test_save_path_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "results.txt"
    file.write_text("keep me")
    with pytest.raises(SavePathError, match=r"results\.txt"):
        Master_analyzer(SmallCNN(), file, verbose=False)
    assert file.read_text() == "keep me"
    with pytest.raises(ValueError, match="cannot be created"):
        Master_analyzer(SmallCNN(), file / "below", verbose=False)


@pytest.mark.parametrize(
    ("depth", "error"), [(0, LayerSelectionError), (-1, LayerSelectionError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_depth(tmp_path: Path, depth: object, error: type) -> None:
    with pytest.raises(error, match="depth"):
        Master_analyzer(SmallCNN(), tmp_path, depth=depth, verbose=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [[1, 3, 0, 8], "1,3,8,8", [1.0, 3], [], [[1, 3], [2, -1]]])
def test_bad_input_size(tmp_path: Path, size: object) -> None:
    with pytest.raises(BBDecoderValueError, match="input_size"):
        Master_analyzer(SmallCNN(), tmp_path, size, verbose=False)  # type: ignore[arg-type]


def test_loss_not_a_tensor(wm: Master_analyzer) -> None:
    with pytest.raises(TypeError, match=r"loss must be a torch\.Tensor, got float"):
        wm.backward_propagation(0.5)  # type: ignore[arg-type]


def test_loss_without_grad(wm: Master_analyzer) -> None:
    with torch.no_grad():
        loss = wm.forward_propagation(torch.randn(1, 3, 8, 8)).sum()
    with pytest.raises(ValueError, match="loss does not require grad"):
        wm.backward_propagation(loss)


def test_model_rejecting_input_names_call_and_layer(tmp_path: Path) -> None:
    wm = Master_analyzer(RejectingModel(), tmp_path, verbose=False)
    with pytest.raises(
        ModelForwardError, match=r"get_sim: the model's forward pass raised RuntimeError inside layer 1 'second'"
    ) as info:
        wm._capture(((torch.randn(2, 5),), {}), list(wm.layers), "get_sim")
    assert isinstance(info.value.__cause__, RuntimeError) and isinstance(info.value, RuntimeError)


def test_input_size_the_model_rejects_warns_but_wraps(tmp_path: Path) -> None:
    with pytest.warns(Warning) as record:
        wm = Master_analyzer(RejectingModel(), tmp_path, [2, 5], verbose=False)
        assert wm.summary()[1]["output_shape"] is None
    messages = [str(w.message) for w in record]
    assert any("output shapes unknown: Master_analyzer: the model's forward pass raised" in m for m in messages)


# ------------------------------------------------------------ the analyses' own arguments


@pytest.mark.parametrize(
    ("dim", "error", "message"),
    [(4, BBDecoderValueError, r"dim=4"), (-5, BBDecoderValueError, r"dim=-5"), (1.0, BBDecoderTypeError, r"dim")],
)
def test_get_sim_bad_dim(wm: Master_analyzer, dim: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        wm.get_sim(torch.randn(1, 3, 8, 8), ["conv1"], dim=dim)  # type: ignore[arg-type]


def test_get_sim_unknown_method(wm: Master_analyzer) -> None:
    with pytest.raises(ValueError, match=r"sim_method.*'euclid'"):
        wm.get_sim(torch.randn(1, 3, 8, 8), ["conv1"], dim=1, sim_method="euclid")


@pytest.mark.parametrize("fps", [0, -2, float("nan")])
def test_bad_fps(wm: Master_analyzer, fps: float) -> None:
    with pytest.raises(ValueError, match="fps"):
        wm.compile_feature_evolution("conv1", fps=fps)


def test_video_of_a_layer_without_frames(wm: Master_analyzer, tmp_path: Path) -> None:
    with pytest.raises(BBDecoderError, match="conv1"):
        wm.compile_feature_evolution("conv1", fps=5)
    assert not list(tmp_path.rglob("*.mp4")) and not list(tmp_path.rglob("*.webm"))


def test_weight_histograms_of_layers_without_parameters(wm: Master_analyzer) -> None:
    with pytest.raises(ValueError, match="relu"):
        wm.visualize_weight_hist(["relu", "avgpool"])


def test_grad_cam_bad_target(wm: Master_analyzer) -> None:
    with pytest.raises(ValueError, match="target_class"):
        wm.grad_cam("layer1", torch.randn(2, 3, 8, 8), target_class=99)


def test_public_call_on_rejected_input_names_call_and_layer(wm: Master_analyzer) -> None:
    with pytest.raises(ModelForwardError, match=r"get_inter_features: .* inside layer \d+ '\w+'") as info:
        wm.get_inter_features(torch.randn(1, 5, 8, 8), "fc")
    assert info.value.__cause__ is not None


def test_nan_loss_is_recorded_and_warned_and_training_goes_on(wm: Master_analyzer, tmp_path: Path) -> None:
    x = torch.randn(2, 3, 8, 8)
    loss = wm.forward_propagation(x).sum() * float("nan")
    wm.backward_propagation(loss, collect_grads=True)
    wm.model.zero_grad()
    wm.backward_propagation(wm.forward_propagation(x).sum(), collect_grads=True)
    with pytest.warns(BBDecoderWarning, match="NaN"):
        paths = wm.save_collected_grads(0)
    csv_path = next(p for p in paths if p.suffix == ".csv")
    rows = csv_path.read_text().splitlines()[1:]
    assert any(int(r.split(",")[-1]) > 0 for r in rows)  # nonfinite counted on the NaN step
    assert any(r.split(",")[1] == "1" and r.split(",")[-1] == "0" for r in rows)  # the next step is clean
