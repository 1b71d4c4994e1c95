"""Gradient statistics in an accelerate training loop: ``collect_grads()`` after ``accelerator.backward``.

    python examples/accelerate_train.py --epochs 2 --out runs/accelerate
    accelerate launch --num_processes 2 examples/accelerate_train.py      # DDP: rank 0 writes
    python examples/accelerate_train.py --mixed-precision fp16            # on a GPU

A small CNN learns BBDecoder's procedurally drawn shapes (nothing is downloaded) with
gradient accumulation and clipping. accelerate runs the backward pass, so the analyzer only
reads ``.grad``: once per optimizer step (when ``accelerator.sync_gradients``), before
clipping; under fp16 the gradients are still scaled there, so the scaler goes along.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from BBDecoder import Master_analyzer
from BBDecoder.demo import CLASSES, draw_shapes


def make_model(num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(16, num_classes),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accelerate", help="save_path of the analyzer")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=2, mixed_precision=args.mixed_precision)
    images, labels = draw_shapes(args.samples, seed=0)
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True)
    model = make_model(len(CLASSES))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    wm = Master_analyzer(model, args.out, verbose=False)  # a DDP-wrapped model is fine: its layers are numbered
    with_params = [layer.id for layer in wm.layers if layer.parameter_count() > 0]
    for epoch in range(args.epochs):
        for inputs, targets in loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(inputs), targets)
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the last micro-batch: once per optimizer step
                    wm.collect_grads(scaler=accelerator.scaler)  # still scaled under fp16; None otherwise
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)  # recorded before clipping
                optimizer.step()
                optimizer.zero_grad()
        wm.save_collected_grads(epoch)  # every rank calls it; only rank 0 writes
        wm.visualize_weight_hist(with_params)
        accelerator.print(f"epoch {epoch}: last loss {loss.item():.3f}")
    report = wm.build_report()
    wm.close()
    accelerator.print(f"done in {time.perf_counter() - started:.0f} s; open the report: {report}")
    return report


if __name__ == "__main__":
    main()
