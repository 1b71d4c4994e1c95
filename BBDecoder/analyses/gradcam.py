"""Grad-CAM: which parts of the input a layer's features point to for a class.

For a layer output ``A`` (channels ``k``) and a class score ``y``, Grad-CAM is
``ReLU(sum_k w_k A_k)`` with ``w_k`` the spatial mean of ``dy/dA_k`` (Selvaraju et al.,
2017). The activation is captured by a temporary forward hook and its gradient computed
with ``torch.autograd.grad`` with respect to that captured tensor: no module backward
hooks (they fail with in-place ReLU, pytorch#61519) and no ``.grad`` ever written.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import Layer
from ..core.model import first_tensor
from ..core.tree import as_call, batch_size, tensors
from ..errors import BBDecoderTypeError, BBDecoderValueError, BBDecoderWarning
from ..output import layout
from ._base import AnalyzerBase

SECTION = "gradcam"
ReshapeTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GradCamResult:
    """The maps of one Grad-CAM call, as plain data.

    Attributes:
        maps: ``(N, H, W)`` float32 in [0, 1], at the input's spatial size.
        targets: the class used for each sample.
        scores: each sample's target score (the class's mean score for segmentation).
        kind: ``"classification"`` for ``(N, C)`` outputs, ``"segmentation"`` otherwise.
    """

    maps: np.ndarray
    targets: list[int]
    scores: list[float]
    kind: str


class GradCamMixin(AnalyzerBase):
    """``grad_cam``: class activation maps of any layer with a spatial output."""

    def grad_cam(
        self,
        layer: int | str,
        input_tensor: Any,
        target_class: int | Sequence[int] | None = None,
        *,
        reshape_transform: ReshapeTransform | None = None,
    ) -> np.ndarray:
        """Grad-CAM maps of ``layer`` for each sample of ``input_tensor``.

        The model runs once in eval mode on the whole batch (samples must not interact,
        which holds in eval mode). Modes, hooks and every parameter's ``.grad`` are left
        exactly as they were, so a call in the middle of training changes nothing.
        Saves, per sample, a figure with the input, the map and their overlay under
        ``gradcam/<id>_<name>/``, and all maps as one ``.npy``.

        Args:
            layer: the layer's ID or dotted name; its output must be ``(N, C, H, W)``, or
                become so through ``reshape_transform``. If the layer runs several times
                in one forward pass, its first call is used (with a warning).
            input_tensor: one batch for the model, as it takes it: a tensor ``(N, ...)``, a
                tuple of positional inputs or a dict of keyword inputs (batch first). For
                a ``(N, C, H, W)`` image tensor the maps are upsampled (bilinear) to
                ``(H, W)``; for other inputs they keep the layer's spatial size.
            target_class: ``None`` for each sample's top class; an int for the same class
                in every sample; a list of ints, one per sample. The score is the class's
                logit for ``(N, C)`` outputs, and its mean over all positions for
                segmentation outputs ``(N, C, H, W)`` (where the top class is the one with
                the highest mean score).
            reshape_transform: maps the layer's output (and its gradient) to
                ``(N, C, H, W)``, as in pytorch-grad-cam. Without one, a token output
                ``(N, T, D)`` whose ``T`` or ``T - 1`` is a perfect square is reshaped
                automatically to ``(N, D, h, w)``, the class token (first) dropped. A map
                that comes out zero everywhere warns and says why.

        Returns:
            ``(N, H, W)`` float32 maps, each min–max scaled to [0, 1] (all zeros where the
            map is constant).

        Raises:
            LayerSelectionError: an unknown ``layer``.
            BBDecoderTypeError: ``input_tensor`` is not a tensor, a bad ``target_class``
                type, or ``reshape_transform`` is not callable or returns no tensor.
            BBDecoderValueError: ``target_class`` out of range or of the wrong length,
                a layer output that is not ``(N, C, H, W)``, a layer that does not run or
                that the output does not depend on.
            ModelForwardError: the model raised.
        """
        chosen = self._layer(layer, "layer")
        inputs = as_call(input_tensor)
        n = batch_size(*inputs)
        if n is None and next(tensors(inputs), None) is None:
            raise BBDecoderTypeError(
                "input_tensor must be a torch.Tensor batch (N, ...), or the model's inputs holding tensors; "
                f"got {type(input_tensor).__name__}"
            )
        if n is None or n < 1:
            raise BBDecoderValueError(
                "input_tensor must hold a batch of at least one sample (a tensor (N, ...), or the model's inputs "
                f"with a batch dimension first); got {type(input_tensor).__name__} {input_tensor!r:.80}"
            )
        if reshape_transform is not None and not callable(reshape_transform):
            raise BBDecoderTypeError(
                f"reshape_transform must be callable (N, T, D) -> (N, C, H, W), got {type(reshape_transform).__name__}"
            )
        target = _check_target(target_class, n)
        image = input_tensor if isinstance(input_tensor, torch.Tensor) else None
        result = self._grad_cam_maps(chosen, inputs, n, image, target, reshape_transform)
        self._save_grad_cam(chosen, image, result, chosen_by_user=target_class is not None)
        return result.maps

    # ------------------------------------------------------------ compute
    def _grad_cam_maps(
        self,
        layer: Layer,
        inputs: tuple[tuple[Any, ...], dict[str, Any]],
        n: int,
        x: torch.Tensor | None,
        target: list[int] | int | None,
        reshape_transform: ReshapeTransform | None,
    ) -> GradCamResult:
        """Run the model, take the gradient of the targets' scores, and build the maps."""
        slot: dict[str, Any] = {"calls": 0}

        def keep(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            slot["calls"] += 1
            if slot["calls"] > 1:
                return None
            if not isinstance(output, torch.Tensor):
                slot["activation"] = first_tensor(output, argument="layer")
                return None
            if not output.is_floating_point():
                slot["activation"] = output
                return None
            # A leaf when nothing upstream needs gradients (a frozen stem), so d score / d A exists.
            source = output if output.requires_grad else output.detach().requires_grad_(True)
            slot["activation"] = source
            # The rest of the model gets a copy: an in-place op downstream (ReLU(inplace=True))
            # then changes the copy, and `source` keeps this layer's values and graph node.
            return source.clone()

        def after(seen: Layer, output: Any) -> Any:
            return keep(seen.module, (), output) if seen is layer else None

        output, _ = self._capture(inputs, [], "grad_cam", grad=True, keep_graph=True, after=after)
        where = f"layer={layer.id} ({layer.name!r})"
        if "activation" not in slot:
            raise BBDecoderValueError(f"{where} did not run during the model's forward pass")
        if slot["calls"] > 1:
            warnings.warn(
                f"grad_cam: {where} ran {slot['calls']} times in one forward pass; its first call is used",
                BBDecoderWarning,
                stacklevel=3,
            )
        activation: torch.Tensor = slot["activation"]
        if not activation.is_floating_point():
            raise BBDecoderValueError(f"{where} outputs {activation.dtype} values; Grad-CAM needs a floating output")
        logits = first_tensor(output, argument="model output")
        if logits.ndim < 2 or logits.shape[0] != n:
            raise BBDecoderValueError(
                f"grad_cam needs a model output (N, C) or (N, C, H, W) with N={n} samples; "
                f"got shape {tuple(logits.shape)}"
            )
        kind = "classification" if logits.ndim == 2 else "segmentation"
        class_scores = logits if logits.ndim == 2 else logits.flatten(2).mean(2)
        targets = _resolve_targets(target, class_scores.detach())
        scores = class_scores[torch.arange(n, device=class_scores.device), torch.tensor(targets, device=logits.device)]
        if not scores.requires_grad:
            raise BBDecoderValueError(f"the model's output does not depend on {where}: no gradient reaches it")
        # Samples are independent in eval mode, so one backward pass of the sum gives each
        # sample's own gradient. autograd.grad leaves every parameter's .grad untouched.
        (gradient,) = torch.autograd.grad(scores.sum(), activation, allow_unused=True)
        if gradient is None:
            raise BBDecoderValueError(f"the model's output does not depend on {where}: no gradient reaches it")
        values, gradient = activation.detach(), gradient.detach()
        tokens = reshape_transform is None and values.ndim == 3 and token_grid(values.shape[1]) is not None
        if reshape_transform is not None:
            values, gradient = _reshaped(reshape_transform, values), _reshaped(reshape_transform, gradient)
        elif tokens:
            values, gradient = tokens_to_grid(values), tokens_to_grid(gradient)
        if values.ndim != 4 or values.shape[0] != n:
            hint = "" if reshape_transform is not None else "; pass reshape_transform to map it to (N, C, H, W)"
            raise BBDecoderValueError(
                f"{where} outputs shape {tuple(values.shape)}; Grad-CAM needs (N, C, H, W) with N={n}{hint}"
            )
        weights = gradient.float().mean(dim=(2, 3), keepdim=True)
        cams = torch.relu((weights * values.float()).sum(dim=1, keepdim=True))
        _warn_if_zero(cams, gradient, where, tokens=tokens)
        size = tuple(x.shape[-2:]) if x is not None and x.ndim == 4 else tuple(cams.shape[-2:])
        if tuple(cams.shape[-2:]) != size:
            cams = F.interpolate(cams, size=size, mode="bilinear", align_corners=False)
        maps = _min_max(cams[:, 0]).cpu().numpy().astype(np.float32)
        return GradCamResult(maps=maps, targets=targets, scores=scores.detach().cpu().tolist(), kind=kind)

    # --------------------------------------------------------------- save
    def _save_grad_cam(
        self, layer: Layer, x: torch.Tensor | None, result: GradCamResult, *, chosen_by_user: bool
    ) -> None:
        from ..plots.gradcam import display_image, gradcam_figure

        call = layout.next_number(self.store, SECTION)

        def where(kind: str, **fields: Any) -> str:
            return layout.relative_path(SECTION, kind, layer=(layer.id, layer.name), call=call, **fields)

        base = {"call": call, "layer_id": layer.id, "layer_name": layer.name}
        self.store.write_npy(
            where("maps"),
            result.maps,
            section=SECTION,
            meta={**base, "sample": None, "kind": "maps", "target": list(result.targets)},
        )
        if not self.is_main_process:
            return
        samples = x.detach().cpu() if x is not None else None
        how = "chosen class" if chosen_by_user else "top class"
        score_name = "mean score" if result.kind == "segmentation" else "score"
        for i, (target, score) in enumerate(zip(result.targets, result.scores, strict=True)):
            image = display_image(samples[i].float().numpy()) if samples is not None and samples.ndim == 4 else None
            title = (
                f"Grad-CAM of layer {layer.id} {layer.name!r} · sample {i} · class {target} ({how}, "
                f"{score_name} {score:.3g})"
            )
            figure = gradcam_figure(image, result.maps[i], title=title)
            self.store.save_figure(
                figure,
                where("overlay", sample=i, target=target),
                section=SECTION,
                meta={**base, "sample": i, "kind": "overlay", "target": target},
            )
        self._say(
            f"grad_cam: layer {layer.id} {layer.name!r}, {len(result.targets)} sample(s), classes "
            f"{result.targets} → {layout.relative_path(SECTION, 'maps', layer=(layer.id, layer.name), call=call)}"
        )


def _check_target(target_class: Any, n: int) -> list[int] | int | None:
    """``target_class`` as ``None``, one int, or a list of ``n`` ints (checked before the forward pass)."""
    if isinstance(target_class, (torch.Tensor, np.ndarray)):
        if target_class.ndim > 1:
            raise BBDecoderValueError(
                f"target_class must be an int or a 1-D list of ints, got an array of shape {tuple(target_class.shape)}"
            )
        if isinstance(target_class, torch.Tensor):
            integer = not (target_class.is_floating_point() or target_class.is_complex()) and (
                target_class.dtype != torch.bool
            )
        else:
            integer = target_class.dtype.kind in "iu"
        if not integer:
            raise BBDecoderTypeError(f"target_class must hold integer class indices, got dtype {target_class.dtype}")
        target_class = target_class.tolist()
    if target_class is None:
        return None
    if _is_int(target_class):
        return int(target_class)
    if not isinstance(target_class, (list, tuple)):
        raise BBDecoderTypeError(
            f"target_class must be None, an int, or a list of ints (one per sample); "
            f"got {type(target_class).__name__} {target_class!r:.80}"
        )
    for i, item in enumerate(target_class):
        if not _is_int(item):
            raise BBDecoderTypeError(
                f"target_class[{i}] must be an int class index, got {type(item).__name__} {item!r:.40}"
            )
    if len(target_class) != n:
        raise BBDecoderValueError(
            f"target_class has {len(target_class)} entries but input_tensor has {n} samples; "
            f"give one class per sample, or a single int for all"
        )
    return [int(t) for t in target_class]


def _resolve_targets(target: list[int] | int | None, class_scores: torch.Tensor) -> list[int]:
    """One class index per sample, checked against the output's number of classes."""
    n, classes = class_scores.shape
    if target is None:
        return [int(c) for c in class_scores.argmax(dim=1).tolist()]
    items = [target] * n if isinstance(target, int) else target
    for i, value in enumerate(items):
        if not 0 <= value < classes:
            label = "target_class" if isinstance(target, int) else f"target_class[{i}]"
            raise BBDecoderValueError(
                f"{label}={value} is out of range: the model's output has {classes} classes, "
                f"so valid classes are 0..{classes - 1}"
            )
    return list(items)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def token_grid(tokens: int) -> tuple[int, int] | None:
    """``(skip, side)`` when ``tokens`` are a square grid, after ``skip`` leading class tokens (0 or 1)."""
    for skip in (1, 0):  # a class token first (ViT, DeiT, BEiT), then a plain grid (Swin stages, MLP-Mixer)
        side = math.isqrt(tokens - skip) if tokens > skip else 0
        if side > 1 and side * side == tokens - skip:
            return skip, side
    return None


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """``(N, T, D)`` transformer tokens as an ``(N, D, h, w)`` map, the class token (if any) dropped."""
    grid = token_grid(tokens.shape[1])
    if grid is None:
        raise BBDecoderValueError(f"{tokens.shape[1]} tokens are not a square grid (with or without a class token)")
    skip, side = grid
    return tokens[:, skip:].reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def _warn_if_zero(cams: torch.Tensor, gradient: torch.Tensor, where: str, *, tokens: bool) -> None:
    """Warn when maps are zero because no gradient reaches the layer's positions, and say why.

    A map that is zero because every weighted activation is negative is a legitimate Grad-CAM
    answer for that class (nothing there speaks for it) and is returned without a warning.
    """
    zero = (cams.flatten(1).amax(dim=1) <= 0).tolist()
    no_gradient = (gradient.flatten(1).abs().amax(dim=1) == 0).tolist()
    samples = [i for i, (z, g) in enumerate(zip(zero, no_gradient, strict=True)) if z and g]
    if not samples:
        return
    why = (
        "the class token alone reaches the head from this layer (e.g. a ViT's final norm, whose class token "
        "the classifier reads); pick an earlier block, e.g. the last encoder block's first norm"
        if tokens
        else "pick a layer whose positions the output depends on"
    )
    warnings.warn(
        f"grad_cam: the map of {where} is zero everywhere for sample(s) {samples[:8]}: no gradient reaches its "
        f"spatial positions; {why}",
        BBDecoderWarning,
        stacklevel=4,
    )


def _reshaped(transform: ReshapeTransform, tensor: torch.Tensor) -> torch.Tensor:
    result = transform(tensor)
    if not isinstance(result, torch.Tensor):
        raise BBDecoderTypeError(
            f"reshape_transform must return a tensor (N, C, H, W), returned {type(result).__name__}"
        )
    return result


def _min_max(cams: torch.Tensor) -> torch.Tensor:
    """Scale each ``(H, W)`` map to [0, 1]; a constant map becomes all zeros."""
    flat = cams.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values - flat.min(dim=1).values)[:, None, None]
    scaled = torch.where(span > 0, (cams - low) / span.clamp_min(torch.finfo(cams.dtype).tiny), torch.zeros_like(cams))
    return scaled.clamp(0.0, 1.0)
