"""Checks of user input, shared by every entry point: each error names the argument and the value.

Sizes that would hang or allocate absurdly are bounded here (:data:`LIMITS`), in one place.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import BBDecoderTypeError, BBDecoderValueError
from .tree import tensors

LIMITS = {
    "bins": 10_000,  # bins per weight histogram
    "repeats": 10_000,  # timed forward passes of layer_costs
    "warmup": 1_000,  # untimed passes before them
    "ep": 10**9,  # epoch numbers (file names stay ordinary)
    "input_elements": 1 << 30,  # elements of the zeros built from input_size (4 GiB of float32)
}
"""Upper bounds of sizes a user passes."""


def flag(value: Any, name: str) -> bool:
    """``value`` as a bool; only ``True``/``False`` (and NumPy's) are accepted.

    Raises:
        BBDecoderTypeError: anything else (``''``, ``'abc'``, ``1``, a tensor).
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise BBDecoderTypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.80}")


def integer(value: Any, name: str, *, low: int, high: int | None = None, meaning: str = "") -> int:
    """``value`` as an int in ``[low, high]`` (``high`` defaults to ``LIMITS[name]`` when there is one).

    Raises:
        BBDecoderTypeError: not an integer (a bool, float, str…).
        BBDecoderValueError: out of range.
    """
    what = f" ({meaning})" if meaning else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        kind = "a positive int" if low >= 1 else "an int"
        raise BBDecoderTypeError(f"{name} must be {kind}{what}, got {type(value).__name__} {value!r:.80}")
    top = LIMITS.get(name) if high is None else high
    if value < low or (top is not None and value > top):
        bounds = f"at least {low}" if top is None else f"from {low} to {top:,}"
        raise BBDecoderValueError(f"{name} must be {bounds}{what}, got {name}={value!r}")
    return int(value)


def real(value: Any, name: str, *, low: float | None = None) -> float:
    """``value`` as a finite float (``>= low`` when given).

    Raises:
        BBDecoderTypeError: not a real number.
        BBDecoderValueError: not finite, or below ``low``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise BBDecoderTypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.80}")
    number = float(value)
    if not math.isfinite(number) or (low is not None and number < low):
        limit = f" >= {low:g}" if low is not None else ""
        raise BBDecoderValueError(f"{name} must be a finite number{limit}, got {name}={value!r}")
    return number


def model_inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any], argument: str) -> None:
    """Inputs an analysis runs the model on: real data, not meta tensors.

    Raises:
        BBDecoderValueError: a tensor on the ``meta`` device (it has no values to run on).
    """
    for tensor in tensors((args, dict(kwargs))):
        if tensor.is_meta:
            raise BBDecoderValueError(
                f"{argument} holds a tensor on the 'meta' device (shape {tuple(tensor.shape)}), which has no "
                "values to run the model on; pass a real tensor (e.g. torch.zeros(shape))"
            )


def batch_not_empty(tensor: torch.Tensor, argument: str) -> None:
    """Raise when a batch has no sample (nothing to average over)."""
    if tensor.ndim >= 1 and tensor.shape[0] == 0:
        raise BBDecoderValueError(
            f"{argument} is an empty batch (shape {tuple(tensor.shape)}); give at least one sample"
        )
