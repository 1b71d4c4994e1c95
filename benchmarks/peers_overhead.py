"""Every-step gradient logging, side by side: plain PyTorch, BBDecoder, wandb.watch, TensorBoard.

The ResNet-18-sized model of ``grad_overhead.py`` (batch 32 at 32×32, SGD, one thread),
one identical copy per contender so that nobody's hooks touch another's steps:

* ``plain``: the training step alone;
* ``BBDecoder``: ``backward_propagation(loss, collect_grads=True)``, every layer, every step;
* ``wandb``: ``wandb.watch(model, log="all", log_freq=1)`` in offline mode, ``run.log`` each
  step (gradient and parameter histograms every step);
* ``TensorBoard``: a hand-written loop, ``SummaryWriter.add_histogram`` of every
  parameter's gradient every step (what people write to watch gradients).

Rounds run the four steps in shuffled order; each step is timed by wall clock (wandb's
writer is a separate process, invisible to CPU time) and by this process's CPU time.
Printed: median ratio to plain with min and max, per contender. A contender whose package
is missing (``pip install wandb`` / ``tensorboard``) is skipped with a note.

Run: ``python benchmarks/peers_overhead.py [--rounds 20]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grad_overhead import ResNet18  # the same model as the main benchmark

from BBDecoder import Master_analyzer

Step = Callable[[], None]


def sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.optim.Optimizer, Step]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return optimizer, step


def bbdecoder(model: nn.Module, x: torch.Tensor, y: torch.Tensor, folder: Path) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    wm = Master_analyzer(model, folder / "bbdecoder", verbose=False)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        wm.backward_propagation(F.cross_entropy(wm.forward_propagation(x), y), collect_grads=True)
        optimizer.step()

    return step


@contextlib.contextmanager
def wandb_run(folder: Path) -> Iterator[Any]:
    import wandb  # optional: pip install wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(folder), project="bbdecoder-peers")
    try:
        yield run
    finally:
        run.finish()


def wandb_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, run: Any) -> Step:
    run.watch(model, log="all", log_freq=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        run.log({"loss": loss.detach()})

    return step


def tensorboard_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, writer: Any) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    named = list(model.named_parameters())
    counter = [0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        for name, parameter in named:
            if parameter.grad is not None:
                writer.add_histogram(f"grad/{name}", parameter.grad, counter[0])
        optimizer.step()
        counter[0] += 1

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="measured rounds (one step of each contender)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    base = ResNet18()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    print(f"torch {torch.__version__}, 1 thread, ResNet-18-sized model, batch 32×3×32×32, {args.rounds} rounds")

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        steps: dict[str, Step] = {"plain": sgd_step(copy.deepcopy(base), x, y)[1]}
        steps["BBDecoder"] = bbdecoder(copy.deepcopy(base), x, y, folder)
        try:
            run = stack.enter_context(wandb_run(folder))
            steps["wandb.watch"] = wandb_step(copy.deepcopy(base), x, y, run)
        except ImportError:
            print("wandb: skipped (not installed; pip install wandb)")
        except Exception as error:  # an offline run that cannot start here: say so, measure the rest
            print(f"wandb: skipped ({type(error).__name__}: {error})")
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(folder / "tb"))
            stack.callback(writer.close)
            steps["TensorBoard hist"] = tensorboard_step(copy.deepcopy(base), x, y, writer)
        except ImportError:
            print("TensorBoard: skipped (not installed; pip install tensorboard)")

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(args.warmup):
                for step in steps.values():
                    step()
            wall: dict[str, list[float]] = {name: [] for name in steps}
            cpu: dict[str, list[float]] = {name: [] for name in steps}
            for _ in range(args.rounds):
                order = list(steps.items())
                rng.shuffle(order)
                for name, step in order:
                    w, c = time.perf_counter(), time.process_time()
                    step()
                    wall[name].append(time.perf_counter() - w)
                    cpu[name].append(time.process_time() - c)

    for name in steps:
        line = [f"{name:18s}"]
        for label, times in (("wall", wall), ("cpu", cpu)):
            ratios = [t / p for t, p in zip(times[name], times["plain"], strict=True)]
            line.append(
                f"{label} {statistics.median(ratios):6.3f}x (min {min(ratios):.3f}, max {max(ratios):.3f}; "
                f"median {statistics.median(times[name]) * 1e3:.0f} ms)"
            )
        print(" | ".join(line))


if __name__ == "__main__":
    main()
