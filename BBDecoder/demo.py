"""``python -m BBDecoder demo``: train a small CNN on drawn shapes, and its broken twin, and compare.

Nothing is downloaded: the images (circles, triangles, squares, crosses and rings of random
size, rotation and colour on a noisy background) are drawn on the fly from a seed. The
healthy run uses every analysis; meanwhile a twin (the same model, the same initial
weights, the same batches) trains with a learning rate 33 times too high, in a second
process (the demo is mostly single-threaded, so the twin runs on the otherwise idle core),
with the training-health analyses only (gradients, activation health, update ratios,
weight histograms). Most of its ReLUs die within the first recorded steps; BBDecoder's
alerts say so, the healthy run has none, and ``compare.html`` shows the two side by side.
The demo prints the held-out accuracy of every epoch of both runs, the alerts, and the
paths of ``report.html`` and ``compare.html``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BBDecoderError, BBDecoderTypeError, BBDecoderValueError, BBDecoderWarning

if TYPE_CHECKING:
    from .analyzer import Master_analyzer

CLASSES = ("circle", "triangle", "square", "cross", "ring")
IMAGE_SIZE = 32
DEFAULT_OUT = "bbdecoder_demo"
# Layers the demo studies, by name (IDs follow registration order in ShapesCNN).
PARAMETRIC = ["conv1", "bn1", "conv2", "bn2", "conv3", "fc"]
HISTOGRAM_LAYERS = ["conv1", "conv2", "conv3", "fc"]
FEATURE_LAYER = "relu2"
CAM_LAYER = "conv3"
LEARNING_RATE = 3e-3
BROKEN_LEARNING_RATE = 0.1
"""The twin's learning rate: 33 times the healthy one, enough for Adam to kill most ReLU units."""
ACTIVATIONS_EVERY = 10
"""Activation health is recorded on every 10th training step."""
TWIN_FOLDER = "broken_twin"


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
    """Three conv blocks and a linear head: 13 top-level layers, about 19k parameters."""

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
    """What :func:`run_demo` produced.

    Attributes:
        save_path, report: the healthy run's folder and ``report.html``.
        accuracies, losses: the healthy run's held-out accuracy and mean loss per epoch.
        alerts: the healthy run's alerts (gradients, activations, updates), as dicts.
        twin, twin_report: the broken twin's folder (``save_path/broken_twin``) and report.
        twin_accuracies, twin_losses, twin_alerts: the same for the twin.
        comparison: ``save_path/compare.html``, the two runs side by side.
        seconds: the wall time of the whole demo.
        twin_seconds, twin_cpu_seconds: the wall and CPU time of the twin's process.
    """

    save_path: Path
    report: Path
    accuracies: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    alerts: list[dict[str, Any]] = field(default_factory=list)
    twin: Path | None = None
    twin_report: Path | None = None
    twin_accuracies: list[float] = field(default_factory=list)
    twin_losses: list[float] = field(default_factory=list)
    twin_alerts: list[dict[str, Any]] = field(default_factory=list)
    comparison: Path | None = None
    twin_seconds: float = 0.0
    twin_cpu_seconds: float = 0.0


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
    twin: bool = True,
    log: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train :class:`ShapesCNN` on :func:`draw_shapes` data with every analysis, then its broken twin.

    Each step records gradient statistics and the update-to-weight ratio, every 10th step
    activation health; each epoch saves them and records weight histograms, feature
    similarity, a feature frame and Grad-CAM; at the end the feature video, the layer
    costs and the report are written. The twin (``twin=True``) starts from the same
    weights and sees the same batches with :data:`BROKEN_LEARNING_RATE`, with the
    training-health analyses only; ``compare.html`` then shows both runs. Alerts are
    printed through ``log`` (and kept in the result), not raised as warnings. The global
    RNG state is restored.

    Args:
        out: output folder; when it already holds files, a fresh ``out-1``, ``out-2``… is used.
        epochs: training epochs of each run (at least 1).
        samples: training images (at least 100); a fifth as many are held out.
        batch_size: training batch size.
        seed: seed of the data and of the model's initialisation.
        progress: show tqdm progress bars.
        twin: also train the broken twin and write the comparison.
        log: where progress lines go (default ``print``).

    Returns:
        The folders, the reports' and the comparison's paths, accuracies, losses and alerts.

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
        return _run(fresh_folder(out), epochs, samples, batch_size, seed, progress, twin, say)


@dataclass
class _Data:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    probe: torch.Tensor  # one held-out image per class


def _data(samples: int, seed: int) -> _Data:
    train_x, train_y = draw_shapes(samples, seed=seed)
    test_x, test_y = draw_shapes(max(samples // 5, 50), seed=seed + 1)
    probe = torch.stack([test_x[(test_y == c).nonzero()[0, 0]] for c in range(len(CLASSES))])
    return _Data(train_x, train_y, test_x, test_y, probe)


def _run(
    folder: Path,
    epochs: int,
    samples: int,
    batch_size: int,
    seed: int,
    progress: bool,
    twin: bool,
    say: Callable[[str], None],
) -> DemoResult:
    from .analyzer import Master_analyzer

    started = time.perf_counter()
    data = _data(samples, seed)
    model = ShapesCNN()  # after manual_seed(seed): the twin process builds the same initial weights
    say(f"BBDecoder demo: {len(CLASSES)} shapes ({', '.join(CLASSES)}), {samples} training images, {epochs} epochs")
    say(f"writing to {folder}")
    wm = Master_analyzer(model, folder, input_size=[1, 3, IMAGE_SIZE, IMAGE_SIZE], verbose=True)
    wm.verbose = False  # the summary was printed; keep the rest of the output to the progress bars
    result = DemoResult(save_path=wm.store.root, report=wm.store.root / "report.html")
    child = _start_twin(result.save_path / TWIN_FOLDER, epochs, samples, batch_size, seed) if twin else None
    threads = torch.get_num_threads()
    if child is not None:
        torch.set_num_threads(1)  # one core each: this small CNN gains nothing from a second thread
    try:
        if child is not None:
            say(
                f"broken twin: the same model, weights and batches with a learning rate of {BROKEN_LEARNING_RATE:g} "
                f"(trains alongside, in another process)"
            )
        _train(wm, model, data, epochs, batch_size, seed, LEARNING_RATE, progress, say, "", full=True, into=result)
        _analyse_end(wm)
        result.report = wm.build_report()
        result.alerts = _alerts(wm)
        if child is not None:
            _finish_twin(child, result, say)
            child = None
    finally:
        torch.set_num_threads(threads)
        wm.close()
        if child is not None and child.poll() is None:  # interrupted: stop the twin too
            child.kill()
            child.wait()
    if result.twin is not None:
        from .report.compare import compare_runs

        result.comparison = compare_runs(
            [result.save_path, result.twin], result.save_path, names=["healthy", "broken twin"]
        )
        _tell_alerts(say, result)
    result.seconds = time.perf_counter() - started
    say(f"done in {result.seconds:.0f} s; open the report: {result.report}")
    if result.comparison is not None:
        say(f"the two runs side by side: {result.comparison}")
    return result


# ------------------------------------------------------------------ the twin
def _start_twin(folder: Path, epochs: int, samples: int, batch_size: int, seed: int) -> subprocess.Popen[str]:
    """Train the broken twin in a child process: the demo is mostly single-threaded, the second core is free.

    A plain ``python -c`` child (not ``multiprocessing``), so it works however the demo was
    started (``python -m BBDecoder``, a script, a notebook) on every platform.
    """
    spec = {"folder": str(folder), "epochs": epochs, "samples": samples, "batch_size": batch_size, "seed": seed}
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    code = "import sys; from BBDecoder.demo import _twin_main; _twin_main(sys.argv[1])"
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=env,
    )


def _twin_main(text: str) -> None:
    """The child process: train the twin, write its files and report, print JSON lines for the parent."""
    from .analyzer import Master_analyzer

    spec = json.loads(text)
    torch.set_num_threads(1)
    started, cpu = time.perf_counter(), time.process_time()

    def say(line: str) -> None:
        print(json.dumps({"line": line}), flush=True)

    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])
        data = _data(spec["samples"], spec["seed"])
        model = ShapesCNN()
        wm = Master_analyzer(model, spec["folder"], verbose=False)
        result = DemoResult(save_path=wm.store.root, report=wm.store.root / "report.html")
        try:
            _train(
                wm,
                model,
                data,
                spec["epochs"],
                spec["batch_size"],
                spec["seed"],
                BROKEN_LEARNING_RATE,
                False,
                say,
                "broken twin, ",
                full=False,
                into=result,
            )
            result.report = wm.build_report()
        finally:
            wm.close()
    done = {
        "save_path": str(result.save_path),
        "report": str(result.report),
        "accuracies": result.accuracies,
        "losses": result.losses,
        "alerts": _alerts(wm),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
    }
    print(json.dumps({"result": done}), flush=True)


def _finish_twin(child: subprocess.Popen[str], result: DemoResult, say: Callable[[str], None]) -> None:
    """Wait for the twin, pass its lines on, and fill the twin's fields of ``result``.

    Raises:
        BBDecoderError: the twin's process failed (its last error lines are quoted).
    """
    out, err = child.communicate()
    done: dict[str, Any] | None = None
    for raw in out.splitlines():
        try:
            message = json.loads(raw)
        except ValueError:
            continue
        if "line" in message:
            say(str(message["line"]))
        elif "result" in message:
            done = message["result"]
    if child.returncode != 0 or done is None:
        tail = "\n".join(err.strip().splitlines()[-8:])
        raise BBDecoderError(f"the broken twin's process failed (exit status {child.returncode}):\n{tail}")
    result.twin = Path(done["save_path"])
    result.twin_report = Path(done["report"])
    result.twin_accuracies = [float(a) for a in done["accuracies"]]
    result.twin_losses = [float(v) for v in done["losses"]]
    result.twin_alerts = list(done["alerts"])
    result.twin_seconds = float(done["seconds"])
    result.twin_cpu_seconds = float(done["cpu_seconds"])


def _train(
    wm: Master_analyzer,
    model: nn.Module,
    data: _Data,
    epochs: int,
    batch_size: int,
    seed: int,
    lr: float,
    progress: bool,
    say: Callable[[str], None],
    prefix: str,
    *,
    full: bool,
    into: DemoResult,
) -> None:
    """Train ``model`` for ``epochs`` with Adam at ``lr`` (cosine schedule); analyses after every epoch.

    Alerts are collected, not warned: they are printed at the end of the demo.
    """
    from tqdm.auto import tqdm

    samples = len(data.train_x)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-samples // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch, eta_min=lr / 20)
    shuffle = torch.Generator().manual_seed(seed + 2)  # both runs see the same batches
    watch = wm.watch_optimizer(optimizer)
    try:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(samples, generator=shuffle)
            bar = tqdm(
                range(0, samples, batch_size),
                desc=f"{prefix}epoch {epoch + 1}/{epochs}",
                unit="batch",
                disable=None if progress else True,
                leave=False,
            )  # disable=None: no bars where the output is not a terminal (CI logs)
            total = 0.0
            for start in bar:
                index = order[start : start + batch_size]
                outputs = wm.forward_propagation(data.train_x[index], collect_acts=ACTIVATIONS_EVERY)
                loss = F.cross_entropy(outputs, data.train_y[index])
                optimizer.zero_grad()
                wm.backward_propagation(loss, collect_grads=True, layer_inds=PARAMETRIC)
                optimizer.step()
                schedule.step()
                value = loss.item()  # the one host sync of the step, for the progress bar and the mean
                total += value * len(index)
                bar.set_postfix(loss=f"{value:.3f}")
            bar.close()
            accuracy = _accuracy(model, data.test_x, data.test_y)
            into.accuracies.append(accuracy)
            into.losses.append(total / samples)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BBDecoderWarning)  # alerts are reported at the end
                _analyse_epoch(wm, epoch, data.probe, progress, full=full)
            mean = total / samples
            say(f"{prefix}epoch {epoch + 1}/{epochs}: train loss {mean:.3f}, held-out accuracy {accuracy:.1%}")
    finally:
        watch.remove()


def _alerts(wm: Master_analyzer) -> list[dict[str, Any]]:
    return [*wm.gradient_alerts(), *wm.activation_alerts(), *wm.update_alerts()]


def _tell_alerts(say: Callable[[str], None], result: DemoResult) -> None:
    """What BBDecoder caught: the alerts of each run, the first few of each kind."""
    for name, alerts in (("healthy run", result.alerts), ("broken twin", result.twin_alerts)):
        if not alerts:
            say(f"{name}: no alerts")
            continue
        kinds: dict[str, list[dict[str, Any]]] = {}
        for alert in alerts:
            kinds.setdefault(alert["kind"], []).append(alert)
        counts = ", ".join(f"{len(items)} {kind}" for kind, items in kinds.items())
        say(f"{name}: {len(alerts)} alert(s) ({counts}), for example:")
        for items in kinds.values():
            say(f"  epoch {items[0]['epoch']}: {items[0]['message']}")


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    try:
        predictions = torch.cat([model(chunk).argmax(1) for chunk in images.split(256)])
    finally:
        model.train(was_training)
    return float((predictions == labels).float().mean())


def _analyse_epoch(wm: Master_analyzer, epoch: int, probe: torch.Tensor, progress: bool, *, full: bool = True) -> None:
    """The per-epoch analyses: gradients (with activations and updates), weights; with ``full`` also
    similarity, features and Grad-CAM."""
    from tqdm.auto import tqdm

    steps: list[tuple[str, Callable[[], Any]]] = [
        ("gradients", lambda: wm.save_collected_grads(epoch + 1)),  # epochs numbered from 1, as printed
        ("weights", lambda: wm.visualize_weight_hist(HISTOGRAM_LAYERS)),
    ]
    if full:
        steps += [
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
