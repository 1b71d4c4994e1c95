"""The records of ``visualize_weight_hist``: a tensor's histogram and statistics, a layer's call.

Plain data (numpy, no torch): the figures are drawn from them, in this process or in the
figure helper (:mod:`BBDecoder.plots.helper`), which does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SATURATION = 0.99
"""Saturation bands: the outer ``(1 - SATURATION) / 2`` of the finite range at each end.

For a range symmetric about 0 that is ``|w| >= SATURATION * max|w|``. Elements in a band
count as saturated only where they pile up (see :data:`PILE_UP` and
:func:`BBDecoder.analyses.weights.tensor_histogram`).
"""

PILE_UP = 4.0
"""A band piles up when it holds, besides the extreme element itself, more than ``PILE_UP``
times the elements an even spread over the tensor's range would put there (plus a margin
for chance clusters in small tensors; see :func:`BBDecoder.analyses.weights.tensor_histogram`)."""


@dataclass
class ParamHistogram:
    """Histogram and statistics of one parameter tensor, on the host.

    ``std`` is the population standard deviation; ``mean``, ``std``, ``min``, ``max``,
    ``sum`` and ``sum_squares`` are over the finite elements; ``zeros_fraction`` and
    ``saturation_fraction`` are fractions of all ``numel`` elements.
    """

    name: str
    shape: tuple[int, ...]
    edges: np.ndarray
    counts: np.ndarray
    numel: int
    finite: int
    mean: float
    std: float
    min: float
    max: float
    sum: float
    sum_squares: float
    zeros_fraction: float
    saturation_fraction: float
    tied: tuple[str, ...] = ()
    """The tensor's other full names in the model (tied weights: computed once, shown under each)."""

    @property
    def nonfinite(self) -> int:
        return self.numel - self.finite

    @property
    def abs_max(self) -> float:
        return max(abs(self.min), abs(self.max)) if self.finite else float("nan")


@dataclass
class LayerHistograms:
    """Every parameter tensor of one layer at one call."""

    layer_id: int
    layer_name: str
    layer_type: str
    call: int
    params: list[ParamHistogram] = field(default_factory=list)
