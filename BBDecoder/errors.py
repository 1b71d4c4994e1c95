"""Exception and warning classes.

Each exception also inherits the built-in it resembles, so ``except ValueError`` and
``except BBDecoderError`` both work.
"""

from __future__ import annotations


class BBDecoderError(Exception):
    """Base class of every error raised by BBDecoder."""


class BBDecoderValueError(BBDecoderError, ValueError):
    """An argument has the right type but a value that cannot be used."""


class BBDecoderTypeError(BBDecoderError, TypeError):
    """An argument has the wrong type."""


class LayerSelectionError(BBDecoderValueError):
    """A layer selector (ID, dotted name or list of them) matches no layer."""


class SavePathError(BBDecoderValueError):
    """``save_path`` cannot be used as an output folder, or a path escapes it."""


class ModelForwardError(BBDecoderError, RuntimeError):
    """The user's model raised during a forward pass that BBDecoder ran for an analysis."""


class OutputWriteError(BBDecoderError, OSError):
    """A file under ``save_path`` (or a folder the user named) could not be written.

    Raised for every operating-system error of a write (disk full, permission denied, a
    read-only folder); ``errno`` and ``filename`` are those of the failed write, and the
    message names the path and the cause. Nothing partial is left under the final name.
    """

    def __str__(self) -> str:
        # OSError(errno, message, filename) keeps the message in strerror; a plain message is args[0]
        return str(self.strerror) if self.strerror is not None else super().__str__()


class VideoWriteError(BBDecoderError, RuntimeError):
    """A video could not be written or read back."""


class MissingDependencyError(BBDecoderError, ImportError):
    """An optional dependency needed by the called feature is not installed."""


class BBDecoderWarning(UserWarning):
    """Base class of BBDecoder's warnings (turned into errors in our own test suite)."""


class GradientAlertWarning(BBDecoderWarning):
    """A gradient became non-finite, vanished or exploded."""


class GraphvizMissingWarning(BBDecoderWarning):
    """Graphviz's ``dot`` program is missing, so only the graph's source was written."""


class WeightHistogramWarning(BBDecoderWarning):
    """A selected layer has no parameters (it gets no weight histogram), or a saved one cannot be read."""


class OutputDamagedWarning(BBDecoderWarning):
    """``manifest.json`` or ``run.json`` could not be read: it was kept aside under a new name and rebuilt."""


def require(module: str, feature: str, extra: str | None = None) -> object:
    """Import an optional dependency, or raise with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = f"BBDecoder[{extra}]" if extra else module
        raise MissingDependencyError(
            f"{feature} needs the optional package {module!r}: pip install {package}"
        ) from error
