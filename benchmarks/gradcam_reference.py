"""Agreement of ``Master_analyzer.grad_cam`` with pytorch-grad-cam's ``GradCAM``.

Not part of the test suite: pytorch-grad-cam (PyPI ``grad-cam``) needs torchvision, which
does not import beside the CPU torch the project is developed with. Run it in a throwaway
environment::

    python -m venv /tmp/gcvenv
    /tmp/gcvenv/bin/pip install torch torchvision grad-cam
    PYTHONPATH=. /tmp/gcvenv/bin/python benchmarks/gradcam_reference.py

It builds a ResNet-18 (random weights, seeded; its ReLUs are in-place) and a ViT-B/16-shaped
vision transformer (torchvision's ``vit_b_16`` at 2 blocks, 64×64 input), computes Grad-CAM
with both libraries on the same layers and targets, and prints the Pearson correlation of
each pair of maps. For the ViT, pytorch-grad-cam gets the usual reshape transform (drop the
class token, tokens to a grid) while BBDecoder reshapes the tokens on its own. The
acceptance bar is a correlation of at least 0.99 for every map.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import numpy as np
import torch


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random images with some large-scale structure (noise alone gives featureless maps)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, size // 16, size // 16, generator=generator)
    fine = 0.3 * torch.randn(n, 3, size, size, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False) + fine


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps; 1.0 when both are constant and equal."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.allclose(a, b, atol=1e-6) else float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchvision.models import resnet18

    from BBDecoder import Master_analyzer

    torch.manual_seed(args.seed)
    model = resnet18(weights=None, num_classes=10)
    # Random BatchNorm statistics, so eval mode is not an identity and the maps are non-trivial.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    x = smooth_images(args.samples, args.size, args.seed)
    print(f"torch {torch.__version__}; ResNet-18, input {list(x.shape)}")

    worst = 1.0

    def compare(analyzer: Master_analyzer, net: torch.nn.Module, name: str, images: torch.Tensor, **kw: object) -> None:
        nonlocal worst
        classes = 10
        for label, targets in (("top class", None), ("chosen", [i % classes for i in range(3, 3 + len(images))])):
            ours = analyzer.grad_cam(name, images, targets)
            with GradCAM(model=net, target_layers=[net.get_submodule(name)], **kw) as reference:
                wanted = None if targets is None else [ClassifierOutputTarget(t) for t in targets]
                theirs = reference(input_tensor=images, targets=wanted)
            values = [correlation(a, b) for a, b in zip(ours, theirs, strict=True)]
            difference = float(np.abs(ours - theirs).max())
            worst = min(worst, *values)
            print(
                f"{name:28s} {label:9s} correlation min {min(values):.8f} mean {np.mean(values):.8f}; "
                f"max |difference| {difference:.2e}"
            )

    with tempfile.TemporaryDirectory() as folder:
        analyzer = Master_analyzer(model, folder, verbose=False)
        for layer in ("layer2", "layer3", "layer4"):
            compare(analyzer, model, layer, x)
        analyzer.close()

    from torchvision.models import vit_b_16

    torch.manual_seed(args.seed)
    vit = vit_b_16(weights=None, num_classes=10, image_size=64, num_layers=2).eval()
    images = smooth_images(args.samples, 64, args.seed)
    side = 64 // 16

    def reshape(tokens: torch.Tensor) -> torch.Tensor:  # pytorch-grad-cam's documented ViT transform
        return tokens[:, 1:, :].reshape(tokens.size(0), side, side, tokens.size(2)).permute(0, 3, 1, 2)

    print(f"ViT-B/16 shape at 2 blocks, input {list(images.shape)}")
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Master_analyzer(vit, folder, depth=4, verbose=False)
        for block in ("encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_1.ln_1"):
            compare(analyzer, vit, block, images, reshape_transform=reshape)
        analyzer.close()
    verdict = "PASS" if worst >= 0.99 else "FAIL"
    print(f"lowest correlation {worst:.8f}: {verdict} (bar: 0.99)")
    return 0 if worst >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
