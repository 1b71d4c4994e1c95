"""How a layer's features evolve over training: one frame per epoch, then a video.

    python examples/feature_evolution.py --epochs 6 --out runs/features

Writes ``features/{ID}_{name}/frame_NNNN.png`` (+ the raw ``.npy``) every epoch and, at the
end, ``{ID}_{name}`` evolution videos (``.mp4`` and ``.webm``) and a contact sheet; all
frames share one colour scale, so a brighter frame means stronger activations.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from BBDecoder import Master_analyzer
from BBDecoder.demo import CLASSES, ShapesCNN, draw_shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/features")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--samples", type=int, default=2000, help="training images")
    args = parser.parse_args()

    torch.manual_seed(0)
    images, labels = draw_shapes(args.samples, seed=0)
    sample = draw_shapes(len(CLASSES), seed=1)[0][:1]  # a fixed input, watched all along
    model = ShapesCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    wm = Master_analyzer(model, args.out, input_size=[1, 3, 32, 32], verbose=False)

    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(images)).split(64):
            loss = F.cross_entropy(wm(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        # every channel of relu2 (a 32-channel map), and the strongest relu3 channel at each position
        wm.get_inter_features(sample, "relu2", tag=f"epoch {epoch + 1}")
        wm.get_inter_features(sample, "relu3", post_proc=lambda t: t.amax(0), tag=f"epoch {epoch + 1}")
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}")

    for layer in ("relu2", "relu3"):
        for path in wm.compile_feature_evolution(layer, fps=2):
            print("wrote", path)
    print("report:", wm.build_report())
    wm.close()


if __name__ == "__main__":
    main()
