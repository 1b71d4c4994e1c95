"""Grad-CAM against an independent autograd reference, and everything it must leave alone."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from models import FrozenNet, InplaceReLUNet, ResidualNet, TokenModel
from torch import nn

from BBDecoder import BBDecoderTypeError, BBDecoderValueError, BBDecoderWarning, Master_analyzer
from BBDecoder.core.hooks import count_module_hooks

# ----------------------------------------------------------------------------- reference


def reference_cam(
    before: Callable[[torch.Tensor], torch.Tensor],
    after: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    targets: list[int],
    reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """Grad-CAM by its definition, one sample at a time, in float64, without any hook.

    ``before`` maps the input to the layer's output A, ``after`` maps A to the model output.
    The score is the class logit, or its mean over positions for segmentation outputs.
    """
    maps = []
    for i, target in enumerate(targets):
        with torch.no_grad():
            a = before(x[i : i + 1].double())
        a = a.detach().requires_grad_(True)
        out = after(a)
        score = out[0, target] if out.ndim == 2 else out[0, target].mean()
        (g,) = torch.autograd.grad(score, a)
        values, grads = (reshape(a.detach()), reshape(g)) if reshape else (a.detach(), g)
        cam = torch.zeros(values.shape[-2:], dtype=torch.float64)
        for k in range(values.shape[1]):
            cam += grads[0, k].mean() * values[0, k]
        cam = torch.clamp(cam, min=0)
        if x.ndim == 4:
            cam = F.interpolate(cam[None, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        span = cam.max() - cam.min()
        maps.append(((cam - cam.min()) / span if span > 0 else torch.zeros_like(cam)).numpy())
    return np.stack(maps)


def residual_split(model: ResidualNet, layer: str) -> tuple[Callable, Callable]:
    """ResidualNet's forward cut after ``layer`` (a float64 copy in eval mode, in-place ops kept)."""
    m = copy.deepcopy(model).double().eval()
    order = ["conv1", "bn1", "relu", "layer1", "layer2"]
    cut = order.index(layer) + 1

    def before(x: torch.Tensor) -> torch.Tensor:
        for name in order[:cut]:
            x = getattr(m, name)(x)
        return x

    def after(a: torch.Tensor) -> torch.Tensor:
        # the reference never feeds A itself to an in-place op: it keeps A intact
        x = a.clone()
        for name in order[cut:]:
            x = getattr(m, name)(x)
        return m.fc(torch.flatten(m.avgpool(x), 1))

    return before, after


class SegNet(nn.Module):
    """A fully convolutional segmenter: (N, 3, H, W) → (N, 3 classes, H, W)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.classifier = nn.Conv2d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.up(torch.relu(self.conv2(self.act(self.conv1(x))))))


class TwiceNet(nn.Module):
    """One module called twice in a forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.conv(x)).mean((2, 3)))


class FrozenStem(nn.Module):
    """A frozen first convolution: its output does not require grad."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stem.requires_grad_(False)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(F.relu(self.stem(x), inplace=True))).mean((2, 3)))


def analyzer(model: nn.Module, path: Path) -> Master_analyzer:
    return Master_analyzer(model, path, verbose=False)


# ----------------------------------------------------------------------------- agreement


@pytest.mark.parametrize("layer", ["conv1", "bn1", "layer1", "layer2"])
@pytest.mark.parametrize("target", [None, 2, [3, 0, 1]])
def test_matches_autograd_reference(layer: str, target: int | list[int] | None, tmp_path: Path) -> None:
    model = ResidualNet()
    x = torch.randn(3, 3, 12, 10)
    maps = analyzer(model, tmp_path).grad_cam(layer, x, target)
    with torch.no_grad():
        top = copy.deepcopy(model).eval()(x).argmax(1).tolist()
    targets = top if target is None else ([target] * 3 if isinstance(target, int) else target)
    expected = reference_cam(*residual_split(model, layer), x, targets)
    assert maps.shape == (3, 12, 10) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    assert np.ptp(expected) > 0.5  # non-trivial maps, so the comparison means something
    np.testing.assert_allclose(maps, expected, atol=2e-5)


def test_inplace_relu_model_agrees_with_reference_and_plain_model(tmp_path: Path) -> None:
    """ReLU(inplace=True) right after the layer must neither break nor leak into its activation."""
    plain = ResidualNet()
    inplace = InplaceReLUNet()
    inplace.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 8, 8)
    wm_plain, wm_inplace = analyzer(plain, tmp_path / "a"), analyzer(inplace, tmp_path / "b")
    for layer in ("bn1", "relu", "layer1", "layer2"):
        got = wm_inplace.grad_cam(layer, x, [1, 2])
        np.testing.assert_array_equal(got, wm_plain.grad_cam(layer, x, [1, 2]))
        np.testing.assert_allclose(got, reference_cam(*residual_split(plain, layer), x, [1, 2]), atol=2e-5)
    # bn1's map is of the pre-ReLU values: it differs from relu's own map
    assert not np.allclose(wm_inplace.grad_cam("bn1", x, 1), wm_inplace.grad_cam("relu", x, 1))
    assert count_module_hooks(inplace) == 0


def test_segmentation_output(tmp_path: Path) -> None:
    model = SegNet()
    x = torch.randn(2, 3, 8, 8)
    wm = analyzer(model, tmp_path)
    m = copy.deepcopy(model).double().eval()

    def before(t: torch.Tensor) -> torch.Tensor:
        return m.conv2(m.act(m.conv1(t)))

    def after(a: torch.Tensor) -> torch.Tensor:
        return m.classifier(m.up(torch.relu(a)))

    np.testing.assert_allclose(wm.grad_cam("conv2", x, [2, 0]), reference_cam(before, after, x, [2, 0]), atol=2e-5)
    # top class of a segmentation output: highest mean score over the image
    with torch.no_grad():
        top = m(x.double()).mean((2, 3)).argmax(1).tolist()
    np.testing.assert_allclose(wm.grad_cam("conv2", x), reference_cam(before, after, x, top), atol=2e-5)
    assert wm.store.outputs("gradcam")[-1]["target"] == top[-1]


def test_reshape_transform_for_tokens(tmp_path: Path) -> None:
    model = TokenModel(tokens=6, dim=8)
    x = torch.randn(2, 6, 3)

    def to_grid(t: torch.Tensor) -> torch.Tensor:  # (N, 6, D) → (N, D, 2, 3)
        return t.reshape(t.shape[0], 2, 3, t.shape[2]).permute(0, 3, 1, 2)

    wm = analyzer(model, tmp_path)
    maps = wm.grad_cam("block", x, [0, 1], reshape_transform=to_grid)
    m = copy.deepcopy(model).double().eval()
    expected = reference_cam(lambda t: m.block(m.embed(t)), lambda a: m.head(a.mean(1)), x, [0, 1], to_grid)
    assert maps.shape == (2, 2, 3)
    np.testing.assert_allclose(maps, expected, atol=2e-5)
    with pytest.raises(BBDecoderValueError, match=r"outputs shape \(2, 6, 8\).*pass reshape_transform"):
        wm.grad_cam("block", x)
    with pytest.raises(BBDecoderTypeError, match="reshape_transform must be callable"):
        wm.grad_cam("block", x, reshape_transform="grid")  # type: ignore[arg-type]


def test_frozen_stem_layer_still_gets_a_gradient(tmp_path: Path) -> None:
    model = FrozenStem()
    x = torch.randn(2, 3, 6, 6)
    m = copy.deepcopy(model).double().eval()
    expected = reference_cam(lambda t: m.stem(t), lambda a: m.head(F.relu(m.conv(F.relu(a))).mean((2, 3))), x, [0, 2])
    np.testing.assert_allclose(analyzer(model, tmp_path).grad_cam("stem", x, [0, 2]), expected, atol=2e-5)


def test_map_points_at_the_evidence(tmp_path: Path) -> None:
    """A hand-built bright-square detector: the map's peak lies inside the square."""
    detector = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        detector[0].weight.fill_(1.0)
    model = nn.Sequential(detector[0], nn.ReLU(), detector[1], detector[2], nn.Linear(1, 2))
    with torch.no_grad():
        model[4].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        model[4].bias.zero_()
    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 9:13, 3:7] = 1.0
    maps = analyzer(model, tmp_path).grad_cam(0, x, 0)
    row, col = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert 9 <= row < 13 and 3 <= col < 7
    assert maps[0, 0, 15] == 0.0  # far from the square: nothing


# ----------------------------------------------------------------------------- leaves nothing behind


def test_grad_mode_hooks_and_buffers_untouched(tmp_path: Path) -> None:
    model = ResidualNet()
    model.train()
    model.layer2.eval()  # a user's own mix of modes
    model(torch.randn(4, 3, 8, 8)).square().sum().backward()
    model.fc.bias.grad = None  # one parameter without a gradient
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags = {n: m.training for n, m in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    wm = analyzer(model, tmp_path)
    hooks_before = count_module_hooks(model)
    wm.grad_cam("layer1", torch.randn(2, 3, 8, 8), [0, 3])
    for name, param in model.named_parameters():
        if grads[name] is None:
            assert param.grad is None, name
        else:
            assert torch.equal(param.grad, grads[name]), name
    assert {n: m.training for n, m in model.named_modules()} == flags
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert count_module_hooks(model) == hooks_before == 0
    assert wm.hooks.active == 0
    assert torch.is_grad_enabled()


def test_nothing_left_after_an_error(tmp_path: Path) -> None:
    model = ResidualNet()
    wm = analyzer(model, tmp_path)
    with pytest.raises(BBDecoderValueError):
        wm.grad_cam("layer1", torch.randn(2, 3, 8, 8), 99)
    assert count_module_hooks(model) == 0 and model.training
    assert all(p.grad is None for p in model.parameters())
    assert wm.store.outputs("gradcam") == []


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (4, BBDecoderValueError, r"target_class=4 is out of range: .* 4 classes, so valid classes are 0\.\.3"),
        (-1, BBDecoderValueError, r"target_class=-1 is out of range.*0\.\.3"),
        ([0, 7], BBDecoderValueError, r"target_class\[1\]=7 is out of range.*0\.\.3"),
        ([0], BBDecoderValueError, r"target_class has 1 entries but input_tensor has 2 samples"),
        ([0, 1, 2], BBDecoderValueError, r"target_class has 3 entries"),
        (1.0, BBDecoderTypeError, r"target_class must be None, an int, or a list of ints.*float 1\.0"),
        (True, BBDecoderTypeError, r"got bool True"),
        ("cat", BBDecoderTypeError, r"got str 'cat'"),
        ([0, 1.5], BBDecoderTypeError, r"target_class\[1\] must be an int class index, got float 1\.5"),
        (torch.tensor([0.0, 1.0]), BBDecoderTypeError, r"integer class indices, got dtype torch\.float32"),
        (np.zeros((2, 1), dtype=int), BBDecoderValueError, r"got an array of shape \(2, 1\)"),
    ],
)
def test_bad_target_class(target: object, error: type[Exception], message: str, tmp_path: Path) -> None:
    wm = analyzer(ResidualNet(num_classes=4), tmp_path)
    with pytest.raises(error, match=message):
        wm.grad_cam("layer1", torch.randn(2, 3, 8, 8), target)  # type: ignore[arg-type]


def test_integer_arrays_accepted_as_targets(tmp_path: Path) -> None:
    wm = analyzer(ResidualNet(), tmp_path)
    x = torch.randn(2, 3, 8, 8)
    expected = wm.grad_cam("layer1", x, [3, 1])
    np.testing.assert_array_equal(wm.grad_cam("layer1", x, torch.tensor([3, 1])), expected)
    np.testing.assert_array_equal(wm.grad_cam("layer1", x, np.array([3, 1])), expected)


def test_other_bad_inputs(tmp_path: Path) -> None:
    wm = analyzer(ResidualNet(), tmp_path)
    with pytest.raises(BBDecoderTypeError, match=r"input_tensor must be a torch\.Tensor.*got ndarray"):
        wm.grad_cam("layer1", np.zeros((1, 3, 8, 8)))  # type: ignore[arg-type]
    with pytest.raises(BBDecoderValueError, match=r"model output \(N, C\).*got shape"):
        analyzer(nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(0)), tmp_path / "b").grad_cam(0, torch.randn(2, 3, 4, 4))
    with pytest.raises(BBDecoderValueError, match=r"layer=2 \('unused'\) did not run"):
        analyzer(FrozenNet(), tmp_path / "c").grad_cam("unused", torch.randn(2, 5))


def test_layer_called_twice_warns_and_uses_first_call(tmp_path: Path) -> None:
    model = TwiceNet()
    x = torch.randn(1, 3, 6, 6)
    with pytest.warns(BBDecoderWarning, match="ran 2 times"):
        maps = analyzer(model, tmp_path).grad_cam("conv", x, 1)
    m = copy.deepcopy(model).double().eval()
    expected = reference_cam(lambda t: m.conv(t), lambda a: m.head(m.conv(a).mean((2, 3))), x, [1])
    np.testing.assert_allclose(maps, expected, atol=2e-5)


# ----------------------------------------------------------------------------- files


def test_files_and_manifest(tmp_path: Path) -> None:
    wm = analyzer(ResidualNet(), tmp_path)
    x = torch.randn(2, 3, 16, 16)
    maps = wm.grad_cam("layer1", x, [1, 2])
    entries = wm.store.outputs("gradcam")
    overlays = [e for e in entries if e["kind"] == "overlay"]
    (saved,) = [e for e in entries if e["kind"] == "maps"]
    assert [(e["sample"], e["target"], e["call"]) for e in overlays] == [(0, 1, 1), (1, 2, 1)]
    assert all(e["layer_id"] == 3 and e["layer_name"] == "layer1" for e in entries)
    assert saved["target"] == [1, 2] and saved["path"].startswith("gradcam/003_layer1/")
    np.testing.assert_array_equal(np.load(tmp_path / saved["path"], allow_pickle=False), maps)
    for entry in overlays:
        picture = matplotlib.image.imread(tmp_path / entry["path"])
        assert picture.ndim == 3 and picture.shape[1] > picture.shape[0] > 100  # three panels side by side
    wm.grad_cam("layer1", x[:1])
    assert {e["call"] for e in wm.store.outputs("gradcam")} == {1, 2}


def test_a_map_that_is_zero_everywhere_says_so_in_its_figure() -> None:
    from BBDecoder.plots.gradcam import gradcam_figure

    titles = [ax.get_title() for ax in gradcam_figure(None, np.zeros((4, 4)), title="t").axes]
    assert any("zero everywhere" in title for title in titles)
    titles = [ax.get_title() for ax in gradcam_figure(None, np.eye(4), title="t").axes]
    assert "Grad-CAM (0 least, 1 most)" in titles
