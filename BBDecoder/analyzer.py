"""``Master_analyzer``: wraps a model, numbers its layers, and hosts every analysis."""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .analyses.activations import ActivationMixin
from .analyses.cost import CostMixin
from .analyses.features import FeatureMixin
from .analyses.gradcam import GradCamMixin
from .analyses.gradients import GradientMixin
from .analyses.similarity import SimilarityMixin
from .analyses.updates import UpdateMixin
from .analyses.weights import WeightMixin
from .core import checks, distributed
from .core.events import Events
from .core.hooks import HookRegistry
from .core.layers import LayerTable, Selector, count_parameters, unwrap_model
from .core.model import input_spec, validate_input_size
from .core.tree import CallSpec, as_call, shape_of, tensors
from .errors import BBDecoderTypeError, BBDecoderValueError, BBDecoderWarning, ModelForwardError
from .export import open_exporters
from .graph import draw_architecture
from .output.store import RUN_NAME, Store, now_iso
from .summary import format_table


class Master_analyzer(
    GradientMixin,
    ActivationMixin,
    UpdateMixin,
    WeightMixin,
    SimilarityMixin,
    FeatureMixin,
    GradCamMixin,
    CostMixin,
):
    """Wrap ``model`` for analysis without changing it.

    The model object, its ``state_dict`` keys, outputs and gradients stay exactly as they
    were; hooks exist only during the analysis calls that need them.

    Args:
        model: the ``nn.Module`` to analyse; DDP/DataParallel and ``torch.compile``
            wrappers are accepted and their inner module is numbered.
        save_path: folder for every output; created if missing.
        input_size: shape of one input batch, e.g. ``[1, 3, 32, 32]`` (or a list of
            shapes), used for output shapes in the summary and for the architecture graph.
        example_input: a real batch instead of ``input_size``, for models whose input is
            not a float image: a tensor, a tuple of positional inputs, a dict of keyword
            inputs (a tokenizer's output), or a list (one positional input, e.g. a
            detector's list of images). Only its shapes and dtypes are kept.
        input_dtype: dtype of the zeros built from ``input_size`` (``torch.long`` for
            token IDs); default ``torch.float32``.
        depth: number modules down to this depth (1: the top-level children).
        verbose: print the summary at construction and tables after analysis calls.
        include_bias: also record gradient statistics of biases.
        vanish_threshold: mean |grad| below this is reported as vanishing.
        explode_threshold: mean |grad| above this is reported as exploding.
        dead_threshold: activation health: a layer with at least this fraction of dead units
            at an epoch's last recorded pass is reported (default 0.5).
        saturated_threshold: activation health: a bounded layer whose saturated fraction
            averages at least this over an epoch is reported (default 0.25).
        tensorboard_dir: also log to TensorBoard in this folder (needs ``tensorboard``).

    Raises:
        BBDecoderTypeError: ``model`` is not an ``nn.Module``.
        SavePathError: ``save_path`` is a file or cannot be created.
        LayerSelectionError, BBDecoderValueError: a bad ``depth`` or ``input_size``.
    """

    def __init__(
        self,
        model: nn.Module,
        save_path: str | os.PathLike[str],
        input_size: list[int] | list[list[int]] | None = None,
        *,
        example_input: Any = None,
        input_dtype: torch.dtype | None = None,
        depth: int = 1,
        verbose: bool = True,
        include_bias: bool = False,
        vanish_threshold: float = 1e-8,
        explode_threshold: float = 1e3,
        dead_threshold: float = 0.5,
        saturated_threshold: float = 0.25,
        tensorboard_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise BBDecoderTypeError(f"model must be a torch.nn.Module, got {type(model).__name__} {model!r:.80}")
        if not isinstance(save_path, (str, os.PathLike)):
            raise BBDecoderTypeError(f"save_path must be a str or os.PathLike, got {type(save_path).__name__}")
        self.model = model
        self.inner = unwrap_model(model)
        self.input_size = validate_input_size(input_size)
        self._call_spec = _call_spec(self.input_size, input_dtype, example_input)
        self.layers = LayerTable(self.inner, depth)
        self.verbose = checks.flag(verbose, "verbose")
        self.store = Store(save_path)
        self.hooks = HookRegistry()
        self._output_shapes: dict[int, Any] = {}
        self._shapes_failed = False  # the model rejected the dummy input once: do not rerun it every call
        self._printed_table = ""  # the last layer table printed (verbose): the same one is printed once
        self._init_gradients(
            include_bias=include_bias,
            vanish_threshold=vanish_threshold,
            explode_threshold=explode_threshold,
        )
        self._init_activations(dead_threshold=dead_threshold, saturated_threshold=saturated_threshold)
        self._init_updates()
        self._init_weights()
        self.events = Events()
        self._exporters = open_exporters(self.events, tensorboard_dir=tensorboard_dir)
        self._write_run_record()
        self._lazy_pending = self._totals()["params"] is None
        if self._call_spec is not None:
            self._fill_output_shapes("Master_analyzer")
        if self.verbose:
            self.summary()
        if self._call_spec is not None:
            self.visualize_architecture()

    # ------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Remove every hook BBDecoder still holds and flush open writers (idempotent)."""
        self.hooks.remove_all()
        self._close_updates()
        for exporter in self._exporters:
            exporter.close()

    def __enter__(self) -> Master_analyzer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Master_analyzer({type(self.inner).__name__}, save_path={str(self.store.root)!r}, "
            f"depth={self.layers.depth}, layers={len(self.layers)})"
        )

    # -------------------------------------------------------------- running
    def forward_propagation(
        self, *args: Any, collect_acts: bool | int = False, layer_inds: Selector = None, **kwargs: Any
    ) -> Any:
        """Return exactly what ``model(*args, **kwargs)`` returns, for any calling convention.

        The first call's input shapes and dtypes (never the data) are remembered, so output
        shapes and the architecture graph work after one training step for any model.

        Args:
            *args: the model's positional inputs.
            collect_acts: record activation health on this call (``True``), or on every
                k-th call (``k``: calls ``0, k, 2k…`` counted over every call), through
                forward hooks that exist for that call only; the user's train/eval mode is
                kept. ``save_collected_grads(ep)`` writes the epoch's files.
            layer_inds: the layers to record (IDs, dotted names or a list); ``None``: all.
            **kwargs: the model's keyword inputs (``collect_acts`` and ``layer_inds`` are
                taken here and never reach the model).

        Raises:
            BBDecoderTypeError, BBDecoderValueError: ``collect_acts`` is not a bool or an int >= 1.
            LayerSelectionError: a bad ``layer_inds``.
        """
        if self._call_spec is None:
            self._call_spec = CallSpec.of(args, kwargs)
        output = self._forward_with_activations(args, kwargs, collect_acts, layer_inds)
        if self._lazy_pending and self._totals()["params"] is not None:  # lazy modules just got their sizes
            self._lazy_pending = False
            self._write_run_record()
        return output

    __call__ = forward_propagation

    # -------------------------------------------------------------- summary
    def summary(self, *, costs: bool = False) -> list[dict[str, Any]]:
        """The layer table: ``id, name, type, params, trainable_params, output_shape``.

        Printed when ``verbose``, unless this very table was printed last (at construction,
        say): a table that changed (output shapes found, ``costs=True``) is printed. Output
        shapes are known once ``input_size`` was given or the model has run through
        :meth:`forward_propagation`.

        Args:
            costs: also add the columns of :meth:`layer_costs`: those of its latest call, or,
                before any, of one measured pass on the ``input_size``/first-call batch.
        """
        costs = checks.flag(costs, "costs")
        if not self._output_shapes and not self._shapes_failed:
            self._fill_output_shapes("summary")
        rows = [
            {
                "id": layer.id,
                "name": layer.name,
                "type": layer.type,
                "params": layer.parameter_count(),
                "trainable_params": layer.parameter_count(trainable_only=True),
                "output_shape": self._output_shapes.get(layer.id),
            }
            for layer in self.layers
        ]
        columns = ["id", "name", "type", "output_shape", "params", "trainable_params"]
        if costs:
            measured = self._last_costs  # what layer_costs measured last, on the batch it was given
            if measured is None and (example := self._example()) is not None:
                measured = self._measure_costs(example)
            if measured is not None:
                by_id = {row["id"]: row for row in measured}
                for row in rows:
                    for key in ("forward_flops", "backward_flops", "forward_ms", "activation_bytes"):
                        row[key] = by_id[row["id"]][key]
                columns += ["forward_flops", "forward_ms", "activation_bytes"]
        table = format_table(rows, title=self._title(), totals=self._totals(), columns=columns)
        if self.verbose and table != self._printed_table:  # the table printed at construction is not printed again
            self._say(table)
            self._printed_table = table if self.is_main_process else ""
        return rows

    def _title(self) -> str:
        return f"Master_analyzer: {type(self.inner).__name__}, depth={self.layers.depth}, {len(self.layers)} layers"

    def _totals(self) -> dict[str, int | None]:
        """Parameter totals; ``None`` while lazy modules have not run yet (their size is unknown)."""
        return {
            "params": count_parameters(self.inner.parameters()),
            "trainable": count_parameters(self.inner.parameters(), trainable_only=True),
        }

    def _example(self) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """``(args, kwargs)`` of zeros shaped like ``input_size``, ``example_input`` or the first call."""
        return None if self._call_spec is None else self._call_spec.materialize(self.device)

    def _fill_output_shapes(self, call: str) -> None:
        example = self._example()
        if example is None:
            return
        try:
            _, outputs = self._capture(example, list(self.layers), call)
        except ModelForwardError as error:
            self._shapes_failed = True
            warnings.warn(f"output shapes unknown: {error}", BBDecoderWarning, stacklevel=3)
            return
        self._output_shapes = {lid: shape_of(out) for lid, out in outputs.items()}

    def visualize_architecture(self) -> list[Path]:
        """Draw the torchview graph with layer IDs into ``save_path/architecture/``.

        Returns the files written: PNG and SVG with Graphviz's ``dot``, the ``.gv`` source
        always. A failure warns and returns ``[]``. Only rank 0 draws and writes; with a sharded
        (FSDP2) model every rank traces the graph, since its forward pass gathers parameters.
        """
        example = self._example()
        if example is None:
            warnings.warn(
                "visualize_architecture needs input_size or example_input (or one forward_propagation call first)",
                BBDecoderWarning,
                stacklevel=2,
            )
            return []
        if not distributed.is_main_process() and not distributed.is_sharded(self.inner):
            return []
        # A sharded (FSDP2) model gathers its parameters in the forward pass, a collective:
        # every rank traces the graph and only rank 0's store writes it.
        return draw_architecture(self.inner, example, self.layers, self.store)

    # --------------------------------------------------------------- report
    def build_report(self) -> Path:
        """Write ``save_path/report.html``: every analysis saved so far, on one static page.

        The page is self-contained (inline CSS/JS, files linked by relative path, no
        network) and is rebuilt from ``save_path``'s manifest on each call, so it also
        shows outputs of earlier processes on the same folder.

        Returns:
            The path of ``report.html`` (on ranks other than 0, where rank 0 writes it).
        """
        from .report import REPORT_NAME, build_report

        if not self.is_main_process:  # only rank 0 writes; the others just learn where
            return self.store.root / REPORT_NAME
        path = build_report(self.store)
        self._say(f"report: {path}")
        return path

    # ------------------------------------------------------------- run.json
    def _write_run_record(self) -> None:
        previous = self.store.read_json(RUN_NAME) or {}
        started = now_iso()
        record = {
            "library": "BBDecoder",
            "version": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "created": previous.get("created", started),
            "updated": started,
            "sessions": [*previous.get("sessions", []), {"started": started, "pid": os.getpid()}],
            "model": type(self.inner).__name__,
            "depth": self.layers.depth,
            "input_size": self.input_size,
            "input": None if self._call_spec is None else self._call_spec.describe(),
            "world_size": distributed.world_size(),
            "totals": self._totals(),
            "layers": [
                {
                    "id": layer.id,
                    "name": layer.name,
                    "type": layer.type,
                    "params": layer.parameter_count(),
                    "trainable_params": layer.parameter_count(trainable_only=True),
                }
                for layer in self.layers
            ],
        }
        self.store.write_json(RUN_NAME, record, overwrite=True)


def _call_spec(input_size: list[Any] | None, input_dtype: Any, example_input: Any) -> CallSpec | None:
    """The remembered call from ``input_size`` (+ ``input_dtype``) or ``example_input``.

    Raises:
        BBDecoderTypeError: ``input_dtype`` is not a ``torch.dtype``.
        BBDecoderValueError: both ``input_size`` and ``example_input`` were given, or
            ``input_dtype`` without ``input_size``.
    """
    if input_dtype is not None and not isinstance(input_dtype, torch.dtype):
        raise BBDecoderTypeError(
            f"input_dtype must be a torch.dtype such as torch.long, got {type(input_dtype).__name__} {input_dtype!r}"
        )
    if example_input is not None and input_size is not None:
        raise BBDecoderValueError("give input_size or example_input, not both")
    if input_dtype is not None and input_size is None:
        raise BBDecoderValueError(f"input_dtype={input_dtype} needs input_size (example_input carries its own dtypes)")
    if input_size is not None:
        return input_spec(input_size, input_dtype or torch.float32)
    if example_input is None:
        return None
    args, kwargs = as_call(example_input)
    if next(tensors((args, kwargs)), None) is None:
        raise BBDecoderTypeError(
            f"example_input must hold at least one tensor (a tensor, tuple, dict or list of them), "
            f"got {type(example_input).__name__} {example_input!r:.80}"
        )
    return CallSpec.of(args, kwargs)
