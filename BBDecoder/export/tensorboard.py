"""TensorBoard export: subscribes to the analyses' events and writes what they computed.

Nothing here touches the model or recomputes a statistic: gradient, activation-health and
update-ratio scalars come from the rows ``save_collected_grads`` saved (one event per
recorded iteration, no work per training step), histograms from the ones
``visualize_weight_hist`` computed on the device, for the weights and, alongside them, the
current gradients.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.events import Events, Subscription
from ..errors import BBDecoderTypeError, BBDecoderValueError, require

if TYPE_CHECKING:
    from ..analyses.weights import LayerHistograms, ParamHistogram
    from ..output.schema import ActivationRow, GradientRow, UpdateRow

# Scalars written per gradient row; TensorBoard groups tags by the text before the first "/".
GRADIENT_SCALARS = ("l2", "l1", "mean_abs", "max_abs")
ACTIVATION_SCALARS = ("mean", "std", "max_abs", "zero_frac", "dead_frac", "saturated_frac")
UPDATE_SCALARS = ("ratio", "update_norm")


class TensorBoardExport:
    """Writes BBDecoder's results into a TensorBoard log folder (rank 0 only).

    Args:
        log_dir: the TensorBoard folder (``tensorboard_dir=``); must not be empty.

    Raises:
        BBDecoderTypeError: ``log_dir`` is not a path.
        BBDecoderValueError: ``log_dir`` is empty.
        MissingDependencyError: ``tensorboard`` is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        check_log_dir(log_dir)
        module: Any = require("torch.utils.tensorboard", "tensorboard_dir=", extra="tensorboard")
        self.writer: Any = module.SummaryWriter(log_dir=str(Path(log_dir).expanduser()))
        self._subscriptions: list[Subscription] = []

    def subscribe(self, events: Events) -> None:
        """Listen to the events this exporter writes."""
        self._subscriptions += [
            events.subscribe("gradients_saved", self.on_gradients_saved),
            events.subscribe("weights_histogram", self.on_weights_histogram),
            events.subscribe("activations_saved", self.on_activations_saved),
            events.subscribe("updates_saved", self.on_updates_saved),
        ]

    def close(self) -> None:
        """Unsubscribe, flush and close the writer (idempotent)."""
        for subscription in self._subscriptions:
            subscription.remove()
        self._subscriptions.clear()
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.flush()
            writer.close()

    # ------------------------------------------------------------------ events
    def on_gradients_saved(self, epoch: int, rows: Sequence[GradientRow]) -> None:
        """``grad_<stat>/<ID name.param>`` per recorded iteration; ``grad_nonfinite`` where it is above 0.

        The scalars of one iteration go out as one event (one ``Summary`` holding every
        tag), about ten times faster than one ``add_scalar`` call per value. A missing
        gradient (NaN) is left out, not drawn as a value.
        """
        self._write_rows(rows, "grad", GRADIENT_SCALARS, step="iteration", param="param", when_positive=("nonfinite",))

    def on_activations_saved(self, epoch: int, rows: Sequence[ActivationRow]) -> None:
        """``act_<stat>/<ID name>`` per recorded forward pass (NaN: not run, or not bounded, is left out)."""
        self._write_rows(rows, "act", ACTIVATION_SCALARS, step="iteration", param=None)

    def on_updates_saved(self, epoch: int, rows: Sequence[UpdateRow]) -> None:
        """``update_ratio/<ID name.param>`` (‖Δw‖/‖w‖) and ``update_update_norm/…`` per optimizer step."""
        self._write_rows(rows, "update", UPDATE_SCALARS, step="step", param="param")

    def _write_rows(
        self,
        rows: Sequence[Any],
        prefix: str,
        stats: Sequence[str],
        *,
        step: str,
        param: str | None,
        when_positive: Sequence[str] = (),
    ) -> None:
        """``<prefix>_<stat>/<tag>`` of every finite ``stats`` value (and ``when_positive`` ones above 0), by step."""
        if self.writer is None:
            return
        by_step: dict[int, list[tuple[str, float]]] = {}
        for row in rows:
            tag = tag_of(row.layer_id, row.layer_name, getattr(row, param) if param else None)
            values = by_step.setdefault(int(getattr(row, step)), [])
            for stat in stats:
                value = getattr(row, stat)
                if math.isfinite(value):
                    values.append((f"{prefix}_{stat}/{tag}", float(value)))
            for stat in when_positive:
                value = getattr(row, stat)
                if math.isfinite(value) and value > 0:
                    values.append((f"{prefix}_{stat}/{tag}", float(value)))
        write_scalars(self.writer, by_step)
        self.writer.flush()

    def on_weights_histogram(
        self, call: int, weights: Sequence[LayerHistograms], grads: Sequence[LayerHistograms] = ()
    ) -> None:
        """The weight histograms of one call, and those of the gradients at that moment."""
        if self.writer is None:
            return
        for prefix, layers in (("weights", weights), ("gradients", grads)):
            for layer in layers:
                for param in layer.params:
                    tag = f"{prefix}/{tag_of(layer.layer_id, layer.layer_name, param.name)}"
                    add_histogram(self.writer, tag, param, call)
        self.writer.flush()


def check_log_dir(log_dir: object) -> None:
    """Raise unless ``log_dir`` names a folder (an empty name would mean the working directory).

    Raises:
        BBDecoderTypeError: ``log_dir`` is not a str or ``os.PathLike``.
        BBDecoderValueError: ``log_dir`` is empty.
    """
    if not isinstance(log_dir, (str, os.PathLike)):
        raise BBDecoderTypeError(
            f"tensorboard_dir must be a str or os.PathLike, got {type(log_dir).__name__} {log_dir!r:.80}"
        )
    if not os.fspath(log_dir).strip():
        raise BBDecoderValueError(
            f"tensorboard_dir={os.fspath(log_dir)!r} is empty; name a folder (e.g. 'runs/tb'), or leave it None"
        )


def tag_of(layer_id: Any, layer_name: Any, param: Any) -> str:
    """``"3 layer1.0.conv1.weight"``: TensorBoard tags keep the layer ID first, so they sort."""
    name = f"{layer_name}.{param}" if param not in (None, "") else str(layer_name)
    text = f"{layer_id} {name}" if layer_id is not None else name
    return text.replace("/", "_")


def write_scalars(writer: Any, by_step: dict[int, list[tuple[str, float]]]) -> None:
    """Write ``{step: [(tag, value), ...]}``, one event per step where the writer allows it."""
    file_writer = getattr(writer, "_get_file_writer", None)
    if file_writer is None:  # a SummaryWriter without the (private) batched path: one call per value
        for step, values in by_step.items():
            for tag, value in values:
                writer.add_scalar(tag, value, global_step=step)
        return
    from tensorboard.compat.proto.summary_pb2 import Summary

    events = file_writer()
    for step, values in by_step.items():
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in values])
        events.add_summary(summary, step)


def add_histogram(writer: Any, tag: str, histogram: ParamHistogram, step: int) -> None:
    """``add_histogram_raw`` from a histogram computed on the device (finite elements only)."""
    counts = [float(c) for c in histogram.counts]
    limits = [float(x) for x in histogram.edges[1:]]  # TensorBoard wants right edges
    if not histogram.finite or not counts or not all(math.isfinite(x) for x in limits):
        return
    writer.add_histogram_raw(
        tag,
        min=float(histogram.min),
        max=float(histogram.max),
        num=int(histogram.finite),
        sum=float(histogram.sum),
        sum_squares=float(histogram.sum_squares),
        bucket_limits=limits,
        bucket_counts=counts,
        global_step=int(step),
    )
