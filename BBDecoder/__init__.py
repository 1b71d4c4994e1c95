"""BBDecoder: see inside a PyTorch model while it trains."""

from ._version import __version__
from .analyzer import Master_analyzer
from .errors import (
    BBDecoderError,
    BBDecoderTypeError,
    BBDecoderValueError,
    BBDecoderWarning,
    GradientAlertWarning,
    GraphvizMissingWarning,
    LayerSelectionError,
    MissingDependencyError,
    ModelForwardError,
    OutputDamagedWarning,
    OutputWriteError,
    SavePathError,
    VideoWriteError,
    WeightHistogramWarning,
)

__all__ = [
    "BBDecoderError",
    "BBDecoderTypeError",
    "BBDecoderValueError",
    "BBDecoderWarning",
    "GradientAlertWarning",
    "GraphvizMissingWarning",
    "LayerSelectionError",
    "Master_analyzer",
    "MissingDependencyError",
    "ModelForwardError",
    "OutputDamagedWarning",
    "OutputWriteError",
    "SavePathError",
    "VideoWriteError",
    "WeightHistogramWarning",
    "__version__",
]
