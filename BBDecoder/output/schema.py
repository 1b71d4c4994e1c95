"""The record schema: typed, versioned records for everything BBDecoder writes and reads back.

Every writer builds these records and every reader (the report, the exporters, a new
process continuing a run) parses them with ``from_json``: nothing reads a file by guessing
its keys. Conventions:

- a non-finite float is written as JSON ``null`` and read back as ``nan`` (strict JSON
  readers reject ``NaN``);
- unknown keys are kept (manifest entries) or ignored (other records), missing optional
  keys take their defaults, so folders written by release 0.1.0 (schema 1, no ``schema``
  key) still read;
- :data:`SCHEMA_VERSION` is written into every JSON document (``"schema": 2``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar, TypeVar, Union

from ..errors import BBDecoderValueError

SCHEMA_VERSION = 2
"""Version of the record schema; 1 is release 0.1.0's (no ``schema`` key)."""

R = TypeVar("R", bound="Record")


class SchemaError(BBDecoderValueError):
    """A document does not hold the record it should (wrong type of a field, not an object)."""


class Record:
    """Base of every record: ``to_json`` gives plain JSON data, ``from_json`` parses it back."""

    versioned: ClassVar[bool] = False  # whether the JSON document carries "schema"

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready data; non-finite floats become ``None``."""
        data = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"schema": SCHEMA_VERSION, **data} if self.versioned else data

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        """Parse ``data`` (a JSON object) into the record; unknown keys are ignored.

        Raises:
            SchemaError: ``data`` is not an object, or a field has the wrong type.
        """
        if not isinstance(data, Mapping):
            raise SchemaError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        hints = _hints(cls)
        values = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in data:
                values[f.name] = _parse(hints[f.name], data[f.name], f"{cls.__name__}.{f.name}")
        try:
            return cls(**values)
        except TypeError as error:  # a required field is missing
            raise SchemaError(f"{cls.__name__}: {error}") from error


# ------------------------------------------------------------------------- manifest
_ENTRY_FIELDS = ("section", "kind", "path", "time", "layer_id", "layer_name", "epoch", "call", "frame")
_SUFFIX_KINDS = {".gv": "gv", ".png": "png", ".svg": "svg"}


@dataclass
class ManifestEntry(Record):
    """One output file, as listed in ``manifest.json``.

    Attributes:
        section: the layout section (:data:`BBDecoder.output.layout.SECTIONS`).
        kind: the file's kind within it (a key of the section's ``files``).
        path: the file relative to ``save_path`` with forward slashes (``../saves/x.png``
            for a folder the user named outside ``save_path``, absolute where no
            relative path exists).
        time: when it was written (ISO 8601, UTC).
        layer_id, layer_name: the layer, for per-layer outputs.
        epoch, call, frame: the number the file carries.
        extra: any other metadata of the entry (kept as it is).
    """

    section: str
    path: str
    kind: str = ""
    time: str = ""
    layer_id: int | None = None
    layer_name: str | None = None
    epoch: int | None = None
    call: int | None = None
    frame: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The flat form stored in the manifest: known fields, then the extra ones."""
        data = {name: getattr(self, name) for name in _ENTRY_FIELDS if getattr(self, name) not in (None, "")}
        return {**data, **{k: _plain(v) for k, v in self.extra.items() if k not in data}}

    @classmethod
    def from_json(cls, data: Any) -> ManifestEntry:
        """Parse a flat manifest entry (release 0.1.0's too: its architecture files had no kind)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("section"), str) or "path" not in data:
            raise SchemaError(f"ManifestEntry: expected an object with 'section' and 'path', got {data!r:.80}")
        known = {name: data[name] for name in _ENTRY_FIELDS if name in data}
        for name in ("layer_id", "epoch", "call", "frame"):
            if not _is_int(known.get(name)):
                known.pop(name, None)
        kind = known.get("kind")
        if not isinstance(kind, str) or not kind:
            known["kind"] = _SUFFIX_KINDS.get(PurePosixPath(str(data["path"])).suffix, "")
        if known.get("layer_name") is not None:
            known["layer_name"] = str(known["layer_name"])
        extra = {k: v for k, v in data.items() if k not in _ENTRY_FIELDS}
        return cls(**{**known, "path": str(data["path"]), "time": str(data.get("time", ""))}, extra=extra)

    @property
    def suffix(self) -> str:
        """The file's suffix, lower case (``".png"``)."""
        return PurePosixPath(self.path).suffix.lower()

    def get(self, key: str, default: Any = None) -> Any:
        """A field or an extra value by name."""
        if key in _ENTRY_FIELDS:
            value = getattr(self, key)
            return default if value is None else value
        return self.extra.get(key, default)


def manifest_entries(raw: list[dict[str, Any]]) -> list[ManifestEntry]:
    """Typed entries from the store's list (``Store.outputs()``); malformed ones are skipped."""
    entries = []
    for item in raw:
        try:
            entries.append(ManifestEntry.from_json(item))
        except SchemaError:
            continue
    return entries


# ------------------------------------------------------------------------ run.json
@dataclass
class LayerRecord(Record):
    """One numbered layer (``params`` is ``None`` while a lazy module is uninitialised)."""

    id: int
    name: str
    type: str
    params: int | None = None
    trainable_params: int | None = None


@dataclass
class Session(Record):
    """One process that wrote into the folder."""

    started: str = ""
    pid: int = 0


@dataclass
class RunRecord(Record):
    """``run.json``: what was analysed, by which versions, in which sessions."""

    versioned: ClassVar[bool] = True
    library: str = "BBDecoder"
    version: str = ""
    torch: str = ""
    python: str = ""
    created: str = ""
    updated: str = ""
    sessions: list[Session] = field(default_factory=list)
    model: str = ""
    depth: int = 1
    input_size: list[Any] | None = None
    input: dict[str, Any] | None = None
    world_size: int = 1
    totals: dict[str, int | None] = field(default_factory=dict)
    layers: list[LayerRecord] = field(default_factory=list)


# ---------------------------------------------------------------------- gradients
ALERT_KINDS = ("nonfinite", "vanishing", "exploding", "dead", "saturated", "update_small", "update_large")


@dataclass
class Alert(Record):
    """One training-health alert.

    Attributes:
        epoch: the saved epoch it belongs to.
        kind: one of :data:`ALERT_KINDS`.
        layer_id, layer_name, param: where (``param`` empty for a whole layer).
        iteration: the first iteration (or optimizer step) it concerns.
        value: the number behind it (mean |g|, a count, a fraction, a ratio).
        message: the sentence shown to people.
    """

    epoch: int
    kind: str
    layer_id: int
    layer_name: str
    param: str
    iteration: int
    value: float = math.nan
    message: str = ""


@dataclass
class TensorSummary(Record):
    """One parameter tensor over one epoch: the numbers behind a bar of the flow chart."""

    label: str
    layer_id: int
    layer_name: str
    param: str
    numel: int
    mean_abs: float
    max_abs: float
    status: str
    nonfinite_iterations: int = 0
    missing_iterations: int = 0
    tied_to: str = ""
    note: str = ""


@dataclass
class GradientEpochReport(Record):
    """``epoch_NNN_alerts.json``: an epoch's alerts, skipped steps and per-tensor summary."""

    versioned: ClassVar[bool] = True
    epoch: int
    iterations: list[int] = field(default_factory=list)
    recorded_iterations: int = 0
    tensors: int = 0
    vanish_threshold: float = math.nan
    explode_threshold: float = math.nan
    alerts: list[Alert] = field(default_factory=list)
    skipped_iterations: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    summary: list[TensorSummary] = field(default_factory=list)


@dataclass
class GradientRow(Record):
    """One row of ``epoch_NNN_grads.csv`` (numbers ``nan`` for a missing gradient)."""

    epoch: int
    iteration: int
    layer_id: int
    layer_name: str
    param: str
    mean_abs: float
    max_abs: float
    l1: float
    l2: float
    nonfinite: float


GRADIENT_CSV_HEADER = tuple(f.name for f in dataclasses.fields(GradientRow))


# -------------------------------------------------------------- similarity, costs
@dataclass
class SimilarityRow(Record):
    """One row of ``similarity.csv``: one layer at one ``get_sim`` call."""

    call: int
    time: str
    method: str
    dim: int
    layer_id: int
    layer_name: str
    value: float
    samples: int
    slices: int
    slice_size: int


SIMILARITY_CSV_HEADER = tuple(f.name for f in dataclasses.fields(SimilarityRow))


@dataclass
class CostRow(Record):
    """One row of a ``layer_costs`` table."""

    id: int
    name: str
    type: str = ""
    params: int | None = None
    forward_flops: int = 0
    backward_flops: int = 0
    forward_ms: float = math.nan
    forward_ms_p25: float = math.nan
    forward_ms_p75: float = math.nan
    activation_bytes: int = 0


COST_CSV_HEADER = tuple(f.name for f in dataclasses.fields(CostRow))


def row_from_csv(record: type[R], row: Mapping[str, str]) -> R:
    """A record from one ``csv.DictReader`` row: each text cell converted to its field's type.

    Raises:
        SchemaError: a cell does not hold its field's type.
    """
    hints = _hints(record)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(record):  # type: ignore[arg-type]
        if f.name in row:
            values[f.name] = _from_text(hints[f.name], row[f.name], f"{record.__name__}.{f.name}")
    try:
        return record(**values)
    except TypeError as error:
        raise SchemaError(f"{record.__name__}: {error}") from error


def csv_cells(record: Record) -> list[Any]:
    """A record as CSV cells: floats with nine significant digits (round-trips float32), ``nan``."""
    return [_cell(value) for value in _field_values(type(record))(record)]


def _cell(value: Any) -> Any:
    if type(value) is float or isinstance(value, float):
        if value == value and value not in (math.inf, -math.inf):
            return f"{value:.9g}"
        return "nan" if value != value else repr(value)
    return "" if value is None else value


@functools.cache
def _field_values(record: type) -> Callable[[Any], tuple[Any, ...]]:
    """A function returning a record's field values in field order (one ``attrgetter``, built once per class)."""
    names = [f.name for f in dataclasses.fields(record)]
    getter = operator.attrgetter(*names)
    return getter if len(names) > 1 else (lambda item: (getter(item),))


# ------------------------------------------------------------------------- helpers
@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # a NumPy scalar
        return _plain(value.item())
    return value


def _parse(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(inner[0], value, where) if len(inner) == 1 else value
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_json(value)
    if origin is list:
        if not isinstance(value, list):
            raise SchemaError(f"{where}: expected a list, got {type(value).__name__}")
        return [_parse(args[0], v, where) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SchemaError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _parse(args[1], v, where) for k, v in value.items()} if args else dict(value)
    if hint is float:
        if value is None:
            return math.nan
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SchemaError(f"{where}: expected a number, got {value!r:.40}")
    if hint is int:
        if _is_int(value):
            return value
        raise SchemaError(f"{where}: expected an integer, got {value!r:.40}")
    if hint is str:
        return "" if value is None else str(value)
    return value


def _from_text(hint: Any, text: str | None, where: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (Union, types.UnionType):
        if text in ("", None) and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
    try:
        if hint is int:
            return int(text)  # type: ignore[arg-type]
        if hint is float:
            return float(text) if text not in ("", None) else math.nan  # type: ignore[arg-type]
    except ValueError as error:
        raise SchemaError(f"{where}: {text!r} is not a {hint.__name__}") from error
    return "" if text is None else text


# --------------------------------------------------------------- activation health
@dataclass
class ActivationRow(Record):
    """One row of ``epoch_NNN_activations.csv``: one layer's output at one recorded forward pass.

    ``dead_frac`` is the fraction of units (channels or features) that were exactly 0 for
    the whole batch; ``saturated_frac`` the fraction of elements near the bounds of a
    bounded activation (``nan`` for unbounded layers). Every number is ``nan`` for a
    selected layer that did not run in that pass.
    """

    epoch: int
    iteration: int
    layer_id: int
    layer_name: str
    mean: float
    std: float
    max_abs: float
    zero_frac: float
    dead_frac: float
    saturated_frac: float


ACTIVATION_CSV_HEADER = tuple(f.name for f in dataclasses.fields(ActivationRow))


@dataclass
class ActivationSummary(Record):
    """One layer's activation health over one epoch (averages of its recorded passes).

    Attributes:
        unit_dim: the dimension whose entries are the units of ``dead_frac`` (``-1``: the
            last one; ``None`` when the output has fewer than two dimensions).
        units: how many units that dimension holds.
        bounds: ``[low, high]`` of a bounded activation, ``None`` otherwise.
        dead_frac_last: ``dead_frac`` at the epoch's last recorded pass.
        status: ``"ok"``, ``"dead"``, ``"saturated"`` or ``"not run"``.
    """

    layer_id: int
    layer_name: str
    type: str
    recorded: int
    mean: float
    std: float
    max_abs: float
    zero_frac: float
    dead_frac: float
    dead_frac_last: float
    saturated_frac: float
    unit_dim: int | None = None
    units: int = 0
    bounds: list[float] | None = None
    status: str = "ok"


@dataclass
class ActivationEpochReport(Record):
    """``epoch_NNN_activation_alerts.json``: an epoch's activation alerts and per-layer summary."""

    versioned: ClassVar[bool] = True
    epoch: int
    iterations: list[int] = field(default_factory=list)
    recorded_iterations: int = 0
    layers: int = 0
    dead_threshold: float = math.nan
    saturated_threshold: float = math.nan
    saturation_margin: float = math.nan
    alerts: list[Alert] = field(default_factory=list)
    summary: list[ActivationSummary] = field(default_factory=list)


# ------------------------------------------------------------ update-to-weight ratio
@dataclass
class UpdateRow(Record):
    """One row of ``epoch_NNN_updates.csv``: one parameter tensor at one optimizer step.

    ``update_norm`` is ‖Δw‖ (what the step changed), ``weight_norm`` ‖w‖ before the step,
    ``ratio`` their quotient; all ``nan`` for a tensor without a gradient at that step.
    """

    epoch: int
    step: int
    layer_id: int
    layer_name: str
    param: str
    update_norm: float
    weight_norm: float
    ratio: float


UPDATE_CSV_HEADER = tuple(f.name for f in dataclasses.fields(UpdateRow))


@dataclass
class UpdateSummary(Record):
    """One layer's update-to-weight ratio over one epoch.

    Attributes:
        median_ratio: the median over the epoch's steps of the layer's ratio
            ‖Δw‖/‖w‖ (its tensors together: root of summed squares over root of summed squares).
        log10_distance: ``log10(median_ratio)`` minus the median of that over the layers.
        status: ``"ok"``, ``"small"``, ``"large"``, ``"not updated"`` or ``"missing"``.
    """

    layer_id: int
    layer_name: str
    tensors: int
    steps: int
    median_ratio: float
    log10_distance: float
    status: str = "ok"


@dataclass
class UpdateEpochReport(Record):
    """``epoch_NNN_update_alerts.json``: an epoch's update alerts, the rule's numbers and per-layer summary.

    Attributes:
        median_log10: the median over layers of ``log10(median_ratio)``.
        spread: the robust spread of that (1.4826 × median absolute deviation), in decades.
        far_decades: the distance beyond which a layer is "far" this epoch
            (``max(min_far_decades, 3 × spread)``).
    """

    versioned: ClassVar[bool] = True
    epoch: int
    steps: list[int] = field(default_factory=list)
    recorded_steps: int = 0
    tensors: int = 0
    median_log10: float = math.nan
    spread: float = math.nan
    far_decades: float = math.nan
    small_threshold: float = math.nan
    large_threshold: float = math.nan
    alerts: list[Alert] = field(default_factory=list)
    summary: list[UpdateSummary] = field(default_factory=list)
