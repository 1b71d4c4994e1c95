"""The gradient alert policy: which tensors went non-finite, vanished or exploded in an epoch.

Alerts are computed from :class:`~BBDecoder.analyses.gradients.epoch.EpochData` alone (no
state is changed here: the caller commits it once the epoch's files are written), and are
reported to the console as one aggregated warning per save, naming the counts and the
worst few; the full list goes to the epoch's ``alerts.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ...output.schema import Alert
from .epoch import ColumnInfo, EpochData


@dataclass(frozen=True)
class Thresholds:
    """``mean |g|`` below ``vanish`` on average over an epoch vanishes; above ``explode`` at any step explodes."""

    vanish: float
    explode: float


def _where(column: ColumnInfo) -> str:
    return f"layer {column.layer_id} {column.layer_name!r}, parameter {column.param!r}"


def find_alerts(
    data: EpochData, thresholds: Thresholds, first_nonfinite: Mapping[int, int]
) -> tuple[list[Alert], dict[int, int]]:
    """The epoch's alerts, and the first non-finite iteration of each tensor that newly went non-finite.

    Args:
        data: the epoch.
        thresholds: the vanishing/exploding limits on mean |g|.
        first_nonfinite: ``{column index: iteration}`` of tensors already reported
            non-finite in earlier epochs (they are not reported again).

    Returns:
        ``(alerts, new_first_nonfinite)``; steps a GradScaler skips are not counted.
    """
    alerts: list[Alert] = []
    fresh: dict[int, int] = {}
    mean_abs = data.mean_abs
    present = data.present
    counted = ~data.skipped[:, None]
    with np.errstate(invalid="ignore"):
        finite = present & (data.values[:, :, 3] == 0) & counted
        nonfinite = data.nonfinite_rows & counted
    for j, column in enumerate(data.columns):
        where = (column.layer_id, column.layer_name, column.param)
        if nonfinite[:, j].any() and column.index not in first_nonfinite:
            row = int(np.argmax(nonfinite[:, j]))
            iteration = int(data.iterations[row])
            fresh[column.index] = iteration
            count = int(data.values[row, j, 3])
            alerts.append(
                Alert(
                    data.epoch,
                    "nonfinite",
                    *where,
                    iteration,
                    float(count),
                    f"{_where(column)}: the gradient holds NaN/Inf for the first time at iteration "
                    f"{iteration} ({count} non-finite entries)",
                )
            )
        if not finite[:, j].any():
            continue
        average = float(mean_abs[finite[:, j], j].mean())
        if average < thresholds.vanish:
            row = int(np.argmax(finite[:, j] & (mean_abs[:, j] < thresholds.vanish)))
            alerts.append(
                Alert(
                    data.epoch,
                    "vanishing",
                    *where,
                    int(data.iterations[row]),
                    average,
                    f"{_where(column)}: mean |grad| averages {average:.3g} over epoch {data.epoch}, below "
                    f"vanish_threshold={thresholds.vanish:g}",
                )
            )
        high = finite[:, j] & (mean_abs[:, j] > thresholds.explode)
        if high.any():
            row = int(np.argmax(high))
            peak = float(mean_abs[high, j].max())
            alerts.append(
                Alert(
                    data.epoch,
                    "exploding",
                    *where,
                    int(data.iterations[row]),
                    peak,
                    f"{_where(column)}: mean |grad| exceeds explode_threshold={thresholds.explode:g} "
                    f"from iteration {int(data.iterations[row])} (peak {peak:.3g})",
                )
            )
    return alerts, fresh


TITLES = {"nonfinite": "non-finite", "vanishing": "vanishing", "exploding": "exploding"}


def severity(alert: Alert) -> tuple[int, float]:
    """Sort key, worst first: non-finite by iteration, exploding by peak, vanishing by smallness."""
    if alert.kind == "nonfinite":
        return 0, float(alert.iteration)
    if alert.kind == "exploding":
        return 1, -alert.value
    return 2, alert.value
