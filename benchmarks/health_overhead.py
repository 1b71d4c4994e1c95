"""Cost of activation health and of the update-to-weight ratio: plain PyTorch steps vs BBDecoder steps.

The ResNet-18-sized model of ``grad_overhead.py`` (62 parameter tensors, 11.2 M
parameters), batch 32 at 32×32, SGD with momentum, on the CPU with one thread. Plain and
BBDecoder steps run in the same process, interleaved in shuffled order; each sample's CPU
time (``time.process_time``) is measured and every pair gives a ratio BBDecoder / plain.
Printed: the median ratio with its min and max, for

* activation health every 10 steps (``forward_propagation(x, collect_acts=10)``, all
  layers): a sample is a block of 10 consecutive steps, one of them recorded, against 10
  plain steps, so the ratio is the amortised cost;
* the recorded step alone (``collect_acts=True``) against one plain step;
* the update-to-weight ratio at every step (``watch_optimizer``, all weights): one watched
  optimizer step against one plain one (two SGD optimizers over the same parameters);

and the memory each holds: the activation buffer, and the weight copy that lives during a
watched step only. The load average of the machine is printed before and after, since
other processes share the CPU.

Run: ``python benchmarks/health_overhead.py [--pairs 40] [--block-pairs 15]``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from grad_overhead import ResNet18  # the benchmark model, defined once

from BBDecoder import Master_analyzer


def pairs(
    plain: Callable[[], None], wrapped: Callable[[], None], count: int, rng: random.Random
) -> tuple[list[float], list[float], list[float]]:
    """``count`` shuffled (plain, wrapped) pairs: ratios and both CPU times."""
    ratios, plain_times, wrapped_times = [], [], []
    for _ in range(count):
        order = [("plain", plain), ("wrapped", wrapped)]
        rng.shuffle(order)
        times = {}
        for name, step in order:
            begin = time.process_time()
            step()
            times[name] = time.process_time() - begin
        plain_times.append(times["plain"])
        wrapped_times.append(times["wrapped"])
        ratios.append(times["wrapped"] / times["plain"])
    return ratios, plain_times, wrapped_times


def report(label: str, ratios: list[float], plain: list[float], wrapped: list[float], unit: str) -> None:
    print(
        f"{label:44s} median ratio {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} pairs); "
        f"median {unit} {statistics.median(plain) * 1e3:.1f} ms plain, "
        f"{statistics.median(wrapped) * 1e3:.1f} ms BBDecoder"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=40, help="pairs of single steps per setting")
    parser.add_argument("--block-pairs", type=int, default=15, help="pairs of 10-step blocks (activations every 10)")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps of each kind first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = ResNet18()
    params = list(model.parameters())
    plain_optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    watched_optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    print(
        f"torch {torch.__version__}, 1 thread, ResNet-18-sized model: {len(params)} tensors, "
        f"{sum(p.numel() for p in params) / 1e6:.2f} M parameters, batch 32×3×32×32; "
        f"load average before: {', '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs"
    )

    def step(forward: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(forward(x), y).backward()
        optimizer.step()

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wm = Master_analyzer(model, Path(folder) / "run", None, verbose=False)

        def plain() -> None:
            step(model, plain_optimizer)

        def plain_block() -> None:
            for _ in range(10):
                step(model, plain_optimizer)

        def acts_block() -> None:
            for _ in range(10):
                step(lambda t: wm.forward_propagation(t, collect_acts=10), plain_optimizer)

        def acts_recorded() -> None:
            step(lambda t: wm.forward_propagation(t, collect_acts=True), plain_optimizer)

        for _ in range(args.warmup):
            plain()
            acts_recorded()
        for _ in range(10 - wm._acts.calls % 10):  # blocks start at a recorded call
            wm.forward_propagation(x)
        ratios, p, w = pairs(plain_block, acts_block, args.block_pairs, rng)
        report("activation health every 10 steps (10-step blocks)", ratios, p, w, "block")
        ratios, p, w = pairs(plain, acts_recorded, args.pairs, rng)
        report("activation health, the recorded step alone", ratios, p, w, "step")
        recorder = wm._acts.recorder
        rows = recorder.data.shape[0] if recorder.data is not None else 0
        print(
            f"  activation buffer: {rows} rows × {recorder.columns} layers × 7 float32 = "
            f"{rows * recorder.columns * 7 * 4 / 1024:.1f} KiB"
        )

        watch = wm.watch_optimizer(watched_optimizer)

        def watched() -> None:
            step(model, watched_optimizer)

        for _ in range(args.warmup):
            plain()
            watched()
        ratios, p, w = pairs(plain, watched, args.pairs, rng)
        report("update-to-weight ratio every step (all weights)", ratios, p, w, "step")
        copy = sum(p.numel() * p.element_size() for p in weights)
        print(
            f"  during a watched step: one copy of the {len(weights)} watched weight tensors, "
            f"{copy / 2**20:.1f} MiB, freed at the end of the step; kept between steps: 2 float32 per tensor"
        )
        watch.remove()
        started = time.perf_counter()
        files = wm.save_collected_grads(0)
        print(f"  save: {time.perf_counter() - started:.1f} s, {len(files)} files")
        wm.close()
    print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
