"""Cost of per-step gradient statistics: plain PyTorch steps vs BBDecoder-wrapped steps.

A ResNet-18-sized model (defined here, no torchvision: 62 parameter tensors, 11.2 M
parameters, 45 MB of gradients), batch 32 at 32×32, SGD, on the CPU with one thread.
Plain and wrapped training steps run in the same process, interleaved in shuffled order;
each step's CPU time (``time.process_time``) is measured and every pair gives a ratio
wrapped / plain. Printed: the median ratio with its min and max, for

* every-step collection of all layers (``collect_grads=True`` each step), and
* ``collect_every=10``;

then, on the same gradients, the statistics kernel alone and a plain ``sum`` over the same
tensors (one read of the gradients: the floor), as medians and as fractions of the median
plain step. Those two figures do not depend on how busy the machine is as much as the
step ratios do.

Run: ``python benchmarks/grad_overhead.py [--pairs 60] [--backend auto]``. The first
wrapped step compiles the statistics kernel (tens of seconds on a small CPU, a few with
Inductor's disk cache warm); it is timed and printed, then warm-up steps absorb it.
"""

from __future__ import annotations

import argparse
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BBDecoder import Master_analyzer
from BBDecoder.kernels import gradstats as _gradstats


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (ImageNet stem), 10 classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for index, cout in enumerate((64, 128, 256, 512)):
            stride = 1 if index == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60, help="measured (plain, wrapped) pairs per setting")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured steps of each kind first")
    parser.add_argument("--backend", default="auto", choices=_gradstats.BACKENDS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    _gradstats.set_backend(args.backend)

    model = ResNet18()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    params = list(model.parameters())
    print(
        f"torch {torch.__version__}, 1 thread, ResNet-18-sized model: {len(params)} tensors, "
        f"{sum(p.numel() for p in params) / 1e6:.2f} M parameters, batch 32×3×32×32, "
        f"statistics backend {args.backend!r} → {_gradstats.backend_for(torch.device('cpu'))!r}"
    )

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    def wrapped(analyzer: Master_analyzer, every: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(analyzer.forward_propagation(x), y)
        analyzer.backward_propagation(loss, collect_grads=True, collect_every=every)
        optimizer.step()

    all_plain: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        for label, every in (("every step, all layers", 1), ("collect_every=10, all layers", 10)):
            analyzer = Master_analyzer(model, Path(folder) / f"every{every}", None, verbose=False)
            started = time.perf_counter()
            wrapped(analyzer, every)
            first = time.perf_counter() - started
            if every == 1:
                print(f"first recorded step (builds the statistics kernel if it compiles): {first:.1f} s")
            started = time.perf_counter()
            for _ in range(max(args.warmup, 1)):
                wrapped(analyzer, every)
                plain()
            warm = time.perf_counter() - started
            ratios, plain_times, wrapped_times = [], [], []
            for _ in range(args.pairs):
                order = [("plain", plain), ("wrapped", lambda a=analyzer, e=every: wrapped(a, e))]
                rng.shuffle(order)
                times = {}
                for name, step in order:
                    begin = time.process_time()
                    step()
                    times[name] = time.process_time() - begin
                plain_times.append(times["plain"])
                wrapped_times.append(times["wrapped"])
                ratios.append(times["wrapped"] / times["plain"])
            all_plain.extend(plain_times)
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                files = analyzer.save_collected_grads(0)
            saved = time.perf_counter() - started
            print(
                f"{label:30s} median ratio {statistics.median(ratios):.3f} "
                f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {len(ratios)} pairs); "
                f"median step {statistics.median(plain_times) * 1e3:.1f} ms plain, "
                f"{statistics.median(wrapped_times) * 1e3:.1f} ms wrapped; "
                f"warm-up {warm:.1f} s; save {saved:.1f} s, {len(files)} files"
            )

    # the kernel alone and the floor, on the gradients of one more plain step (weights: what is recorded)
    plain()
    grads = [p.grad for name, p in model.named_parameters() if p.grad is not None and not name.endswith("bias")]
    step = statistics.median(all_plain)
    kernel = _median_time(lambda: _gradstats.grad_stats(grads), args.pairs)
    floor = _median_time(lambda: [g.sum() for g in grads], args.pairs)
    megabytes = sum(g.numel() * g.element_size() for g in grads) / 1e6
    print(
        f"statistics kernel alone: {kernel * 1e3:.1f} ms ({kernel / step:.2%} of a plain step); "
        f"one read of the same {len(grads)} tensors ({megabytes:.0f} MB, a sum each): {floor * 1e3:.1f} ms "
        f"({floor / step:.2%})"
    )


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median CPU time of ``fn`` over ``repeats`` calls (after one unmeasured call)."""
    fn()
    times = []
    for _ in range(max(repeats, 5)):
        begin = time.process_time()
        fn()
        times.append(time.process_time() - begin)
    return statistics.median(times)


if __name__ == "__main__":
    main()
