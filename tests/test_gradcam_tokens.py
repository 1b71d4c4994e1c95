"""Grad-CAM on transformer tokens: automatic reshape (class token dropped), and maps that come out zero."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from BBDecoder import BBDecoderWarning, Master_analyzer
from BBDecoder.analyses.gradcam import token_grid, tokens_to_grid


class TinyViT(nn.Module):
    """Patches of 4×4 pixels → tokens, a class token first, two blocks, a head on the class token."""

    def __init__(self, width: int = 8, classes: int = 3, cls: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cls = cls
        self.patch = nn.Conv2d(3, width, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.block1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU())
        self.block2 = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, 16, D)
        if self.cls:
            tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = self.block2(tokens + self.block1(tokens))
        tokens = self.norm(tokens)
        return self.head(tokens[:, 0] if self.cls else tokens.mean(1))


def reference(model: nn.Module, name: str, x: torch.Tensor, targets: list[int], skip: int) -> np.ndarray:
    """Grad-CAM in float64 with the tokens reshaped by hand."""
    model = copy.deepcopy(model).double().eval()
    layer = model.get_submodule(name)
    kept: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda _m, _i, out: kept.setdefault("a", out))
    out = model(x.double())
    handle.remove()
    tokens = kept["a"]
    (grad,) = torch.autograd.grad(out[torch.arange(len(targets)), targets].sum(), tokens)
    side = math.isqrt(tokens.shape[1] - skip)

    def grid(t: torch.Tensor) -> torch.Tensor:
        return t[:, skip:].reshape(t.shape[0], side, side, -1).permute(0, 3, 1, 2)

    a, g = grid(tokens), grid(grad)
    cam = torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.flatten(1).min(1).values[:, None, None]
    high = cam.flatten(1).max(1).values[:, None, None]
    return ((cam - low) / (high - low)).detach().numpy()


def test_token_grid_rule() -> None:
    assert token_grid(197) == (1, 14) and token_grid(196) == (0, 14) and token_grid(17) == (1, 4)
    assert token_grid(50) == (1, 7) and token_grid(12) is None and token_grid(1) is None
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    grid = tokens_to_grid(tokens)
    assert grid.shape == (2, 3, 2, 2) and torch.equal(grid[1, :, 1, 0], tokens[1, 3])  # token 3 = row 1, col 0


@pytest.mark.parametrize("cls", [True, False])
def test_vit_tokens_are_reshaped_automatically(tmp_path: Path, cls: bool) -> None:
    model = TinyViT(cls=cls)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    wm = Master_analyzer(model, tmp_path, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BBDecoderWarning)
        maps = wm.grad_cam("block1", x, [0, 2])
    expected = reference(model, "block1", x, [0, 2], skip=1 if cls else 0)
    assert maps.shape == (2, 16, 16)
    np.testing.assert_allclose(maps, expected, atol=2e-5)
    # the same as giving the reshape explicitly, as pytorch-grad-cam users do
    skip = 1 if cls else 0
    explicit = wm.grad_cam(
        "block1", x, [0, 2], reshape_transform=lambda t: t[:, skip:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    )
    np.testing.assert_allclose(maps, explicit, atol=1e-6)


def test_zero_map_warns_and_says_why(tmp_path: Path) -> None:
    model = TinyViT(cls=True)
    wm = Master_analyzer(model, tmp_path, verbose=False)
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(BBDecoderWarning, match=r"zero everywhere.*class token alone reaches the head.*earlier block"):
        maps = wm.grad_cam("norm", x, 0)
    assert not maps.any()


def test_hugging_face_vit(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 16, 16)
    wm = Master_analyzer(model, tmp_path, depth=4, verbose=False)
    with pytest.warns(BBDecoderWarning, match="class token alone reaches the head"):
        wm.grad_cam("vit.layernorm", x, [0, 1])
    block = next(layer.name for layer in wm.layers if layer.name.endswith("1.layernorm_before"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BBDecoderWarning)
        maps = wm.grad_cam(block, x, [0, 1])
    assert maps.shape == (2, 16, 16) and (maps.max(axis=(1, 2)) == 1).all()
