"""Gradient statistics under DDP or FSDP2, on the CPU with gloo (or on GPUs with NCCL).

Run with:
    torchrun --nproc_per_node 2 examples/ddp_train.py --out runs/ddp_example
    torchrun --nproc_per_node 2 examples/ddp_train.py --strategy fsdp --out runs/fsdp_example
    torchrun --nproc_per_node 2 examples/ddp_train.py --compile aot_eager   # torch.compile'd model

Every rank wraps its model in the same way and makes the same calls. DDP: statistics are
read after DDP's all-reduce, so they are those of the global batch on every rank. FSDP2:
each rank records statistics of its own shards and ``save_collected_grads`` (called by
every rank) reduces them once per epoch. ``get_sim`` averages over every rank's samples.
Only rank 0 writes files or prints.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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


def wrap(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with each conv layer its own shard group and the rest in the root's."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Conv2d):
            fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ddp_example", help="save_path (rank 0 writes here)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="training steps per epoch")
    parser.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the wrapped model (default backend: inductor)")  # fmt: skip
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts them)
    model = wrap(make_model().to(device), args.strategy, device)
    if args.compile:
        model = torch.compile(model, backend=args.compile)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # Every rank constructs the analyzer; rank 0 alone prints the summary and writes.
    wm = Master_analyzer(model, args.out, [4, 1, 16, 16], verbose=True)

    generator = torch.Generator().manual_seed(1234 + rank)  # each rank its own shard of the data
    for epoch in range(args.epochs):
        for _ in range(args.steps):
            labels = torch.randint(0, 2, (4,), generator=generator)
            images = torch.randn(4, 1, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1).float()
            loss = F.cross_entropy(wm.forward_propagation(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            wm.backward_propagation(loss, collect_grads=True)
            optimizer.step()
        paths = wm.save_collected_grads(epoch)  # every rank calls it (FSDP2 reduces here); rank 0 writes
        similarity = wm.get_sim(images[:2], layer_inds=[0, 3], dim=1)  # the mean over every rank's samples
        if rank == 0:
            print(f"epoch {epoch}: wrote {len(paths)} files; channel similarity {similarity}")
    wm.get_inter_features(images, 0)  # every rank runs the model; rank 0's input is saved
    wm.build_report()
    wm.close()
    dist.destroy_process_group()
    if rank == 0:
        print(f"done on {world} ranks ({args.strategy}); outputs in {args.out}")


if __name__ == "__main__":
    main()
