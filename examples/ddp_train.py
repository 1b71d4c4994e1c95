"""Gradient statistics under DistributedDataParallel, on the CPU with gloo.

Run with:
    torchrun --nproc_per_node 2 examples/ddp_train.py --out runs/ddp_example

Every rank wraps its DDP model in the same way and calls the same methods; statistics are
read after DDP's all-reduce, so they are those of the global batch on every rank, and only
rank 0 writes files or prints.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from BBDecoder import Master_analyzer


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/ddp_example")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    model = DistributedDataParallel(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    wm = Master_analyzer(model, args.out, [4, 1, 16, 16], verbose=rank == 0)

    generator = torch.Generator().manual_seed(1234 + rank)  # each rank its own shard of data
    for epoch in range(args.epochs):
        for _ in range(20):
            labels = torch.randint(0, 2, (4,), generator=generator)
            images = torch.randn(4, 1, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1).float()
            loss = F.cross_entropy(wm.forward_propagation(images), labels)
            optimizer.zero_grad()
            wm.backward_propagation(loss, collect_grads=True)
            optimizer.step()
        paths = wm.save_collected_grads(epoch)  # every rank calls it; rank 0 writes
        similarity = wm.get_sim(images[:2], layer_inds=[0, 3], dim=1)  # averaged across ranks
        if rank == 0:
            print(f"epoch {epoch}: wrote {len(paths)} files; channel similarity {similarity}")
    wm.close()
    dist.destroy_process_group()
    if rank == 0:
        print(f"done on {world} ranks; outputs in {args.out}")


if __name__ == "__main__":
    main()
