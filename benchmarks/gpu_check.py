"""One-GPU check of per-step gradient statistics: cost, launches, syncs, AMP, memory, save.

For a ResNet-50-sized CNN (batch 64 at 224×224, SGD) and a GPT-2-small-sized transformer
(sequence 512, bf16 autocast, AdamW), both defined here (torchvision cannot be imported
next to torch 2.13), it prints one table:

* ``ratio``: median wrapped / plain training-step time over interleaved pairs in shuffled
  order (CUDA events; every step, all layers recorded), with min and max;
* ``ops/step``: aten ops dispatched by one recorded step (``collect_grads`` after a plain
  backward, counted with a ``TorchDispatchMode``);
* ``syncs``: host synchronisations inside ``collect_grads`` and inside
  ``backward_propagation`` beyond those of the plain backward, with
  ``torch.cuda.set_sync_debug_mode("error")`` around ``collect_grads`` (must be 0);
* ``fp16 skip``: float16 autocast with a ``GradScaler``, one step made inf on purpose: is
  it listed as skipped, and are the recorded numbers those of the unscaled gradients;
* ``+peak MiB``: peak device memory of a wrapped step above a plain one;
* ``save s``: ``save_collected_grads`` for the rows recorded by the timing loop.

Run: ``python benchmarks/gpu_check.py [--pairs 50]`` on a machine with one NVIDIA GPU;
sized to finish well under five minutes on an H100/H200-class GPU (most of it in the two
``save_collected_grads`` calls, which draw on the CPU). Without CUDA it prints a
"no CUDA" line and exits 0; ``--smoke`` then runs every measurement on tiny models on the
CPU (wall clock instead of CUDA events, no sync or memory figures) to check the script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BBDecoder import Master_analyzer
from BBDecoder.kernels import gradstats as _gradstats


# ------------------------------------------------------------------------------ models
class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout: 161 parameter tensors, 25.6 M parameters."""

    def __init__(self, num_classes: int = 1000, widths: tuple[int, ...] = (64, 128, 256, 512)) -> None:
        super().__init__()
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = stem, []
        for index, (width, blocks) in enumerate(zip(widths, (3, 4, 6, 3), strict=True)):
            layers = []
            for block in range(blocks):
                layers.append(Bottleneck(cin, width, 2 if block == 0 and index > 0 else 1))
                cin = width * 4
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim)
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.c_fc = nn.Linear(dim, 4 * dim)
        self.mlp_proj = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 small: 12 layers, 768 wide, 12 heads, 50257 tokens, tied embedding (124 M parameters)."""

    def __init__(self, vocab: int = 50257, context: int = 1024, dim: int = 768, layers: int = 12, heads: int = 12):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(context, dim)
        self.h = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.lm_head(self.ln_f(self.h(self.wte(tokens) + self.wpe(positions))))


# ---------------------------------------------------------------------------- workloads
@dataclass
class Workload:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    autocast: torch.dtype | None

    def loss(self, forward: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, target: torch.Tensor) -> Any:
        device = inputs.device.type
        context = torch.autocast(device, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with context:
            out = forward(inputs)
            return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), target.reshape(-1))


def workloads(device: torch.device, smoke: bool) -> list[Workload]:
    torch.manual_seed(0)
    if smoke:  # the same code paths on tiny models
        cnn, image, images = ResNet50(10, widths=(4, 8, 8, 8)), 32, 2
        gpt, tokens, sequences = GPT2(vocab=97, context=64, dim=32, layers=2, heads=2), 16, 2
    else:
        cnn, image, images = ResNet50(), 224, 64
        gpt, tokens, sequences = GPT2(), 512, 8
    cnn, gpt = cnn.to(device), gpt.to(device)
    classes = cnn.fc.out_features
    vocab = gpt.wte.num_embeddings
    x = torch.randn(images, 3, image, image, device=device)
    y = torch.randint(0, classes, (images,), device=device)
    ids = torch.randint(0, vocab, (sequences, tokens + 1), device=device)
    return [
        Workload(
            f"ResNet-50, batch {images}, {image}²",
            cnn,
            torch.optim.SGD(cnn.parameters(), lr=1e-3, momentum=0.9),
            lambda: (x, y),
            None,
        ),
        Workload(
            f"GPT-2 small, {sequences}×{tokens} tokens, bf16",
            gpt,
            torch.optim.AdamW(gpt.parameters(), lr=1e-4, foreach=True),
            lambda: (ids[:, :-1], ids[:, 1:]),
            torch.bfloat16,
        ),
    ]


# ------------------------------------------------------------------------- measurements
class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


class Clock:
    """CUDA events on a GPU, wall clock (after a sync) on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, step: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        step()
        return time.perf_counter() - begin


@contextlib.contextmanager
def sync_mode(device: torch.device, mode: str) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def count_sync_warnings(device: torch.device, step: Callable[[], None]) -> int:
    """Synchronising CUDA calls in ``step`` (sync debug mode "warn", one warning per call)."""
    with warnings.catch_warnings(record=True) as caught, sync_mode(device, "warn"):
        warnings.simplefilter("always")
        step()
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(work: Workload, device: torch.device, pairs: int, folder: Path) -> dict[str, str]:
    model, optimizer = work.model, work.optimizer
    inputs, target = work.batch()
    wm = Master_analyzer(model, folder / work.name.split(",")[0].replace(" ", "_"), verbose=False)
    clock = Clock(device)

    def plain() -> None:
        optimizer.zero_grad(set_to_none=True)
        work.loss(model, inputs, target).backward()
        optimizer.step()

    def wrapped() -> None:
        optimizer.zero_grad(set_to_none=True)
        wm.backward_propagation(work.loss(wm.forward_propagation, inputs, target), collect_grads=True)
        optimizer.step()

    for _ in range(3):  # warm-up: cuDNN, allocator, the recorder's plan and buffer
        plain()
        wrapped()
    rng = random.Random(0)
    ratios = []
    for _ in range(pairs):
        order = [("plain", plain), ("wrapped", wrapped)]
        rng.shuffle(order)
        times = {name: clock.time(step) for name, step in order}
        ratios.append(times["wrapped"] / times["plain"])

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wm.save_collected_grads(0)
    saved = time.perf_counter() - started

    # one recorded step's dispatched ops and syncs: collect_grads after a plain backward
    optimizer.zero_grad(set_to_none=True)
    work.loss(model, inputs, target).backward()
    counter = OpCounter()
    syncs = "n/a (CPU)"
    with counter:
        wm.collect_grads()
    if device.type == "cuda":
        try:
            with sync_mode(device, "error"):
                wm.collect_grads()
            in_collect = 0
        except RuntimeError as error:  # the first synchronising call raises
            in_collect = f"≥1 ({str(error).splitlines()[0][:40]})"

        def backward_plain() -> None:
            optimizer.zero_grad(set_to_none=True)
            work.loss(model, inputs, target).backward()

        def backward_wrapped() -> None:
            optimizer.zero_grad(set_to_none=True)
            wm.backward_propagation(work.loss(wm.forward_propagation, inputs, target), collect_grads=True)

        added = count_sync_warnings(device, backward_wrapped) - count_sync_warnings(device, backward_plain)
        syncs = f"{in_collect} / {added}"

    peak = "n/a (CPU)"
    if device.type == "cuda":
        peaks = {}
        for name, step in (("plain", plain), ("wrapped", wrapped)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated()
        peak = f"{(peaks['wrapped'] - peaks['plain']) / 2**20:+.1f}"
    wm.close()
    return {
        "ratio": f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}, {pairs} pairs)",
        "ops/step": str(counter.calls),
        "syncs": syncs,
        "+peak MiB": peak,
        "save s": f"{saved:.1f}",
    }


def fp16_skip_check(work: Workload, device: torch.device, folder: Path) -> str:
    """Float16 autocast with a GradScaler, step 1 made inf: skipped and marked, numbers unscaled."""
    model = work.model
    inputs, target = work.batch()
    wm = Master_analyzer(model, folder, verbose=False)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    worst, scaler_skipped = 0.0, []
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16):
            out = wm.forward_propagation(inputs)
            loss = F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), target.reshape(-1))
        if step == 1:
            loss = loss * math.inf
        wm.backward_propagation(loss, collect_grads=True, scaler=scaler)
        scale = scaler.get_scale()
        recorder = wm._grads.recorder
        for column in recorder.columns:  # recorded max|g| against the unscaled gradient, where finite
            grad = column.parameter.grad
            top = math.nan if grad is None else (grad.detach().double().abs().max() / scale).item()
            if math.isfinite(top):
                got = recorder.data[recorder.rows - 1, column.index, 2].item()
                worst = max(worst, abs(got - top) / max(top, 1e-30))
        scaler.step(optimizer)
        scaler.update()
        if scaler.get_scale() < scale:  # the scaler backs off exactly when it skipped the step
            scaler_skipped.append(step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = wm.save_collected_grads(0)
    wm.close()
    alerts = next(p for p in paths if p.name.endswith("_alerts.json"))
    skipped = json.loads(alerts.read_text(encoding="utf-8")).get("skipped_iterations")
    verdict = "ok" if skipped == scaler_skipped and 1 in skipped and worst < 1e-5 else "FAIL"
    return f"{verdict}: marked {skipped}, scaler skipped {scaler_skipped}, max-abs rel. err {worst:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=50, help="interleaved (plain, wrapped) pairs per model")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU when there is no CUDA")
    args = parser.parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cudnn.benchmark = True
        print(
            f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, statistics backend "
            f"{_gradstats.backend_for(device)!r}"
        )
    elif args.smoke:
        device = torch.device("cpu")
        args.pairs = min(args.pairs, 3)
        _gradstats.set_backend("foreach")  # the accelerators' kernel, on CPU tensors
        print("no CUDA: smoke run on the CPU, accelerators' 'foreach' kernel (tiny models; ratios mean nothing)")
    else:
        print("no CUDA: gpu_check needs one NVIDIA GPU; nothing measured (use --smoke to exercise the script on CPU)")
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for work in workloads(device, args.smoke):
            row = {"model": work.name, **measure(work, device, args.pairs, Path(tmp))}
            row["fp16 skip"] = fp16_skip_check(work, device, Path(tmp) / f"fp16_{len(rows)}")
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    print(" | ".join(c.ljust(widths[c]) for c in columns))
    print("-+-".join("-" * widths[c] for c in columns))
    for row in rows:
        print(" | ".join(row[c].ljust(widths[c]) for c in columns))
    print("syncs: inside collect_grads (sync debug mode 'error') / added to backward_propagation ('warn' count)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
