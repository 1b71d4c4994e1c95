"""``python -m BBDecoder demo``: train a small CNN on drawn shapes and run every analysis.

Nothing is downloaded: the images (circles, triangles, squares, crosses and rings of random
size, rotation and colour on a noisy background) are drawn on the fly from a seed. The run
takes 1-2 minutes on a 2-core CPU with the defaults, prints the held-out accuracy after
each epoch, and ends with the path of ``report.html``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BBDecoderTypeError, BBDecoderValueError

if TYPE_CHECKING:
    from .analyzer import Master_analyzer

CLASSES = ("circle", "triangle", "square", "cross", "ring")
IMAGE_SIZE = 32
DEFAULT_OUT = "bbdecoder_demo"
# Layers the demo studies, by name (IDs follow registration order in ShapesCNN).
PARAMETRIC = ["conv1", "bn1", "conv2", "bn2", "conv3", "fc"]
FEATURE_LAYER = "relu2"
CAM_LAYER = "conv3"


# ---------------------------------------------------------------------- data
def draw_shapes(
    count: int,
    *,
    seed: int = 0,
    size: int = IMAGE_SIZE,
    noise: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``count`` labelled RGB images of the five shapes in :data:`CLASSES`.

    Each image holds one shape of random size, position, rotation and colour over a dark
    random background with Gaussian noise; the label is the shape, never the colour.

    Args:
        count: number of images.
        seed: the random seed (same seed, same images).
        size: image height and width in pixels.
        noise: standard deviation of the added Gaussian noise.

    Returns:
        ``(images, labels)``: float32 ``(count, 3, size, size)`` in [0, 1], int64 ``(count,)``.

    Raises:
        BBDecoderValueError: ``count`` < 1 or ``size`` < 16.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise BBDecoderValueError(f"count must be a positive int, got {count!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise BBDecoderValueError(f"size must be an int of at least 16 pixels, got {size!r}")
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(*shape, generator=generator)

    labels = torch.arange(count) % len(CLASSES)
    labels = labels[torch.randperm(count, generator=generator)]
    radius = uniform(0.25, 0.38, count, 1, 1) * size
    margin = radius + 1.5
    cx = margin + uniform(0, 1, count, 1, 1) * (size - 2 * margin)
    cy = margin + uniform(0, 1, count, 1, 1) * (size - 2 * margin)
    angle = uniform(0, 2 * math.pi, count, 1, 1)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = xs - cx, ys - cy
    u = dx * torch.cos(angle) + dy * torch.sin(angle)
    v = -dx * torch.sin(angle) + dy * torch.cos(angle)
    distance = torch.sqrt(u**2 + v**2)

    def polygon(sides: int, inradius: torch.Tensor) -> torch.Tensor:
        reach = torch.stack(
            [u * math.cos(2 * math.pi * k / sides) + v * math.sin(2 * math.pi * k / sides) for k in range(sides)]
        ).amax(0)
        return reach <= inradius

    arm = radius * 0.3
    masks = torch.stack(
        [
            distance <= radius,
            polygon(3, radius * 0.6),
            polygon(4, radius * 0.8),
            ((u.abs() <= arm) & (v.abs() <= radius)) | ((v.abs() <= arm) & (u.abs() <= radius)),
            (distance <= radius) & (distance >= radius * 0.55),
        ]
    )  # (classes, count, size, size)
    mask = masks[labels, torch.arange(count)].unsqueeze(1).float()
    background = uniform(0.0, 0.35, count, 3, 1, 1)
    colour = uniform(0.55, 1.0, count, 3, 1, 1)
    images = background * (1 - mask) + colour * mask
    images = images + noise * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1).float(), labels


# --------------------------------------------------------------------- model
class ShapesCNN(nn.Module):
    """Three conv blocks and a linear head: 13 top-level layers, about 25k parameters."""

    def __init__(self, num_classes: int = len(CLASSES)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 48, 3, padding=1)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.AdaptiveMaxPool2d(1)  # "is the shape's feature anywhere?"
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.pool3(self.relu3(self.conv3(x)))
        return self.fc(self.flatten(x))


# ----------------------------------------------------------------------- run
@dataclass
class DemoResult:
    """What :func:`run_demo` produced."""

    save_path: Path
    report: Path
    accuracies: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def fresh_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is missing or empty, else the first free ``path-1``, ``path-2``…

    An earlier demo's outputs are never mixed with or overwritten by a new run.
    """
    base = Path(path).expanduser()
    candidate, counter = base, 0
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        counter += 1
        candidate = base.with_name(f"{base.name}-{counter}")
    return candidate


def run_demo(
    out: str | os.PathLike[str] = DEFAULT_OUT,
    *,
    epochs: int = 5,
    samples: int = 3000,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train :class:`ShapesCNN` on :func:`draw_shapes` data and run every analysis.

    Each step records gradient statistics; each epoch saves them and records weight
    histograms, feature similarity, a feature frame and Grad-CAM; at the end the feature
    video, the layer costs and the report are written. The global RNG state is restored.

    Args:
        out: output folder; when it already holds files, a fresh ``out-1``, ``out-2``… is used.
        epochs: training epochs (at least 1).
        samples: training images (at least 100); a fifth as many are held out.
        batch_size: training batch size.
        seed: seed of the data and of the model's initialisation.
        progress: show tqdm progress bars.
        log: where progress lines go (default ``print``).

    Returns:
        The folder, the report's path, and the held-out accuracy and mean loss per epoch.

    Raises:
        BBDecoderValueError: ``epochs``, ``samples`` or ``batch_size`` out of range.
    """
    for name, value, low in (("epochs", epochs, 1), ("samples", samples, 100), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise BBDecoderTypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if value < low:
            raise BBDecoderValueError(f"{name} must be at least {low}, got {name}={value}")
    say = log or print
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _run(fresh_folder(out), epochs, samples, batch_size, seed, progress, say)


def _run(
    folder: Path,
    epochs: int,
    samples: int,
    batch_size: int,
    seed: int,
    progress: bool,
    say: Callable[[str], None],
) -> DemoResult:
    from tqdm.auto import tqdm

    from .analyzer import Master_analyzer

    started = time.perf_counter()
    train_x, train_y = draw_shapes(samples, seed=seed)
    test_x, test_y = draw_shapes(max(samples // 5, 50), seed=seed + 1)
    probe = torch.stack([test_x[(test_y == c).nonzero()[0, 0]] for c in range(len(CLASSES))])  # one per class
    model = ShapesCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps_per_epoch = -(-samples // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch, eta_min=1.5e-4)
    say(f"BBDecoder demo: {len(CLASSES)} shapes ({', '.join(CLASSES)}), {samples} training images, {epochs} epochs")
    say(f"writing to {folder}")
    wm = Master_analyzer(model, folder, input_size=[1, 3, IMAGE_SIZE, IMAGE_SIZE], verbose=True)
    wm.verbose = False  # the summary was printed; keep the rest of the output to the progress bars
    result = DemoResult(save_path=wm.store.root, report=wm.store.root / "report.html")
    shuffle = torch.Generator().manual_seed(seed + 2)
    try:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(samples, generator=shuffle)
            batches = range(0, samples, batch_size)
            bar = tqdm(
                batches,
                desc=f"epoch {epoch + 1}/{epochs}",
                unit="batch",
                disable=None if progress else True,
                leave=False,
            )  # disable=None: no bars where the output is not a terminal (CI logs)
            total = 0.0
            for start in bar:
                index = order[start : start + batch_size]
                outputs = wm.forward_propagation(train_x[index])
                loss = F.cross_entropy(outputs, train_y[index])
                optimizer.zero_grad()
                wm.backward_propagation(loss, collect_grads=True, layer_inds=PARAMETRIC)
                optimizer.step()
                schedule.step()
                value = loss.item()  # the one host sync of the step, for the progress bar and the mean
                total += value * len(index)
                bar.set_postfix(loss=f"{value:.3f}")
            bar.close()
            accuracy = _accuracy(model, test_x, test_y)
            result.accuracies.append(accuracy)
            result.losses.append(total / samples)
            _analyse_epoch(wm, epoch, probe, progress)
            say(f"epoch {epoch + 1}/{epochs}: train loss {total / samples:.3f}, held-out accuracy {accuracy:.1%}")
        _analyse_end(wm)
        result.report = wm.build_report()
    finally:
        wm.close()
    result.seconds = time.perf_counter() - started
    say(f"done in {result.seconds:.0f} s; open the report: {result.report}")
    return result


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    finally:
        model.train(was_training)
    return float((predictions == labels).float().mean())


def _analyse_epoch(wm: Master_analyzer, epoch: int, probe: torch.Tensor, progress: bool) -> None:
    """The per-epoch analyses: gradients, weights, similarity, features, Grad-CAM."""
    from tqdm.auto import tqdm

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("gradients", lambda: wm.save_collected_grads(epoch + 1)),  # epochs numbered from 1, as printed
        ("weights", lambda: wm.visualize_weight_hist(["conv1", "conv2", "conv3", "fc"])),
        ("similarity", lambda: wm.get_sim(probe, ["relu1", "relu2", "relu3"], dim=1)),
        ("features", lambda: wm.get_inter_features(probe[:1], FEATURE_LAYER, tag=f"epoch {epoch + 1}")),
        ("grad-cam", lambda: wm.grad_cam(CAM_LAYER, probe)),
    ]
    bar = tqdm(steps, desc="  analyses", unit="step", disable=None if progress else True, leave=False)
    for name, step in bar:
        bar.set_postfix_str(name)
        step()
    bar.close()


def _analyse_end(wm: Master_analyzer) -> None:
    """The analyses of the whole run: the feature video and the layer costs."""
    wm.compile_feature_evolution(FEATURE_LAYER, fps=2)
    wm.layer_costs([1, 3, IMAGE_SIZE, IMAGE_SIZE])
