"""The architecture graph, drawn by torchview, with BBDecoder's layer IDs in the labels."""

from __future__ import annotations

import contextlib
import html
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from .core.layers import LayerTable
from .core.model import eval_mode
from .errors import BBDecoderWarning, GraphvizMissingWarning
from .output import layout
from .output.store import Store
from .summary import printable

DOT_HINT = (
    "install Graphviz's `dot` program to get PNG/SVG (Debian/Ubuntu: apt-get install graphviz; "
    "macOS: brew install graphviz; conda: conda install graphviz)"
)
_warned_missing_dot = False
SECTION = "architecture"
PNG_DPI = 96
"""Resolution of the architecture PNG: 10-pt labels are 13 px tall."""
PNG_MAX_PX = 16000
"""Longest side of the architecture PNG; a bigger graph gets a lower resolution (the SVG is always whole)."""


def dot_available() -> bool:
    """Whether Graphviz's ``dot`` program is on PATH."""
    return shutil.which("dot") is not None


@contextlib.contextmanager
def _labels_with_ids(layers: LayerTable) -> Iterator[None]:
    """Make torchview write ``#ID name`` on each numbered module: above a box's class name,
    and as the label of a container's cluster (``#4 layer1 (Sequential)``)."""
    from torchview.computation_graph import ComputationGraph
    from torchview.computation_node import ModuleNode

    by_module = {id(layer.module): layer for layer in layers}
    original_label = ComputationGraph.get_node_label
    original_traverse = ComputationGraph.traverse_graph

    def get_node_label(graph: Any, node: Any) -> str:
        label = original_label(graph, node)
        layer = by_module.get(getattr(node, "compute_unit_id", None)) if isinstance(node, ModuleNode) else None
        if layer is None:
            return label
        tag = f"<B>#{layer.id}</B> {html.escape(printable(layer.name))}<BR/>"
        return label.replace(f'<TD ROWSPAN="2">{node.name}', f'<TD ROWSPAN="2">{tag}{node.name}', 1).replace(
            f"<TR><TD>{node.name}", f"<TR><TD>{tag}{node.name}", 1
        )

    def traverse_graph(graph: Any, action_fn: Any, **kwargs: Any) -> None:
        node = kwargs.get("cur_node")
        module = next(iter(node)) if isinstance(node, dict) and node else None
        layer = by_module.get(getattr(module, "compute_unit_id", None)) if isinstance(module, ModuleNode) else None
        # torchview draws a module as a cluster, labelled with its name, exactly when this holds
        cluster = layer is not None and graph.expand_nested and 1 <= module.depth < graph.depth
        if not cluster or (graph.hide_module_functions and module.is_container):
            original_traverse(graph, action_fn, **kwargs)
            return
        class_name = module.name
        module.name = f"#{layer.id} {printable(layer.name)} ({class_name})"  # a plain, quoted dot string
        try:
            original_traverse(graph, action_fn, **kwargs)
        finally:
            module.name = class_name

    ComputationGraph.get_node_label = get_node_label  # type: ignore[method-assign]
    ComputationGraph.traverse_graph = traverse_graph  # type: ignore[method-assign]
    try:
        yield
    finally:
        ComputationGraph.get_node_label = original_label  # type: ignore[method-assign]
        ComputationGraph.traverse_graph = original_traverse  # type: ignore[method-assign]


def draw_architecture(
    model: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]], layers: LayerTable, store: Store
) -> list[Path]:
    """Draw the graph of ``model`` called as ``model(*args, **kwargs)`` (``example``) into ``architecture/``.

    Writes PNG and SVG when ``dot`` is installed, and the Graphviz source (``.gv``) always.
    The graph is drawn at its natural size (torchview would shrink a big one to fit 12 to
    40 inches, leaving ResNet-50's text 7 px tall): the SVG at full size, the PNG at
    :data:`PNG_DPI` unless its long side would pass :data:`PNG_MAX_PX`. Every call is
    numbered in the manifest (``call``); a second call writes the next number
    (``architecture_002.*``) and the report shows the newest call only. Where torchview
    fails at the analyzer's depth (it raises ``KeyError`` on GPT-2 below depth 1), the
    graph is drawn at the deepest depth it can, with a warning. Never raises: a failure
    is a warning, so it cannot block wrapping.
    """
    try:
        graph, drawn_depth, failure = _trace(model, example, layers)
        if drawn_depth != layers.depth:
            warnings.warn(
                f"torchview could not draw the architecture at depth {layers.depth} ({failure}); it is drawn at "
                f"depth {drawn_depth} instead: deeper layers sit inside their parents' boxes",
                BBDecoderWarning,
                stacklevel=3,
            )
        visual = graph.visual_graph
        visual.graph_attr.pop("size", None)
        call = layout.next_number(store, SECTION)
        meta = {"call": call}

        def where(kind: str) -> str:
            return layout.relative_path(SECTION, kind, call=call)

        written = [store.write_text(where("gv"), visual.source, section=SECTION, meta={**meta, "kind": "gv"})]
        if dot_available() and store.enabled:
            svg = visual.pipe(format="svg")
            bitmap = visual.copy()
            bitmap.graph_attr["dpi"] = f"{png_dpi(svg):.0f}"
            written.append(
                store.write_bytes(
                    where("png"), bitmap.pipe(format="png"), section=SECTION, meta={**meta, "kind": "png"}
                )
            )
            written.append(store.write_bytes(where("svg"), svg, section=SECTION, meta={**meta, "kind": "svg"}))
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


def _trace(
    model: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]], layers: LayerTable
) -> tuple[Any, int, str]:
    """torchview's graph at the layers' depth, else at the deepest smaller depth that works.

    Returns:
        ``(graph, depth drawn, the first failure as text, "" when none)``.

    Raises:
        Exception: what torchview raised at depth 1 (or at the layers' depth, if that is 1).
    """
    from torchview import draw_graph

    args, kwargs = example  # the model's (args, kwargs)
    extra = kwargs if args else {}  # torchview passes a dict input_data as the keyword inputs
    failure = ""
    for depth in range(layers.depth, 0, -1):
        try:
            with _labels_with_ids(layers), eval_mode(model):
                graph = draw_graph(
                    model,
                    input_data=list(args) if args else dict(kwargs),
                    **extra,
                    depth=depth,
                    expand_nested=True,
                    graph_name="architecture",
                    device=next((p.device for p in model.parameters()), "cpu"),
                    mode="eval",
                )
            return graph, depth, failure
        except Exception as error:  # torchview's own failure at this depth: try a shallower drawing
            if depth == 1:
                raise
            failure = failure or f"{type(error).__name__}: {error}"
    raise AssertionError("unreachable: depth 1 returns or raises")


def png_dpi(svg: bytes) -> float:
    """The PNG's resolution: :data:`PNG_DPI`, less when the long side would pass :data:`PNG_MAX_PX`.

    ``svg`` is dot's rendering, whose ``width``/``height`` are in points (1/72 inch).
    """
    head = svg[:4096].decode("utf-8", "replace")
    sizes = [float(m.group(1)) for m in re.finditer(r'\b(?:width|height)="([0-9.]+)pt"', head)]
    longest_in = max(sizes, default=0.0) / 72.0
    if longest_in <= 0:
        return float(PNG_DPI)
    return float(max(24.0, min(PNG_DPI, PNG_MAX_PX / longest_in)))


def _warn_missing_dot() -> None:
    global _warned_missing_dot
    if not _warned_missing_dot:
        _warned_missing_dot = True
        warnings.warn(
            f"Graphviz's `dot` was not found, so only the graph's source (architecture/*.gv) was written; {DOT_HINT}",
            GraphvizMissingWarning,
            stacklevel=4,
        )
