"""Exporters: they subscribe to the analyses' events (:mod:`BBDecoder.core.events`).

Every exporter BBDecoder has is opened here, in :func:`open_exporters`: this is the one
place that says who listens to what.
"""

from __future__ import annotations

import os
from typing import Protocol

from ..core import distributed
from ..core.events import Events


class Exporter(Protocol):
    """What the analyzer needs of an exporter."""

    def subscribe(self, events: Events) -> None: ...

    def close(self) -> None: ...


def open_exporters(events: Events, *, tensorboard_dir: str | os.PathLike[str] | None = None) -> list[Exporter]:
    """The exporters the options ask for, subscribed to ``events`` (they write on rank 0 only).

    Raises:
        BBDecoderTypeError, BBDecoderValueError: a bad ``tensorboard_dir``.
        MissingDependencyError: ``tensorboard`` is not installed.
    """
    exporters: list[Exporter] = []
    if tensorboard_dir is not None:
        from .tensorboard import TensorBoardExport, check_log_dir

        check_log_dir(tensorboard_dir)  # on every rank: the same error everywhere
        if distributed.is_main_process():
            exporters.append(TensorBoardExport(tensorboard_dir))
    for exporter in exporters:
        exporter.subscribe(events)
    return exporters
