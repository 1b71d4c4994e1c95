"""The one hooked forward pass: capture, timing, Grad-CAM and activation statistics all run here.

:func:`hooked_forward` registers, for the duration of a ``with`` block only, a pre- and a
post-forward hook on every numbered layer: they keep track of which layer is running (so
an error in the user's model says "inside layer 7 'layer2.1'"), capture the outputs of the
requested layers, and call the caller's ``before(layer)`` / ``after(layer, output)``
callbacks (``after`` may return a replacement output, as Grad-CAM does). The block may run
the model several times (timing repeats). Every hook is removed and every module's
train/eval flag restored when the block ends, whatever happens inside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ModelForwardError
from . import checks
from .hooks import HookRegistry
from .layers import Layer
from .model import eval_mode
from .tree import detach, to_device

Before = Callable[[Layer], None]
After = Callable[[Layer, Any], Any]


class HookedRun:
    """Runs the model with the hooks of one :func:`hooked_forward` block.

    Attributes:
        captured: ``{layer_id: output}`` of the requested layers in the last run (first
            call of each layer; detached unless ``keep_graph``).
    """

    def __init__(self, model: nn.Module, call: str, device: torch.device) -> None:
        self.model = model
        self.call = call
        self.device = device
        self.captured: dict[int, Any] = {}
        self.running: list[Layer] = []

    def __call__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None = None) -> Any:
        """``model(*args, **kwargs)`` with the inputs moved to the model's device.

        Raises:
            ModelForwardError: the model raised; says which call and layer were running.
        """
        self.captured.clear()
        self.running.clear()
        checks.model_inputs(tuple(args), dict(kwargs or {}), f"{self.call}'s input")
        args = to_device(tuple(args), self.device)
        kwargs = to_device(dict(kwargs or {}), self.device)
        try:
            return self.model(*args, **kwargs)
        except Exception as error:
            where = f" inside layer {self.running[-1].id} {self.running[-1].name!r}" if self.running else ""
            raise ModelForwardError(
                f"{self.call}: the model's forward pass raised {type(error).__name__}{where}: {error}"
            ) from error


@contextlib.contextmanager
def hooked_forward(
    model: nn.Module,
    layers: Sequence[Layer],
    registry: HookRegistry,
    call: str,
    *,
    device: torch.device,
    capture: Sequence[Layer] = (),
    keep_graph: bool = False,
    before: Before | None = None,
    after: After | None = None,
    evaluate: bool = True,
) -> Iterator[HookedRun]:
    """Hooks on ``layers`` for one block; yields the runner.

    Args:
        model: the user's module (the inner one, inside any DDP/compile wrapper).
        layers: every numbered layer (their hooks track which one is running).
        registry: the analyzer's hook registry; the hooks live in one of its sessions.
        call: the public method's name, for error messages.
        device: where inputs are moved.
        capture: layers whose outputs are kept in ``runner.captured``.
        keep_graph: keep captured outputs attached to the autograd graph.
        before: called as a layer starts.
        after: called with a layer's output as it ends; a non-``None`` return replaces it.
        evaluate: run in eval mode (every module's flag is restored afterwards); ``False``
            keeps the modes the user set (a recorded training step).
    """
    runner = HookedRun(model, call, device)
    wanted = {layer.id for layer in capture}

    def enter(layer: Layer) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any) -> None:
            runner.running.append(layer)
            if before is not None:
                before(layer)

        return hook

    def leave(layer: Layer) -> Callable[..., Any]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
            if runner.running and runner.running[-1] is layer:
                runner.running.pop()
            replaced = after(layer, output) if after is not None else None
            if layer.id in wanted and layer.id not in runner.captured:
                kept = output if replaced is None else replaced
                runner.captured[layer.id] = kept if keep_graph else detach(kept)
            return replaced

        return hook

    modes = eval_mode(model) if evaluate else contextlib.nullcontext()
    with registry.session() as hooks, modes:
        for layer in layers:
            hooks.forward_pre(layer.module, enter(layer))
            hooks.forward(layer.module, leave(layer))
        yield runner
