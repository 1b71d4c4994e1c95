"""The layer table as rows, and its printed form."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SUMMARY_COLUMNS = ("id", "name", "type", "params", "trainable_params", "output_shape")
_HEADINGS = {
    "id": "ID",
    "name": "Name",
    "type": "Type",
    "output_shape": "Output shape",
    "params": "Params",
    "trainable_params": "Trainable",
    "forward_flops": "Fwd FLOPs",
    "backward_flops": "Bwd FLOPs",
    "forward_ms": "Fwd ms",
    "activation_bytes": "Act. bytes",
}
_NUMERIC = {"id", "params", "trainable_params", "forward_flops", "backward_flops", "forward_ms", "activation_bytes"}


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a hostile name cannot garble a terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _cell(key: str, value: Any) -> str:
    if value is None or value == []:
        return "-" if key == "output_shape" else ""
    if key == "forward_ms":
        return f"{value:.3f}"
    if isinstance(value, int) and key != "id":
        return f"{value:,}"
    return printable(str(value))


def format_table(
    rows: Sequence[dict[str, Any]],
    *,
    title: str,
    totals: dict[str, int | None],
    columns: Sequence[str] = ("id", "name", "type", "output_shape", "params", "trainable_params"),
) -> str:
    """The summary as aligned text: a title, one line per layer, and the model's totals."""
    table = [[_HEADINGS.get(c, c) for c in columns]]
    table += [[_cell(c, row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]

    def render(line: list[str]) -> str:
        cells = [
            cell.rjust(width) if column in _NUMERIC else cell.ljust(width)
            for cell, width, column in zip(line, widths, columns, strict=True)
        ]
        return "  ".join(cells).rstrip()

    rule = "=" * len(render(["-" * w for w in widths]))
    lines = [title, rule, render(table[0]), "-" * len(rule)]
    lines += [render(line) for line in table[1:]]
    params, trainable = totals["params"], totals["trainable"]
    if params is None or trainable is None:  # lazy modules (nn.LazyLinear) have no size before their first call
        counts = ["Total params: unknown until the first forward pass (lazy modules)"]
    else:
        counts = [
            f"Total params: {params:,}",
            f"Trainable params: {trainable:,}",
            f"Non-trainable params: {params - trainable:,}",
        ]
    lines += [rule, *counts, rule]
    return "\n".join(lines)
