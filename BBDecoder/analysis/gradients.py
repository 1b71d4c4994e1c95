"""Per-layer gradient statistics (issue: gradient analysis)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BBDecoderTypeError, BBDecoderValueError
from ..layers import Selector
from ._base import AnalyzerBase


class GradientMixin(AnalyzerBase):
    """``backward_propagation`` and ``save_collected_grads``."""

    def _init_gradients(
        self,
        *,
        include_bias: bool = False,
        vanish_threshold: float = 1e-8,
        explode_threshold: float = 1e3,
    ) -> None:
        self.include_bias = include_bias
        self.vanish_threshold = vanish_threshold
        self.explode_threshold = explode_threshold

    def backward_propagation(
        self,
        loss: torch.Tensor,
        collect_grads: bool = False,
        layer_inds: Selector = None,
        *,
        scaler: Any = None,
        **backward_kwargs: Any,
    ) -> None:
        """Run ``loss.backward(**backward_kwargs)``; optionally record gradient statistics.

        Raises:
            BBDecoderTypeError: ``loss`` is not a tensor.
            BBDecoderValueError: ``loss`` does not require grad.
        """
        _check_loss(loss)
        loss.backward(**backward_kwargs)


def _check_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise BBDecoderTypeError(f"loss must be a torch.Tensor, got {type(loss).__name__} {loss!r}")
    if not loss.requires_grad:
        raise BBDecoderValueError(
            "loss does not require grad: it was computed without a graph (under torch.no_grad(), "
            "from detached tensors, or from a model whose parameters are all frozen), so there is "
            f"nothing to backpropagate; got loss={loss!r}"
        )
