"""Small fixture models, including awkward ones (no torchvision needed)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """conv → bn → relu → conv → relu → pool → flatten → linear."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.fc(self.flatten(self.pool(x)))


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (10, 32, 16, 3)) -> None:
        super().__init__()
        self.net = nn.Sequential()
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            self.net.add_module(f"fc{i}", nn.Linear(a, b))
            if i < len(sizes) - 2:
                self.net.add_module(f"act{i}", nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicBlock(nn.Module):
    def __init__(self, channels: int, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class ResidualNet(nn.Module):
    """A small ResNet-style classifier: stem, two residual stages, head."""

    def __init__(self, num_classes: int = 4, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=inplace)
        self.layer1 = nn.Sequential(BasicBlock(8, inplace), BasicBlock(8, inplace))
        self.layer2 = nn.Sequential(BasicBlock(8, inplace))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InplaceReLUNet(ResidualNet):
    def __init__(self) -> None:
        super().__init__(inplace=True)


class KwargsDictModel(nn.Module):
    """Takes a keyword argument and returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(6, 12)
        self.head = nn.Linear(12, 2)
        self.aux = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        h = F.relu(self.encoder(x)) * scale
        return {"logits": self.head(h), "aux": self.aux(h)}


class FrozenNet(nn.Module):
    """The first layer is frozen; the last is never used in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(5, 8)
        self.trainable = nn.Linear(8, 3)
        self.unused = nn.Linear(3, 3)
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainable(torch.relu(self.frozen(x)))


class NestedNet(nn.Module):
    """Nested Sequentials, for ``depth``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Linear(4, 8), nn.ReLU()),
            nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


HOSTILE_KEYS = ("/etc/passwd", "<script>alert(1)</script>", "sub/dir", 'sp ace & "quote"', "\n", "~", "C:\\x")


class HostileNames(nn.Module):
    """ModuleDict keys that are paths, markup and control characters."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({key: nn.Linear(4, 4) for key in HOSTILE_KEYS})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = torch.tanh(block(x))
        return x


class TokenModel(nn.Module):
    """(N, T, D) token outputs, like a tiny transformer."""

    def __init__(self, tokens: int = 6, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.block = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
        self.head = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(1))


class RejectingModel(nn.Module):
    """Raises inside its second layer for inputs with the wrong width."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Identity()
        self.second = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


# (constructor, example input shape) for parametrised tests
ZOO = {
    "cnn": (SmallCNN, [2, 3, 8, 8]),
    "mlp": (MLP, [3, 10]),
    "residual": (ResidualNet, [2, 3, 8, 8]),
    "inplace": (InplaceReLUNet, [2, 3, 8, 8]),
    "frozen": (FrozenNet, [3, 5]),
    "nested": (NestedNet, [3, 4]),
    "tokens": (TokenModel, [2, 6, 3]),
}
