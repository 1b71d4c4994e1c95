"""BBDecoder: see inside a PyTorch model while it trains."""

from ._version import __version__
from .analyses.activations import ActivationAlertWarning
from .analyses.updates import UpdateAlertWarning, UpdateWatch
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
from .report.compare import compare_runs

__all__ = [
    "ActivationAlertWarning",
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
    "UpdateAlertWarning",
    "UpdateWatch",
    "VideoWriteError",
    "WeightHistogramWarning",
    "__version__",
    "compare_runs",
]
