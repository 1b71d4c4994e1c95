"""Gradient analysis in an ordinary training loop (the original BBDecoder README's example).

Uses torchvision's ResNet-18 when torchvision is installed, otherwise a small CNN defined
here; the data are BBDecoder's procedurally drawn shapes, so nothing is downloaded.

    python examples/train_gradients.py --epochs 3 --out runs/gradients

Then open ``runs/gradients/report.html``, or ``gradients/`` for the per-epoch charts and CSVs.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from BBDecoder import Master_analyzer
from BBDecoder.demo import CLASSES, draw_shapes


def make_model(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 if available, else a small CNN with the same kind of layers."""
    try:
        from torchvision.models import resnet18
    except Exception:  # torchvision is optional (and must match the installed torch)
        return nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
            nn.Flatten(), nn.Linear(64, num_classes),
        )  # fmt: skip
    return resnet18(num_classes=num_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gradients")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = draw_shapes(args.samples, seed=0)
    train_loader = DataLoader(TensorDataset(images, labels), batch_size=64, shuffle=True)
    model = make_model(len(CLASSES)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    wrapped_model = Master_analyzer(model, args.out, input_size=[1, 3, 32, 32])
    layer_inds = [layer.id for layer in wrapped_model.layers if layer.parameter_count() > 0]

    for epoch in range(args.epochs):
        losses = []
        for inputs, targets in tqdm(train_loader, desc=f"epoch {epoch}"):
            inputs, targets = inputs.to(device), targets.to(device)
            outputs = wrapped_model.forward_propagation(inputs)
            loss = F.cross_entropy(outputs, targets)

            optimizer.zero_grad()
            wrapped_model.backward_propagation(loss, collect_grads=True, layer_inds=layer_inds)
            optimizer.step()
            losses.append(loss.item())

        print(f"Epoch {epoch}: average loss {sum(losses) / len(losses):.4f}")
        wrapped_model.save_collected_grads(epoch)  # flow chart, norm curves, CSV, heatmap, alerts

    wrapped_model.build_report()  # prints the path of report.html (verbose=True)
    wrapped_model.close()


if __name__ == "__main__":
    main()
