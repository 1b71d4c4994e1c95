"""The architecture graph, drawn by torchview, with BBDecoder's layer IDs in the labels."""

from __future__ import annotations

import contextlib
import html
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .core.layers import LayerTable
from .core.model import eval_mode
from .errors import BBDecoderWarning, GraphvizMissingWarning
from .output.store import Store

DOT_HINT = (
    "install Graphviz's `dot` program to get PNG/SVG (Debian/Ubuntu: apt-get install graphviz; "
    "macOS: brew install graphviz; conda: conda install graphviz)"
)
_warned_missing_dot = False


def dot_available() -> bool:
    """Whether Graphviz's ``dot`` program is on PATH."""
    return shutil.which("dot") is not None


@contextlib.contextmanager
def _labels_with_ids(layers: LayerTable) -> Iterator[None]:
    """Make torchview write ``#ID name`` above each numbered module's class name."""
    from torchview.computation_graph import ComputationGraph
    from torchview.computation_node import ModuleNode

    by_module = {id(layer.module): layer for layer in layers}
    original = ComputationGraph.get_node_label

    def get_node_label(graph: Any, node: Any) -> str:
        label = original(graph, node)
        layer = by_module.get(getattr(node, "compute_unit_id", None)) if isinstance(node, ModuleNode) else None
        if layer is None:
            return label
        tag = f"<B>#{layer.id}</B> {html.escape(layer.name)}<BR/>"
        return label.replace(f'<TD ROWSPAN="2">{node.name}', f'<TD ROWSPAN="2">{tag}{node.name}', 1).replace(
            f"<TR><TD>{node.name}", f"<TR><TD>{tag}{node.name}", 1
        )

    ComputationGraph.get_node_label = get_node_label  # type: ignore[method-assign]
    try:
        yield
    finally:
        ComputationGraph.get_node_label = original  # type: ignore[method-assign]


def draw_architecture(
    model: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]], layers: LayerTable, store: Store
) -> list[Path]:
    """Draw the graph of ``model`` called as ``model(*args, **kwargs)`` (``example``) into ``architecture/``.

    Writes PNG and SVG when ``dot`` is installed, and the Graphviz source (``.gv``) always.
    Never raises: a failure is a warning, so it cannot block wrapping.
    """
    try:
        from torchview import draw_graph

        with _labels_with_ids(layers), eval_mode(model):
            args, kwargs = example  # the model's (args, kwargs)
            extra = kwargs if args else {}  # torchview passes a dict input_data as the keyword inputs
            graph = draw_graph(
                model,
                input_data=list(args) if args else dict(kwargs),
                **extra,
                depth=layers.depth,
                expand_nested=True,
                graph_name="architecture",
                device=next((p.device for p in model.parameters()), "cpu"),
                mode="eval",
            )
        visual = graph.visual_graph
        written = [store.write_text("architecture/architecture.gv", visual.source, section="architecture")]
        if dot_available() and store.enabled:
            for fmt in ("png", "svg"):
                data = visual.pipe(format=fmt)
                written.append(store.write_bytes(f"architecture/architecture.{fmt}", data, section="architecture"))
    except Exception as error:  # the graph is a bonus: it must never block the analysis
        warnings.warn(
            f"the architecture graph could not be drawn: {type(error).__name__}: {error}",
            BBDecoderWarning,
            stacklevel=3,
        )
        return []
    if not dot_available():
        _warn_missing_dot()
    return [p for p in written if p is not None]


def _warn_missing_dot() -> None:
    global _warned_missing_dot
    if not _warned_missing_dot:
        _warned_missing_dot = True
        warnings.warn(
            f"Graphviz's `dot` was not found, so only architecture/architecture.gv was written; {DOT_HINT}",
            GraphvizMissingWarning,
            stacklevel=4,
        )
