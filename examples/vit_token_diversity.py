"""Token diversity across the blocks of a tiny Vision Transformer, with ``get_sim``.

"Vision Transformers with Patch Diversification" (Gong et al., arXiv 2104.12753) observed
that patch tokens become more and more alike in deeper blocks ("over-smoothing"), measured
by the mean absolute cosine similarity between tokens. This example trains a tiny ViT
defined below on BBDecoder's drawn shapes and measures exactly that after every epoch:

    python examples/vit_token_diversity.py --epochs 6 --out runs/vit

``get_sim(x, layer_inds, dim=1, sim_method="abs_cosine")`` compares the slices of each
block's (N, T, D) output along dim 1, the tokens; the report's similarity section plots the
values over training, and ``similarity/`` holds the CSV.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from BBDecoder import Master_analyzer
from BBDecoder.demo import CLASSES, draw_shapes


class Block(nn.Module):
    """Pre-norm transformer block: attention and MLP, each with a residual connection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """4x4 patches of a 32x32 image → 64 tokens + [CLS], ``depth`` blocks, linear head."""

    def __init__(self, num_classes: int, dim: int = 64, depth: int = 4, heads: int = 4, patch: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (32 // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/vit")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=2000, help="training images")
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = draw_shapes(args.samples, seed=0)
    probe = draw_shapes(32, seed=1)[0]  # a fixed batch; values are averaged over it
    model = TinyViT(len(CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # depth=2 numbers the blocks themselves: "blocks.0" … "blocks.3"
    wm = Master_analyzer(model, args.out, input_size=[1, 3, 32, 32], depth=2, verbose=False)
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]

    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(images)).split(64):
            loss = F.cross_entropy(wm(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        values = wm.get_sim(probe, blocks, dim=1, sim_method="abs_cosine")
        row = "  ".join(f"{name}: {values[wm.layers.one(name).id]:.3f}" for name in blocks)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} | mean |cos| between tokens  {row}")

    print("report:", wm.build_report())
    wm.close()


if __name__ == "__main__":
    main()
