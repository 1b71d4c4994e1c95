"""get_inter_features: one frame per call, raw values exact, readable pictures, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from models import MLP, FrozenNet, HostileNames, TokenModel
from torch import nn

from BBDecoder import Master_analyzer
from BBDecoder.core.hooks import count_module_hooks
from BBDecoder.errors import BBDecoderTypeError, BBDecoderValueError, LayerSelectionError
from BBDecoder.plots.features import color_scale, feature_figure, view_for


class Conv64(nn.Module):
    """conv (3→64) → bn → relu → pool: a (1, 64, 8, 8) map like the original's complaint."""

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.drop(self.relu(self.bn(self.conv(x)))))


class Conv3dNet(nn.Module):
    """A 5-D (N, C, D, H, W) output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def analyzer(model: nn.Module, root: Path, shape: list[int], **kwargs: object) -> Master_analyzer:
    return Master_analyzer(model, root, shape, verbose=False, **kwargs)  # type: ignore[arg-type]


def reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer output computed directly, in eval mode, without BBDecoder."""
    return module(x).detach()


@pytest.fixture
def cnn(tmp_path: Path) -> tuple[Conv64, Master_analyzer]:
    model = Conv64(channels=6)
    return model, analyzer(model, tmp_path / "run", [1, 3, 8, 8])


def manifest(root: Path) -> list[dict]:
    return json.loads((root / "manifest.json").read_text())


# ------------------------------------------------------------------- raw values
def test_raw_values_equal_eval_mode_output_and_model_is_left_as_it_was(tmp_path: Path) -> None:
    model = Conv64(channels=6)
    model.train()
    model.bn.running_mean.fill_(0.3)
    a = analyzer(model, tmp_path, [1, 3, 8, 8])
    x = torch.randn(1, 3, 8, 8)
    hooks_before = count_module_hooks(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    picture, raw = a.get_inter_features(x, "relu")

    model.eval()
    with torch.no_grad():
        expected = model.relu(model.bn(model.conv(x)))[0].double().numpy()
    model.train()
    saved = np.load(raw)
    assert saved.shape == (6, 8, 8)
    np.testing.assert_allclose(saved, expected, rtol=1e-5, atol=1e-6)
    # modes restored, hooks gone, buffers (BatchNorm statistics) untouched, no grads made
    assert model.training and model.bn.training and model.drop.training
    assert count_module_hooks(model) == hooks_before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert picture.suffix == ".png" and raw.suffix == ".npy"


def test_picture_of_a_64_channel_8x8_map_is_a_readable_grid(tmp_path: Path) -> None:
    a = analyzer(Conv64(), tmp_path, [1, 3, 8, 8])
    picture, raw = a.get_inter_features(torch.randn(1, 3, 8, 8), "relu")
    image = cv2.imread(str(picture))
    height, width = image.shape[:2]
    # the original wrote a 64×1 strip; an 8×8 grid of 8×8 tiles at ≥ 60 px per tile
    assert height >= 600 and width >= 600, (height, width)
    assert 0.6 < height / width < 1.6
    assert np.load(raw).shape == (64, 8, 8)
    # the grid is not blank: many distinct colours
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50


def test_each_call_adds_a_numbered_frame_captioned_and_recorded(cnn: tuple) -> None:
    _, a = cnn
    x = torch.randn(1, 3, 8, 8)
    first = a.get_inter_features(x, 2, tag="epoch 1")
    second = a.get_inter_features(x, "relu")
    folder = a.store.root / "features" / "002_relu"
    assert first[0] == folder / "frame_0001_epoch_1.png"
    assert second == [folder / "frame_0002.png", folder / "frame_0002.npy"]
    entries = [e for e in manifest(a.store.root) if e["section"] == "features"]
    assert [(e["frame"], e["kind"], e["tag"]) for e in entries] == [
        (1, "raw", "epoch 1"),
        (1, "picture", "epoch 1"),
        (2, "raw", None),
        (2, "picture", None),
    ]
    for entry in entries:
        assert entry["layer_id"] == 2 and entry["layer_name"] == "relu"
        assert (a.store.root / entry["raw"]).suffix == ".npy"
        assert (a.store.root / entry["path"]).is_file()
    frames = a.feature_frames("relu")
    assert [(f["frame"], f["tag"], f["picture"], f["raw"]) for f in frames] == [
        (1, "epoch 1", first[0], first[1]),
        (2, None, second[0], second[1]),
    ]


def test_batch_above_one_first_sample_or_all_samples(cnn: tuple) -> None:
    model, a = cnn
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    expected = reference(model.conv, x).numpy()
    _, raw = a.get_inter_features(x, "conv")
    np.testing.assert_allclose(np.load(raw), expected[0], rtol=1e-5, atol=1e-6)
    picture, raw_all = a.get_inter_features(x, "conv", all_samples=True)
    np.testing.assert_allclose(np.load(raw_all), expected, rtol=1e-5, atol=1e-6)
    assert cv2.imread(str(picture)) is not None


# -------------------------------------------------------------------- post_proc
def test_post_proc_gets_one_sample_and_may_return_tensor_or_ndarray(cnn: tuple) -> None:
    model, a = cnn
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    out = reference(model.conv, x)[0]
    seen: list[tuple[int, ...]] = []

    def channel_mean(t: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(t.shape))
        return t.mean(0)

    _, raw = a.get_inter_features(x, "conv", post_proc=channel_mean)
    assert seen == [(6, 8, 8)]  # one sample, no batch axis
    np.testing.assert_allclose(np.load(raw), out.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert a.feature_frames("conv")[-1]["view"] == "image"

    _, raw = a.get_inter_features(x, "conv", post_proc=lambda t: (t.numpy() ** 2).astype(np.float64))
    saved = np.load(raw)
    assert saved.dtype == np.float64 and saved.shape == (6, 8, 8)
    np.testing.assert_allclose(saved, out.double().numpy() ** 2, rtol=1e-5)

    _, raw = a.get_inter_features(x, "conv", post_proc=lambda t: t.abs().amax(dim=(1, 2)))
    np.testing.assert_allclose(np.load(raw), out.abs().amax(dim=(1, 2)).numpy(), rtol=1e-6)
    assert a.feature_frames("conv")[-1]["view"] == "bars"

    _, raw = a.get_inter_features(x, "conv", post_proc=lambda t: t.sum())
    np.testing.assert_allclose(np.load(raw), [out.sum().item()], rtol=1e-5)


@pytest.mark.parametrize(
    ("post_proc", "returned"),
    [(lambda t: t.tolist(), "list"), (lambda t: None, "NoneType"), (lambda t: 3.0, "float")],
)
def test_post_proc_returning_something_else_raises_type_error(cnn: tuple, post_proc: object, returned: str) -> None:
    _, a = cnn
    with pytest.raises(TypeError, match=rf"post_proc.*returned {returned}") as info:
        a.get_inter_features(torch.randn(1, 3, 8, 8), "conv", post_proc=post_proc)  # type: ignore[arg-type]
    assert isinstance(info.value, BBDecoderTypeError)
    assert not (a.store.root / "features").exists()  # nothing half-written


def test_post_proc_must_be_callable_and_return_real_numbers(cnn: tuple) -> None:
    _, a = cnn
    with pytest.raises(BBDecoderTypeError, match="post_proc must be a callable"):
        a.get_inter_features(torch.randn(1, 3, 8, 8), "conv", post_proc="mean")  # type: ignore[arg-type]
    with pytest.raises(BBDecoderTypeError, match="dtype <U"):
        a.get_inter_features(torch.randn(1, 3, 8, 8), "conv", post_proc=lambda t: np.array(["a"]))


# -------------------------------------------------------------------------- dim
def test_dim_keeps_the_given_channels_in_order(cnn: tuple) -> None:
    model, a = cnn
    x = torch.randn(1, 3, 8, 8)
    model.eval()
    out = reference(model.conv, x)[0].numpy()
    _, raw = a.get_inter_features(x, "conv", dim=4)
    np.testing.assert_allclose(np.load(raw), out[[4]], rtol=1e-6)
    _, raw = a.get_inter_features(x, "conv", dim=[5, 0, -2])
    np.testing.assert_allclose(np.load(raw), out[[5, 0, 4]], rtol=1e-6)
    assert a.feature_frames("conv")[-1]["raw"].is_file()
    entry = [e for e in a.store.outputs("features") if e["kind"] == "raw"][-1]
    assert entry["channels"] == [5, 0, 4]
    # dim applies after post_proc
    _, raw = a.get_inter_features(x, "conv", post_proc=lambda t: 2 * t, dim=[1])
    np.testing.assert_allclose(np.load(raw), 2 * out[[1]], rtol=1e-6)


def test_dim_on_token_and_vector_outputs_selects_features(tmp_path: Path) -> None:
    model = TokenModel()
    a = analyzer(model, tmp_path, [2, 6, 3])
    x = torch.randn(2, 6, 3)
    out = reference(model.embed, x)[0].numpy()  # (T=6, D=8)
    _, raw = a.get_inter_features(x, "embed", dim=[7, 1])
    np.testing.assert_allclose(np.load(raw), out[:, [7, 1]], rtol=1e-6)

    mlp = MLP()
    b = analyzer(mlp, tmp_path / "mlp", [3, 10])
    y = torch.randn(3, 10)
    _, raw = b.get_inter_features(y, 0, dim=2)
    np.testing.assert_allclose(np.load(raw), reference(mlp.net, y)[0, [2]].numpy(), rtol=1e-6)


@pytest.mark.parametrize(
    ("dim", "error", "match"),
    [
        (6, BBDecoderValueError, r"dim=6.*out of range for 6"),
        ([0, -7], BBDecoderValueError, r"index -7 is out of range"),
        (1.5, BBDecoderTypeError, r"dim must be an int"),
        (True, BBDecoderTypeError, r"dim must be an int"),
        ([], BBDecoderTypeError, r"non-empty"),
        ([0, "1"], BBDecoderTypeError, r"dim must hold ints"),
    ],
)
def test_bad_dim(cnn: tuple, dim: object, error: type, match: str) -> None:
    _, a = cnn
    with pytest.raises(error, match=match):
        a.get_inter_features(torch.randn(1, 3, 8, 8), "conv", dim=dim)  # type: ignore[arg-type]


# ------------------------------------------------------------- output ranks
@pytest.mark.parametrize(
    ("kind", "layer", "view", "sample_shape"),
    [
        ("mlp", "net", "bars", (3,)),  # 2-D (N, D) output
        ("tokens", "embed", "heatmap", (6, 8)),  # 3-D (N, T, D)
        ("cnn", "conv", "grid", (6, 8, 8)),  # 4-D (N, C, H, W)
        ("conv3d", "conv", "grid", (3, 4, 5, 5)),  # 5-D (N, C, D, H, W)
    ],
)
def test_layer_outputs_of_each_rank(tmp_path: Path, kind: str, layer: str, view: str, sample_shape: tuple) -> None:
    model, shape = {
        "mlp": (MLP(), [2, 10]),
        "tokens": (TokenModel(), [2, 6, 3]),
        "cnn": (Conv64(6), [2, 3, 8, 8]),
        "conv3d": (Conv3dNet(), [2, 1, 4, 5, 5]),
    }[kind]
    a = analyzer(model, tmp_path, shape)
    x = torch.randn(*shape)
    picture, raw = a.get_inter_features(x, layer)
    expected = reference(getattr(model, layer), x)[0].numpy()
    np.testing.assert_allclose(np.load(raw), expected, rtol=1e-5, atol=1e-6)
    assert a.feature_frames(layer)[0]["view"] == view
    image = cv2.imread(str(picture))
    assert image is not None and min(image.shape[:2]) >= 250


def test_low_precision_outputs_are_saved_as_float32(tmp_path: Path) -> None:
    model = MLP().to(torch.bfloat16)
    a = analyzer(model, tmp_path, None)  # type: ignore[arg-type]
    x = torch.randn(2, 10, dtype=torch.bfloat16)
    _, raw = a.get_inter_features(x, "net")
    saved = np.load(raw)
    assert saved.dtype == np.float32
    np.testing.assert_array_equal(saved, reference(model.net, x)[0].float().numpy())


def test_hostile_layer_names_stay_inside_save_path(tmp_path: Path) -> None:
    a = analyzer(HostileNames(), tmp_path / "run", [2, 4], depth=2)
    written = a.get_inter_features(torch.randn(2, 4), "blocks./etc/passwd")
    for path in written:
        assert (tmp_path / "run") in path.parents
        assert path.parent.name == "001_blocks._etc_passwd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------------ paths
def test_path_is_read_relative_to_save_path_or_honoured_outside_it(
    cnn: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, a = cnn
    root = a.store.root
    x = torch.randn(1, 3, 8, 8)
    picture, first_raw = a.get_inter_features(x, "relu", path="saves")
    assert picture.parent == root / "saves" / "002_relu"
    picture, _ = a.get_inter_features(x, "relu", path=root / "abs")
    assert picture.parent == root / "abs" / "002_relu"
    # issue 11.6: a folder outside save_path, absolute or relative to the working directory, is honoured
    monkeypatch.chdir(root)
    written = []
    for outside, where in ((tmp_path / "elsewhere", tmp_path / "elsewhere"), ("../beside", tmp_path / "beside")):
        picture, raw = a.get_inter_features(x, "relu", path=outside)
        assert picture.parent == raw.parent == where / "002_relu"
        assert np.array_equal(np.load(raw), np.load(first_raw))  # the same features, where the user said
        assert cv2.imread(str(picture)) is not None
        written += [picture, raw]
    entries = {e["path"]: e for e in manifest(root)}
    for path in written:
        entry = entries[f"../{path.relative_to(tmp_path).as_posix()}"]  # listed in save_path's manifest
        assert entry["external"] is True and entry["section"] == "features" and entry["layer_name"] == "relu"
    outside_files = {p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents}
    assert outside_files == set(written)  # nothing else was written outside save_path
    with pytest.raises(BBDecoderTypeError, match="path must be"):
        a.get_inter_features(x, "relu", path=3)  # type: ignore[arg-type]
    # frames from every path are numbered as one run, and found again wherever they are
    frames = a.feature_frames("relu")
    assert [f["frame"] for f in frames] == [1, 2, 3, 4]
    assert [f["raw"].resolve() for f in frames[2:]] == [written[1], written[3]]


def test_a_new_analyzer_on_the_same_save_path_finds_every_frame(tmp_path: Path) -> None:
    model = Conv64(4)
    x = torch.randn(1, 3, 8, 8)
    first = analyzer(model, tmp_path, [1, 3, 8, 8])
    first.get_inter_features(x, "relu", tag=0)
    first.get_inter_features(x, "relu", path="elsewhere", tag=1)
    first.close()
    del first

    second = analyzer(model, tmp_path, [1, 3, 8, 8])
    assert [(f["frame"], f["tag"]) for f in second.feature_frames("relu")] == [(1, 0), (2, 1)]
    picture, _ = second.get_inter_features(x, "relu", tag=2)
    assert picture.name == "frame_0003_2.png"
    videos = second.compile_feature_evolution("relu", fps=4, formats=["mp4"])
    capture = cv2.VideoCapture(str(videos[0]))
    count = 0
    while capture.read()[0]:
        count += 1
    assert count == 3


def test_unknown_layer_and_layer_that_did_not_run(tmp_path: Path) -> None:
    a = analyzer(FrozenNet(), tmp_path, [2, 5])
    with pytest.raises(LayerSelectionError, match="no layer named 'nope'"):
        a.get_inter_features(torch.randn(2, 5), "nope")
    with pytest.raises(LayerSelectionError, match="out of range"):
        a.get_inter_features(torch.randn(2, 5), 9)
    with pytest.raises(LayerSelectionError, match="'unused' did not run"):
        a.get_inter_features(torch.randn(2, 5), "unused")
    with pytest.raises(BBDecoderTypeError, match="tag must be"):
        a.get_inter_features(torch.randn(2, 5), "frozen", tag=[1])  # type: ignore[arg-type]


# ---------------------------------------------------------------- the plots
def test_color_scale_against_hand_computed_values() -> None:
    values = np.arange(1001, dtype=np.float64)  # 0..1000
    scale = color_scale([values[:500], values[500:]])
    assert scale.cmap == "viridis" and scale.vmin == 0.0
    assert scale.vmax == pytest.approx(995.0) and scale.extend == "max"
    signed = color_scale([np.array([-4.0, -1.0, 0.0, 2.0, np.nan, np.inf])], cap=100)
    assert (signed.vmin, signed.vmax, signed.cmap, signed.extend) == (-4.0, 4.0, "RdBu_r", "neither")
    flat = color_scale([np.full(5, 3.0)])
    assert flat.vmin < 3.0 < flat.vmax
    offset = color_scale([np.linspace(100.0, 101.0, 201)], cap=100)
    assert (offset.vmin, offset.vmax) == (100.0, 101.0)  # positive data far from zero keeps its contrast


def test_views_and_figures() -> None:
    assert [view_for(n, from_post_proc=False) for n in (0, 1, 2, 3, 4)] == ["bars", "bars", "heatmap", "grid", "grid"]
    assert view_for(2, from_post_proc=True) == "image"
    figure = feature_figure(np.random.rand(1, 100, 4, 4), "grid", title="t", max_channels=16)
    assert "first 16 shown" in figure._suptitle.get_text()  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="view must be one of"):
        feature_figure(np.zeros((1, 3)), "pie", title="t")
