"""The output layout: for every section, its folder, file names, numbering and folder argument.

This table is the one place that names files. Every analysis asks it for the path of what
it writes; the report and the exporters read the manifest's typed entries, never guess
file names. Conventions shared by every section:

- a per-layer folder is ``{id:03d}_{name}`` (the layer ID zero-padded, the name through
  :func:`~BBDecoder.output.store.safe_name`), and a video lives inside its layer's folder;
- calls, epochs and frames are numbered from the manifest (:func:`next_number`), so a new
  process on the same ``save_path`` continues the numbering and a second call never gets
  a collision suffix;
- cumulative figures (a trend, an evolution) keep one name and are redrawn in place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from .store import safe_name

if TYPE_CHECKING:
    from .store import Store


@dataclass(frozen=True)
class Section:
    """How one analysis lays out its files.

    Attributes:
        name: the manifest section.
        folder: the default folder, relative to ``save_path``.
        numbering: what numbers its files: ``"epoch"`` (given by the user), ``"call"`` or
            ``"frame"`` (counted from the manifest).
        folder_argument: the public method's argument that names another folder (``None``:
            always ``folder``).
        per_layer: whether its files go in a ``{id:03d}_{name}`` folder per layer.
        files: ``kind -> file-name pattern`` (``str.format`` fields: ``epoch``, ``call``,
            ``frame``, ``page``, ``sample``, ``target``, ``tag``, ``ext``).
        cumulative: kinds whose one file is redrawn in place at every call.
    """

    name: str
    folder: str
    numbering: str
    folder_argument: str | None
    per_layer: bool
    files: dict[str, str]
    cumulative: frozenset[str] = field(default_factory=frozenset)


SECTIONS: dict[str, Section] = {
    section.name: section
    for section in (
        Section(
            "architecture",
            "architecture",
            "call",
            None,
            False,
            {kind: f"architecture_{{call:03d}}.{kind}" for kind in ("gv", "png", "svg")},
        ),
        Section(
            "gradients",
            "gradients",
            "epoch",
            "save_folder",
            False,
            {
                "flow": "epoch_{epoch:03d}_flow{page}.png",
                "norms": "epoch_{epoch:03d}_norms{page}.png",
                "csv": "epoch_{epoch:03d}_grads.csv",
                "layers": "epoch_{epoch:03d}_layers.npz",
                "heatmap": "epoch_{epoch:03d}_heatmap.png",
                "alerts": "epoch_{epoch:03d}_alerts.json",
            },
        ),
        Section(
            "activations",
            "activations",
            "epoch",
            "save_folder",
            False,
            {
                "csv": "epoch_{epoch:03d}_activations.csv",
                "figure": "epoch_{epoch:03d}_activations{page}.png",
                "layers": "epoch_{epoch:03d}_activation_layers.npz",
                "heatmap": "epoch_{epoch:03d}_activation_heatmap.png",
                "alerts": "epoch_{epoch:03d}_activation_alerts.json",
            },
        ),
        Section(
            "updates",
            "updates",
            "epoch",
            "save_folder",
            False,
            {
                "csv": "epoch_{epoch:03d}_updates.csv",
                "figure": "epoch_{epoch:03d}_updates{page}.png",
                "alerts": "epoch_{epoch:03d}_update_alerts.json",
            },
        ),
        Section(
            "weights",
            "weights",
            "call",
            "save_folder",
            True,
            {
                "histogram": "hist_call{call:03d}{page}.png",
                "data": "hist_call{call:03d}.npz",
                "evolution": "evolution.png",
            },
            frozenset({"evolution"}),
        ),
        Section(
            "similarity",
            "similarity",
            "call",
            None,
            False,
            {"csv": "similarity.csv", "bar": "bar_call{call:03d}.png", "trend": "trend.png"},
            frozenset({"csv", "trend"}),
        ),
        Section(
            "features",
            "features",
            "frame",
            "path",
            True,
            {"raw": "frame_{frame:04d}{tag}.npy", "picture": "frame_{frame:04d}{tag}.png"},
        ),
        Section(
            "video",
            "features",
            "call",
            "path",
            True,
            {
                "mp4": "evolution_{call:03d}.mp4",
                "webm": "evolution_{call:03d}.webm",
                "contact_sheet": "evolution_{call:03d}_contact_sheet.png",
            },
        ),
        Section(
            "gradcam",
            "gradcam",
            "call",
            None,
            True,
            {"maps": "call{call:03d}_maps.npy", "overlay": "call{call:03d}_sample{sample:03d}_class{target}.png"},
        ),
        Section(
            "costs",
            "costs",
            "call",
            None,
            False,
            {
                "csv": "call{call:03d}_layer_costs.csv",
                "flops": "call{call:03d}_flops.png",
                "time": "call{call:03d}_time.png",
            },
        ),
    )
}


def layer_folder(layer_id: int, layer_name: str) -> str:
    """``"003_layer1.0"``: the folder of one layer's files (the root's own parameters: ``"model"``)."""
    return "model" if layer_id < 0 else f"{layer_id:03d}_{safe_name(layer_name)}"


def file_name(section: str, kind: str, **fields: Any) -> str:
    """The file name of ``kind`` in ``section``; ``page`` and ``tag`` default to empty.

    Raises:
        KeyError: an unknown section or kind (a programming error, not user input).
    """
    pattern = SECTIONS[section].files[kind]
    values = {"page": "", **fields}
    tag = values.get("tag")
    values["tag"] = "" if tag in (None, "") else f"_{safe_name(str(tag))}"
    return pattern.format(**values)


def relative_path(
    section: str,
    kind: str,
    *,
    folder: str | PurePosixPath | None = None,
    layer: tuple[int, str] | None = None,
    **fields: Any,
) -> str:
    """Where ``kind`` of ``section`` goes: ``folder`` (default: the section's), the layer's folder, the name.

    Args:
        section: the manifest section.
        kind: the file's kind in that section.
        folder: the folder the user named (as :meth:`Store.subfolder` returned it).
        layer: ``(layer_id, layer_name)`` for per-layer sections.
        **fields: the pattern's fields (``epoch``, ``call``…).
    """
    spec = SECTIONS[section]
    base = PurePosixPath(folder if folder is not None else spec.folder)
    if spec.per_layer:
        if layer is None:
            raise ValueError(f"section {section!r} is per layer: give layer=(id, name)")
        base = base / layer_folder(*layer)
    return (base / file_name(section, kind, **fields)).as_posix()


def page_suffix(number: int, pages: int) -> str:
    """``""`` for a single page, else ``"_2of5"``."""
    return "" if pages == 1 else f"_{number}of{pages}"


def next_number(store: Store, section: str, **where: Any) -> int:
    """The next call (or frame) number of ``section``, continuing what the manifest holds.

    Args:
        store: the output folder.
        section: the manifest section; its :attr:`Section.numbering` names the counter.
        **where: count only entries with these values (``layer_name="fc"``).
    """
    key = SECTIONS[section].numbering
    return store.next_number(section, key, **where)
