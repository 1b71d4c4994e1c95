"""Lightning integration: gradient statistics, weight histograms and the report from a ``Callback``.

    from BBDecoder.integrations.lightning import BBDecoderCallback

    trainer = L.Trainer(max_epochs=5, callbacks=[BBDecoderCallback("runs/exp1")])
    trainer.fit(module, train_loader)

Where it hooks into Lightning's loop (read from ``lightning/pytorch/plugins/precision``):

- ``on_fit_start``: the ``LightningModule`` (already on its device, not yet DDP-wrapped)
  is wrapped in a :class:`~BBDecoder.Master_analyzer`; the model is not changed.
- ``on_before_optimizer_step``: once per optimizer step, after the backward pass of the
  last accumulated micro-batch (so with ``accumulate_grad_batches=k`` the accumulated
  gradient is recorded once per step) and *before* gradient clipping. With
  ``precision="16-mixed"`` Lightning has already run ``scaler.unscale_`` here, unless the
  optimizer unscales inside ``step()`` (fused Adam); the callback reads the scaler's
  state and passes it to ``collect_grads`` only when the gradients are still scaled.
  The recorded iteration is ``trainer.global_step`` at that moment (0 for the first step;
  ``collect_grads(iteration=...)``), so a run resumed from a checkpoint continues the
  earlier process's numbering.
- ``on_train_epoch_end``: the epoch's gradient files (``gradients/epoch_{ep:03d}_*``,
  ``ep = trainer.current_epoch``) and weight histograms of every layer with parameters.
- ``on_fit_end``: anything still unsaved is saved, ``report.html`` is built, the analyzer
  closed. ``on_exception`` closes it too.

Every rank makes the same calls; under DDP only rank 0 writes. Lightning's ``lightning``
package is used, or the older ``pytorch_lightning`` when only that one is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import require
from . import _grads_still_scaled, _TrainingRun

if TYPE_CHECKING:
    from ..core.layers import Selector


def _import_lightning() -> Any:
    """``lightning.pytorch``, or ``pytorch_lightning`` when only the older package is installed."""
    if importlib.util.find_spec("lightning") is None and importlib.util.find_spec("pytorch_lightning") is not None:
        return importlib.import_module("pytorch_lightning")
    require("lightning", "BBDecoder.integrations.lightning")
    return importlib.import_module("lightning.pytorch")


pl: Any = _import_lightning()

__all__ = ["BBDecoderCallback"]


class BBDecoderCallback(pl.Callback):  # type: ignore[misc]
    """Record per-layer gradient statistics at every optimizer step of ``Trainer.fit``.

    Args:
        save_path: the analyzer's output folder (the same folder continues a run).
        layer_inds: layers whose gradients are recorded: IDs, dotted names or a list;
            ``None``: every parameter of the module.
        collect_every: record every k-th optimizer step (global steps ``0, k, 2k…``).
        depth: the layer-numbering depth of the analyzer.
        weight_hist: at each epoch end, save weight histograms of every layer with
            parameters (``True``), of none (``False``), or of the layers a selector names.
        **analyzer_options: other ``Master_analyzer`` keywords (``include_bias``,
            ``tensorboard_dir``, ``input_size``…); ``verbose`` defaults to ``False``.

    Attributes:
        analyzer: the ``Master_analyzer`` of the current fit (``None`` before it), for
            other analyses (``callback.analyzer.get_sim(...)``).

    Raises:
        BBDecoderTypeError, BBDecoderValueError: a bad ``collect_every`` or option (a bad layer
            selection raises ``LayerSelectionError`` when fitting starts).
    """

    def __init__(
        self,
        save_path: str | os.PathLike[str],
        *,
        layer_inds: Selector = None,
        collect_every: int = 1,
        depth: int = 1,
        weight_hist: bool | Selector = True,
        **analyzer_options: Any,
    ) -> None:
        super().__init__()
        self._run = _TrainingRun(
            save_path,
            layer_inds=layer_inds,
            collect_every=collect_every,
            depth=depth,
            weight_hist=weight_hist,
            options=analyzer_options,
            owner="BBDecoderCallback",
        )
        self._epoch = 0

    @property
    def analyzer(self) -> Any:
        """The ``Master_analyzer`` of the current (or last) fit, ``None`` before the first."""
        return self._run.analyzer

    @property
    def state_key(self) -> str:
        return self._generate_state_key(save_path=str(Path(self._run.save_path)))

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self._run.attach(pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch = trainer.current_epoch

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # Lightning unscales before this hook unless the optimizer unscales in step() (fused Adam)
        handles = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        still_scaled = _grads_still_scaled(scaler, optimizer, unscaled_by_framework=not handles)
        self._run.collect(trainer.global_step, scaler if still_scaled else None)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._run.save(trainer.current_epoch)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._run.finish(self._epoch)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._run.close()
