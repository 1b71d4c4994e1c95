"""What BBDecoder's TensorBoard export costs, against plain PyTorch and the usual TensorBoard loop.

One "epoch" is ``--steps`` training steps of the demo's CNN (batch 64, 32x32, CPU, one
thread) followed by the epoch-end logging. Variants, run interleaved in a shuffled order
``--repeats`` times and compared by their median CPU time:

* ``plain``: the training steps alone.
* ``bbdecoder+tb``: gradient statistics collected every step by ``backward_propagation``
  and, at the end of the epoch, every iteration's statistics written as TensorBoard
  scalars plus weight and gradient histograms (``add_histogram_raw`` from on-device
  histograms). The figures and CSVs ``save_collected_grads`` and
  ``visualize_weight_hist`` also draw are timed separately and reported, not counted:
  they are the analyses' cost, not the export's.
* ``tb-every-step``: the common hand-written TensorBoard loop: each step, the L2 norm of
  every gradient as a scalar (``.item()``) and ``add_histogram`` of every weight and
  gradient.

    python benchmarks/tensorboard_overhead.py --steps 40 --repeats 7

Prints the median ratio to ``plain`` with min and max over the repeats.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from BBDecoder import Master_analyzer
from BBDecoder.demo import ShapesCNN, draw_shapes

BATCH = 64
LAYERS = ["conv1", "bn1", "conv2", "bn2", "conv3", "fc"]


class Timer:
    """Adds up CPU time spent inside wrapped callables."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - start

        return timed


def make_batches(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = draw_shapes(steps * BATCH, seed=0)
    return list(zip(images.split(BATCH), labels.split(BATCH), strict=True))


def plain_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any]) -> float:
    start = time.process_time()
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.process_time() - start


def bbdecoder_epoch(
    wm: Master_analyzer, optimizer: torch.optim.Optimizer, batches: list[Any], epoch: int
) -> tuple[float, float]:
    """Returns (steps + TensorBoard export, time spent on figures and CSVs)."""
    export = Timer()
    wm._on_gradients_saved = export.wrap(type(wm)._on_gradients_saved.__get__(wm))  # type: ignore[method-assign]
    wm._on_weights_histogram = export.wrap(type(wm)._on_weights_histogram.__get__(wm))  # type: ignore[method-assign]
    start = time.process_time()
    for x, y in batches:
        loss = F.cross_entropy(wm(x), y)
        optimizer.zero_grad()
        wm.backward_propagation(loss, collect_grads=True, layer_inds=LAYERS)
        optimizer.step()
    steps = time.process_time() - start
    start = time.process_time()
    wm.save_collected_grads(epoch)
    wm.visualize_weight_hist(["conv1", "conv2", "conv3", "fc"])
    epoch_end = time.process_time() - start
    return steps + export.seconds, epoch_end - export.seconds


def tensorboard_epoch(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Any], writer: Any, step0: int
) -> float:
    start = time.process_time()
    for i, (x, y) in enumerate(batches):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        for name, parameter in model.named_parameters():
            writer.add_scalar(f"grad_l2/{name}", parameter.grad.norm().item(), step0 + i)
            writer.add_histogram(f"weights/{name}", parameter.detach(), step0 + i)
            writer.add_histogram(f"gradients/{name}", parameter.grad, step0 + i)
        optimizer.step()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per epoch (default 40)")
    parser.add_argument("--repeats", type=int, default=7, help="epochs per variant (default 7)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from torch.utils.tensorboard import SummaryWriter

    batches = make_batches(args.steps)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        models = {name: ShapesCNN() for name in ("plain", "bbdecoder+tb", "tb-every-step")}
        optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01) for name, m in models.items()}
        wm = Master_analyzer(models["bbdecoder+tb"], root / "run", verbose=False, tensorboard_dir=root / "tb-bbd")
        writer = SummaryWriter(str(root / "tb-plain"))
        times: dict[str, list[float]] = {name: [] for name in models}
        files: list[float] = []
        # one warm-up epoch of each, then the measured ones in a shuffled order
        order = [name for _ in range(args.repeats + 1) for name in models]
        head, tail = order[: len(models)], order[len(models) :]
        random.Random(0).shuffle(tail)
        counters = dict.fromkeys(models, 0)
        for index, name in enumerate(head + tail):
            epoch = counters[name]
            counters[name] += 1
            if name == "plain":
                elapsed = plain_epoch(models[name], optimizers[name], batches)
            elif name == "bbdecoder+tb":
                elapsed, drawing = bbdecoder_epoch(wm, optimizers[name], batches, epoch)
                if index >= len(models):
                    files.append(drawing)
            else:
                elapsed = tensorboard_epoch(models[name], optimizers[name], batches, writer, epoch * args.steps)
            if index >= len(models):
                times[name].append(elapsed)
        wm.close()
        writer.close()

    base = statistics.median(times["plain"])
    print(f"demo CNN, batch {BATCH}, {args.steps} steps per epoch, {args.repeats} epochs per variant, CPU, 1 thread")
    print(f"plain epoch: median {base:.3f} s CPU")
    for name in ("bbdecoder+tb", "tb-every-step"):
        ratios = [t / base for t in times[name]]
        print(
            f"{name:>14}: median ratio {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})"
        )
    print(f"(not counted above: BBDecoder's figures/CSVs at epoch end, median {statistics.median(files):.2f} s)")


if __name__ == "__main__":
    main()
