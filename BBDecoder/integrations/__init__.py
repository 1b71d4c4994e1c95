"""Training-framework integrations, each imported only when asked for.

- :mod:`BBDecoder.integrations.lightning`: ``BBDecoderCallback`` for Lightning's ``Trainer``.
- :mod:`BBDecoder.integrations.transformers`: ``BBDecoderCallback`` for Hugging Face's ``Trainer``.
- accelerate and hand-written loops need no integration: call
  ``Master_analyzer.collect_grads()`` after ``accelerator.backward(loss)`` (``examples/accelerate_train.py``).

Importing this package imports neither framework. What both callbacks share lives here:
one analyzer over the model the framework trains, the numbering of collected iterations
(the framework's optimizer-step count) and the bookkeeping of what is still unsaved.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import BBDecoderTypeError, BBDecoderValueError

__all__: list[str] = []

# Constructor arguments of Master_analyzer that a callback sets itself.
_RESERVED = ("model", "save_path")


class _TrainingRun:
    """One :class:`~BBDecoder.Master_analyzer` over the model a framework trains.

    Every rank makes the same calls (the analyzer's store writes on rank 0 only, and a
    sharded model's saves are collectives), so nothing here asks for the rank.

    Args:
        save_path: the analyzer's output folder.
        layer_inds: layers whose gradient statistics are recorded (``None``: all).
        collect_every: record every k-th optimizer step (steps ``0, k, 2k…``).
        depth: the analyzer's layer-numbering depth.
        weight_hist: at each save, also save weight histograms: ``True`` of every layer
            with parameters, ``False`` of none, or of the layers a selector names.
        options: further ``Master_analyzer`` keywords (``verbose`` defaults to ``False``).
        owner: the callback's name, for error messages.

    Raises:
        BBDecoderTypeError: ``save_path`` is not a path, ``collect_every`` not an int.
        BBDecoderValueError: ``collect_every`` is below 1, or ``options`` holds ``model``/``save_path``.
    """

    def __init__(
        self,
        save_path: str | os.PathLike[str],
        *,
        layer_inds: Any,
        collect_every: int,
        depth: int,
        weight_hist: Any,
        options: dict[str, Any],
        owner: str,
    ) -> None:
        if not isinstance(save_path, (str, os.PathLike)):
            raise BBDecoderTypeError(f"{owner}: save_path must be a str or os.PathLike, got {type(save_path).__name__}")
        self.collect_every = _positive_int(collect_every, "collect_every", owner)
        reserved = sorted(set(options) & set(_RESERVED))
        if reserved:
            raise BBDecoderValueError(f"{owner}: {', '.join(reserved)} cannot be passed as a Master_analyzer option")
        self.save_path = save_path
        self.layer_inds = layer_inds
        self.depth = depth
        self.weight_hist = weight_hist
        self.options = {"verbose": False, **options}
        self.owner = owner
        self.analyzer: Any = None  # a Master_analyzer once attached
        self._weight_layers: list[int] = []
        self._unsaved = False  # some statistics were recorded since the last save

    # ------------------------------------------------------------- lifetime
    def attach(self, model: nn.Module) -> Any:
        """Wrap ``model`` in a new analyzer (closing any earlier one); check the layer selections."""
        from ..analyzer import Master_analyzer

        self.close()
        analyzer = Master_analyzer(model, self.save_path, depth=self.depth, **self.options)
        layers = analyzer.layers
        layers.resolve(self.layer_inds, "layer_inds", default_all=True)  # fail at the start, not mid-epoch
        if self.weight_hist is True or self.weight_hist is False:
            chosen = list(layers) if self.weight_hist else []
        else:
            chosen = layers.resolve(self.weight_hist, "weight_hist")
        self._weight_layers = [layer.id for layer in chosen if layer.parameter_count() > 0]
        self.analyzer = analyzer
        self._unsaved = False
        return analyzer

    def close(self) -> None:
        """Close the analyzer: every hook it holds is removed (idempotent)."""
        if self.analyzer is not None:
            self.analyzer.close()

    # ----------------------------------------------------------- per step
    def collect(self, step: int, scaler: Any = None) -> None:
        """Record the current ``.grad`` statistics as iteration ``step`` (the optimizer step).

        ``scaler``: the grads still carry its scale. Numbering by the framework's step keeps a
        run resumed from a checkpoint in line with the earlier process's files.
        """
        if self.analyzer is None:
            return
        self.analyzer.collect_grads(self.layer_inds, scaler=scaler, collect_every=self.collect_every, iteration=step)
        if step % self.collect_every == 0:
            self._unsaved = True

    # ------------------------------------------------------------- saving
    def save(self, epoch: int, *, weights: bool = True) -> list[Path]:
        """Save the statistics recorded since the last save as epoch ``epoch``, then the weight histograms."""
        if self.analyzer is None:
            return []
        paths: list[Path] = []
        if self._unsaved:
            self._unsaved = False
            paths += self.analyzer.save_collected_grads(epoch)
        if weights and self._weight_layers:
            paths += self.analyzer.visualize_weight_hist(self._weight_layers)
        return paths

    def finish(self, epoch: int) -> Path | None:
        """Save what is still unsaved (as ``epoch``), build the report, close the analyzer."""
        if self.analyzer is None:
            return None
        try:
            self.save(epoch, weights=False)
            return self.analyzer.build_report()
        finally:
            self.close()


def _positive_int(value: Any, name: str, owner: str) -> int:
    """``value`` as an int >= 1, or a ``BBDecoderTypeError``/``BBDecoderValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BBDecoderTypeError(f"{owner}: {name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise BBDecoderValueError(f"{owner}: {name} must be at least 1, got {name}={value}")
    return int(value)


def _grads_still_scaled(scaler: Any, optimizer: Any, *, unscaled_by_framework: bool) -> bool:
    """Whether ``optimizer``'s gradients still carry ``scaler``'s loss scale.

    Read from the scaler's own per-optimizer record (``unscale_`` marks it ``UNSCALED``
    until ``update``), so it holds whatever the framework did; ``unscaled_by_framework`` is
    the answer when the scaler keeps no such record.
    """
    if scaler is None or not scaler.is_enabled():
        return False
    states = getattr(scaler, "_per_optimizer_states", None)
    if not isinstance(states, dict):
        return not unscaled_by_framework
    state = states.get(id(optimizer))  # .get: a defaultdict would add an entry on []
    stage = state.get("stage") if isinstance(state, dict) else None
    return getattr(stage, "name", None) != "UNSCALED"
