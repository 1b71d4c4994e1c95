"""Hugging Face ``transformers`` integration: a ``TrainerCallback`` for ``Trainer``.

    from BBDecoder.integrations.transformers import BBDecoderCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[BBDecoderCallback("runs/exp1")])
    trainer.train()

Where it hooks into ``Trainer``'s loop (read from ``Trainer._inner_training_loop``):

- ``on_train_begin``: the ``model`` of the callback's keywords (``Trainer.model``, not the
  DDP wrapper) is wrapped in a :class:`~BBDecoder.Master_analyzer`; the model is not
  changed. The iteration numbering starts at ``state.global_step`` (non-zero when
  resuming from a checkpoint, so the earlier numbering continues).
- ``on_pre_optimizer_step``: once per optimizer step, after the backward pass of the last
  accumulated micro-batch (``gradient_accumulation_steps=k`` records the accumulated
  gradient once per step) and *after* ``Trainer`` clipped the gradients to
  ``max_grad_norm`` (default 1.0): the statistics are those of the gradients the
  optimizer applies. No event comes between the backward pass and the clipping; set
  ``max_grad_norm=0`` to record unclipped gradients (``Trainer`` logs the pre-clipping
  total norm as ``grad_norm``). With ``fp16=True`` the clipping (or, without it, the norm
  computation) has already unscaled the gradients in transformers 5; older releases
  leave them scaled when ``max_grad_norm=0``. The callback reads the scaler's state and
  passes it on only while they are still scaled. The recorded iteration is
  ``state.global_step`` at that moment (0 for the first step; ``Trainer`` logs that step
  as step 1 and names its checkpoints after the steps taken).
- ``on_epoch_end``: the epoch's gradient files (``gradients/epoch_{ep:03d}_*``, ``ep`` the
  0-based epoch) and weight histograms of every layer with parameters.
- with ``save_every=k`` instead, ``on_step_end`` saves every k optimizer steps (for
  step-based runs, ``max_steps``): the file number ``ep`` is then the 0-based index of the
  k-step period, ``(global_step - 1) // k``.
- ``on_train_end``: anything still unsaved is saved, ``report.html`` is built, the
  analyzer closed.

Every rank makes the same calls; under DDP only rank 0 writes.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BBDecoderTypeError, MissingDependencyError, require
from . import _grads_still_scaled, _positive_int, _TrainingRun

if TYPE_CHECKING:
    from ..core.layers import Selector

_transformers: Any = require("transformers", "BBDecoder.integrations.transformers")
if not hasattr(_transformers.TrainerCallback, "on_pre_optimizer_step"):  # added in transformers 4.45
    raise MissingDependencyError(
        "BBDecoder.integrations.transformers needs transformers>=4.45 (the on_pre_optimizer_step event), "
        f"found {_transformers.__version__}: pip install -U transformers"
    )

__all__ = ["BBDecoderCallback"]


class BBDecoderCallback(_transformers.TrainerCallback):  # type: ignore[misc]
    """Record per-layer gradient statistics at every optimizer step of ``Trainer.train``.

    Args:
        save_path: the analyzer's output folder (the same folder continues a run).
        layer_inds: layers whose gradients are recorded: IDs, dotted names or a list;
            ``None``: every parameter of the model.
        collect_every: record every k-th optimizer step (global steps ``0, k, 2k…``).
        depth: the layer-numbering depth of the analyzer.
        save_every: save every this many optimizer steps instead of at each epoch end.
        weight_hist: at each save, save weight histograms of every layer with parameters
            (``True``), of none (``False``), or of the layers a selector names.
        **analyzer_options: other ``Master_analyzer`` keywords (``include_bias``,
            ``tensorboard_dir``…); ``verbose`` defaults to ``False``.

    Attributes:
        analyzer: the ``Master_analyzer`` of the current ``train()`` (``None`` before it).

    Raises:
        BBDecoderTypeError, BBDecoderValueError: a bad ``collect_every``, ``save_every`` or option
            (a bad layer selection raises ``LayerSelectionError`` when training starts).
    """

    def __init__(
        self,
        save_path: str | os.PathLike[str],
        *,
        layer_inds: Selector = None,
        collect_every: int = 1,
        depth: int = 1,
        save_every: int | None = None,
        weight_hist: bool | Selector = True,
        **analyzer_options: Any,
    ) -> None:
        owner = "BBDecoderCallback"
        self.save_every = None if save_every is None else _positive_int(save_every, "save_every", owner)
        self._run = _TrainingRun(
            save_path,
            layer_inds=layer_inds,
            collect_every=collect_every,
            depth=depth,
            weight_hist=weight_hist,
            options=analyzer_options,
            owner=owner,
        )
        self._epoch = 0

    @property
    def analyzer(self) -> Any:
        """The ``Master_analyzer`` of the current (or last) ``train()``, ``None`` before the first."""
        return self._run.analyzer

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise BBDecoderTypeError("BBDecoderCallback.on_train_begin: Trainer passed no model= to its callbacks")
        self._run.attach(model)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # state.epoch is the fractional epoch count so far: k at the start of epoch k (or
        # k.f when resumed in the middle of it)
        self._epoch = math.floor((state.epoch or 0.0) + 1e-9)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds the GradScaler
        inner = optimizer
        while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
            inner = inner.optimizer  # the scaler keys its unscale_ record by the torch optimizer
        # Trainer clips (or takes the norm) right before this event, which unscales first
        still_scaled = _grads_still_scaled(scaler, inner, unscaled_by_framework=True)
        self._run.collect(state.global_step, scaler if still_scaled else None)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.save_every is not None and state.global_step % self.save_every == 0:
            self._run.save(self._period(state.global_step))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.save_every is None:
            self._run.save(self._epoch)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._run.finish(self._epoch if self.save_every is None else self._period(state.global_step))

    def _period(self, global_step: int) -> int:
        """The 0-based ``save_every``-step period that holds optimizer step ``global_step - 1``."""
        return max(global_step - 1, 0) // (self.save_every or 1)
