"""Gradient statistics of a Lightning run: one callback, no change to the LightningModule.

    python examples/lightning_train.py --epochs 2 --out runs/lightning

A small CNN learns BBDecoder's procedurally drawn shapes (nothing is downloaded) with
gradient accumulation and clipping; ``BBDecoderCallback`` records every layer's gradient
statistics at each optimizer step (before clipping), saves the epoch's charts, CSV and
weight histograms at each epoch end and writes ``report.html`` when fitting ends.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from BBDecoder.demo import CLASSES, draw_shapes
from BBDecoder.integrations.lightning import BBDecoderCallback


class ShapesModule(L.LightningModule):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.adaptive_max_pool2d(F.relu(self.conv2(x)), 1).flatten(1)
        return self.fc(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/lightning", help="save_path of the analyzer")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=256)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    torch.manual_seed(0)
    images, labels = draw_shapes(args.samples, seed=0)
    loader = DataLoader(TensorDataset(images, labels), batch_size=32, shuffle=True)
    callback = BBDecoderCallback(args.out)  # every layer; Master_analyzer options go here too
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accumulate_grad_batches=2,  # recorded once per optimizer step: the accumulated gradient
        gradient_clip_val=1.0,  # recorded before clipping
        callbacks=[callback],
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ShapesModule(len(CLASSES)), loader)
    report = Path(args.out).resolve() / "report.html"
    print(f"{trainer.global_step} optimizer steps in {time.perf_counter() - started:.0f} s; open the report: {report}")
    return report


if __name__ == "__main__":
    main()
