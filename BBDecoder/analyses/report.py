"""The HTML report of the run and the optional TensorBoard writer."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core import distributed
from ..errors import BBDecoderTypeError, require
from ._base import AnalyzerBase

# Scalars written per gradient row; TensorBoard groups tags by the text before the first "/".
_GRADIENT_SCALARS = ("l2", "l1", "mean_abs", "max_abs")


class ReportMixin(AnalyzerBase):
    """``build_report`` and the TensorBoard export (``tensorboard_dir=`` at construction).

    TensorBoard receives, from the events other analyses send (no work per training step):
    every recorded iteration's gradient statistics as scalars ``grad_<stat>/<ID> <layer>.<param>``
    when ``save_collected_grads`` runs, and at each ``visualize_weight_hist`` call the weight
    histograms it computed plus histograms of the same parameters' current gradients,
    computed on the device with ``torch.histc`` (only the bins reach the host).
    """

    _tensorboard: Any

    def _init_report(self, tensorboard_dir: str | os.PathLike[str] | None = None) -> None:
        """Open the TensorBoard writer when asked (rank 0 only).

        Raises:
            BBDecoderTypeError: ``tensorboard_dir`` is not a path.
            MissingDependencyError: ``tensorboard`` is not installed.
        """
        self._tensorboard = None
        if tensorboard_dir is None:
            return
        if not isinstance(tensorboard_dir, (str, os.PathLike)):
            raise BBDecoderTypeError(
                f"tensorboard_dir must be a str or os.PathLike, got {type(tensorboard_dir).__name__} "
                f"{tensorboard_dir!r:.80}"
            )
        module: Any = require("torch.utils.tensorboard", "tensorboard_dir=", extra="tensorboard")
        if distributed.is_main_process():
            self._tensorboard = module.SummaryWriter(log_dir=str(Path(tensorboard_dir).expanduser()))

    def build_report(self) -> Path:
        """Write ``save_path/report.html``: every analysis saved so far, on one static page.

        The page is self-contained (inline CSS/JS, files linked by relative path, no
        network) and is rebuilt from ``save_path``'s manifest on each call, so it also
        shows outputs of earlier processes on the same folder.

        Returns:
            The path of ``report.html`` (on ranks other than 0, where rank 0 writes it).
        """
        from ..report import REPORT_NAME, build_report

        if not self.is_main_process:  # only rank 0 writes; the others just learn where
            return self.store.root / REPORT_NAME
        path = build_report(self.store)
        self._say(f"report: {path}")
        return path

    def _close_report(self) -> None:
        """Flush and close the TensorBoard writer (idempotent)."""
        writer, self._tensorboard = getattr(self, "_tensorboard", None), None
        if writer is not None:
            writer.flush()
            writer.close()

    # ------------------------------------------------------------ listeners
    def _on_gradients_saved(self, epoch: int, rows: Sequence[dict[str, Any]]) -> None:
        """Write one scalar per statistic per parameter tensor per recorded iteration.

        The scalars of one iteration go out as one event (one ``Summary`` holding every
        tag), which is about ten times faster than one ``add_scalar`` call per value.
        """
        writer = getattr(self, "_tensorboard", None)
        if writer is None:
            return
        by_step: dict[int, list[tuple[str, float]]] = {}
        for row in rows:
            tag = _tag(row.get("layer_id"), row.get("layer_name"), row.get("param"))
            values = by_step.setdefault(int(row["iteration"]), [])
            for stat in _GRADIENT_SCALARS:
                value = _float(row.get(stat))
                if value is not None:  # a missing gradient (NaN) is left out, not drawn as a value
                    values.append((f"grad_{stat}/{tag}", value))
            if row.get("nonfinite"):
                values.append((f"grad_nonfinite/{tag}", float(row["nonfinite"])))
        _write_scalars(writer, by_step)
        writer.flush()

    def _on_weights_histogram(self, call: int, layers: Sequence[dict[str, Any]]) -> None:
        """Write the weight histograms of one call, and histograms of the current gradients."""
        writer = getattr(self, "_tensorboard", None)
        if writer is None:
            return
        for item in layers:
            tag = _tag(item.get("layer_id"), item.get("layer_name"), item.get("param"))
            _add_histogram(writer, f"weights/{tag}", item, call)
            grad = self._current_grad(item.get("layer_id"), item.get("param"))
            if grad is not None:
                counts = item.get("bucket_counts")
                bins = max(len(counts) if counts is not None else 0, 1)  # a list or a NumPy array
                summary = histogram_summary(grad, bins=min(bins, 100))
                if summary is not None:
                    _add_histogram(writer, f"gradients/{tag}", summary, call)
        writer.flush()

    def _current_grad(self, layer_id: Any, param: Any) -> torch.Tensor | None:
        if not isinstance(layer_id, int) or not isinstance(param, str) or not 0 <= layer_id < len(self.layers):
            return None
        try:
            parameter = self.layers[layer_id].module.get_parameter(param)
        except AttributeError:
            return None
        if parameter.grad is None or distributed.is_dtensor(parameter.grad):
            return None  # an FSDP2 shard: histograms of one shard would mislead; rank 0 alone cannot gather
        return parameter.grad.detach()


def histogram_summary(tensor: torch.Tensor, bins: int = 64) -> dict[str, Any] | None:
    """The fields of ``SummaryWriter.add_histogram_raw`` for ``tensor``, computed on its device.

    Only the ``bins`` counts and five scalars are copied to the host, in one transfer.
    Non-finite entries are left out of the histogram (TensorBoard cannot draw them).

    Returns:
        ``min, max, num, sum, sum_squares, bucket_limits, bucket_counts`` (``bucket_limits``
        are the right edges), or ``None`` when no entry is finite.
    """
    flat = tensor.detach().reshape(-1).to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    finite = flat[torch.isfinite(flat)]
    if finite.numel() == 0:
        return None
    low, high = finite.min(), finite.max()
    counts = torch.histc(finite, bins=bins, min=0, max=0) if bins > 1 else finite.new_tensor([finite.numel()])
    scalars = torch.stack([low, high, finite.sum(), (finite * finite).sum()]).to(torch.float64)
    host = torch.cat([scalars, counts.to(torch.float64)]).cpu().tolist()
    lo, hi, total, squares, counts_host = host[0], host[1], host[2], host[3], host[4:]
    if hi == lo:  # one value: a single bucket
        edges = [hi]
        counts_host = [float(sum(counts_host))]
    else:
        width = (hi - lo) / len(counts_host)
        edges = [lo + width * (i + 1) for i in range(len(counts_host))]
        edges[-1] = hi
    return {
        "min": lo,
        "max": hi,
        "num": int(finite.numel()),
        "sum": total,
        "sum_squares": squares,
        "bucket_limits": edges,
        "bucket_counts": counts_host,
    }


def _write_scalars(writer: Any, by_step: dict[int, list[tuple[str, float]]]) -> None:
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


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _tag(layer_id: Any, layer_name: Any, param: Any) -> str:
    """``"3 layer1.0.conv1.weight"``: TensorBoard tags keep the layer ID first, so they sort."""
    name = f"{layer_name}.{param}" if param not in (None, "") else str(layer_name)
    text = f"{layer_id} {name}" if layer_id is not None else name
    return text.replace("/", "_")


def _add_histogram(writer: Any, tag: str, data: dict[str, Any], step: int) -> None:
    counts = [float(c) for c in data["bucket_counts"]]
    limits = [float(x) for x in data["bucket_limits"]]
    if len(limits) == len(counts) + 1:  # given as edges: TensorBoard wants right edges
        limits = limits[1:]
    if not counts or len(limits) != len(counts) or not all(math.isfinite(x) for x in limits):
        return
    writer.add_histogram_raw(
        tag,
        min=float(data["min"]),
        max=float(data["max"]),
        num=int(data["num"]),
        sum=float(data["sum"]),
        sum_squares=float(data["sum_squares"]),
        bucket_limits=limits,
        bucket_counts=counts,
        global_step=int(step),
    )
