"""What every analysis mixin may rely on from the analyzer that hosts it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core import distributed
from ..core.hooks import HookRegistry
from ..core.layers import Layer, LayerTable, Selector
from ..core.model import eval_mode, model_device, to_device
from ..errors import ModelForwardError
from ..output.store import Store

logger = logging.getLogger("BBDecoder")


class AnalyzerBase:
    """State and helpers shared by the analysis mixins.

    Attributes:
        model: the object the user passed (possibly DDP- or compile-wrapped).
        inner: the user's own module inside any wrapper; layers and hooks live here.
        layers: the numbered layer table of ``inner``.
        hooks: the registry that owns every hook handle.
        store: the output folder; the only writer of files.
        verbose: whether to print tables and progress.
    """

    model: nn.Module
    inner: nn.Module
    layers: LayerTable
    hooks: HookRegistry
    store: Store
    verbose: bool

    # ------------------------------------------------------------ selectors
    def _select(self, selector: Selector, argument: str = "layer_inds", *, default_all: bool = False) -> list[Layer]:
        return self.layers.resolve(selector, argument, default_all=default_all)

    def _layer(self, selector: int | str, argument: str = "layer") -> Layer:
        if isinstance(selector, (list, tuple)):
            if len(selector) != 1:
                return self.layers.one(selector, argument)  # raises the type error
            selector = selector[0]
        return self.layers.one(selector, argument)

    @property
    def device(self) -> torch.device:
        return model_device(self.inner)

    @property
    def is_main_process(self) -> bool:
        return distributed.is_main_process()

    def _say(self, text: str) -> None:
        """Print ``text`` when verbose, on rank 0 only."""
        if self.verbose and self.is_main_process:
            print(text)

    def _notify(self, event: str, **data: Any) -> None:
        """Tell other analyses that something happened (``_on_<event>(**data)`` if defined).

        Events: ``gradients_saved`` (after ``save_collected_grads``),
        ``weights_histogram`` (after ``visualize_weight_hist``). The TensorBoard writer
        listens to these, so analyses never import each other.
        """
        listener = getattr(self, f"_on_{event}", None)
        if listener is not None:
            listener(**data)

    # -------------------------------------------------------------- forward
    def _capture(
        self,
        x: Any,
        layers: Sequence[Layer],
        call: str,
        *,
        grad: bool = False,
        keep_graph: bool = False,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> tuple[Any, dict[int, Any]]:
        """Run ``x`` through the model in eval mode and capture ``layers``' outputs.

        Hooks exist only during the call; the previous train/eval flag of every module is
        restored. With ``grad`` the pass records a graph (for Grad-CAM); otherwise it runs
        under ``torch.no_grad()``. Outputs are detached unless ``keep_graph``.

        Returns:
            ``(model_output, {layer_id: layer_output})``.

        Raises:
            ModelForwardError: the model raised; says which call and layer were running.
        """
        captured: dict[int, Any] = {}
        running: list[Layer] = []

        def enter(layer: Layer) -> Any:
            def hook(_module: nn.Module, _inputs: Any) -> None:
                running.append(layer)

            return hook

        def leave(layer: Layer, wanted: bool) -> Any:
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                if running and running[-1] is layer:
                    running.pop()
                if wanted and layer.id not in captured:
                    captured[layer.id] = output if keep_graph else _detach(output)

            return hook

        wanted_ids = {layer.id for layer in layers}
        x = to_device(x, self.device)
        with self.hooks.session() as hooks, eval_mode(self.inner), torch.set_grad_enabled(grad):
            for layer in self.layers:
                if layer.module is self.inner:
                    continue
                hooks.forward_pre(layer.module, enter(layer))
                hooks.forward(layer.module, leave(layer, layer.id in wanted_ids))
            if any(layer.module is self.inner for layer in layers):
                hooks.forward(self.inner, leave(layers[0], True))
            try:
                output = self.inner(x, *args, **(kwargs or {}))
            except Exception as error:
                where = f" inside layer {running[-1].id} {running[-1].name!r}" if running else ""
                raise ModelForwardError(
                    f"{call}: the model's forward pass raised {type(error).__name__}{where}: {error}"
                ) from error
        return output, captured


def _detach(output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        return output.detach()
    if isinstance(output, dict):
        return {k: _detach(v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(_detach(v) for v in output) if not hasattr(output, "_fields") else output
    return output
