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


# ------------------------------------------------------------------------------------
# Big-model shapes (issue 13: readability at scale). Same module trees as torchvision's
# ResNet-50 / DenseNet-121 / Inception-style heads and Hugging Face's GPT-2, with a width
# knob so tests stay fast on a CPU; the tensor counts do not depend on the width.


class Bottleneck(nn.Module):
    """ResNet-50's block: 1×1 reduce, 3×3, 1×1 expand (×4), optional projection shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inplanes != out
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50Like(nn.Module):
    """torchvision's ``resnet50`` layout (stages of 3, 4, 6, 3 bottlenecks); ``width=64`` is the real size.

    At depth 2 with weights only, ``backward_propagation`` records 107 tensors, as for ResNet-50.
    """

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = width
        for index, (blocks, stride) in enumerate(((3, 1), (4, 2), (6, 2), (3, 2)), start=1):
            planes = width * 2 ** (index - 1)
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{index}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class DenseLayer(nn.Module):
    def __init__(self, channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(channels, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleDict):
    """A ModuleDict with its own forward, as torchvision's ``_DenseBlock``."""

    def __init__(self, layers: int, channels: int, growth: int, bn_size: int) -> None:
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(channels + i * growth, growth, bn_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet121Like(nn.Module):
    """torchvision's ``densenet121`` module tree (blocks of 6, 12, 24, 16 layers); ``growth=32`` is the real size.

    With weights only: 242 recorded tensors; with biases: 364 parameter tensors.
    """

    def __init__(self, growth: int = 32, init: int = 64, bn_size: int = 4, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, init, 7, stride=2, padding=3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(init))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        channels = init
        for index, count in enumerate((6, 12, 24, 16), start=1):
            self.features.add_module(f"denseblock{index}", DenseBlock(count, channels, growth, bn_size))
            channels += count * growth
            if index != 4:
                transition = nn.Sequential()
                transition.add_module("norm", nn.BatchNorm2d(channels))
                transition.add_module("relu", nn.ReLU(inplace=True))
                transition.add_module("conv", nn.Conv2d(channels, channels // 2, 1, bias=False))
                transition.add_module("pool", nn.AvgPool2d(2, stride=2))
                self.features.add_module(f"transition{index}", transition)
                channels //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(channels))
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DropoutHeadNet(nn.Module):
    """Inception-v3's tail: features, pooling, a parameter-free dropout, then the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.mixed = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 12, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.mixed(F.relu(self.conv(x))))
        return self.fc(torch.flatten(self.dropout(x), 1))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(n, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(n, t, d)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class GPTBody(nn.Module):
    """GPT-2's ``transformer``: embeddings, a ModuleList ``h`` that is never called itself, final norm."""

    def __init__(self, vocab: int, dim: int, blocks: int, heads: int, context: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.drop = nn.Dropout(0.0)
        self.h = nn.ModuleList(GPTBlock(dim, heads) for _ in range(blocks))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(positions))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class TinyGPT(nn.Module):
    """GPT-2's module tree (``transformer.h.<i>``, ``lm_head``) at a toy size; input: int64 tokens (N, T)."""

    def __init__(self, vocab: int = 50, dim: int = 16, blocks: int = 3, heads: int = 2, context: int = 8) -> None:
        super().__init__()
        self.transformer = GPTBody(vocab, dim, blocks, heads, context)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.transformer(tokens))
