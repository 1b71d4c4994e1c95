"""Feature similarity across a dimension (issue: weights and similarity).

``get_sim`` runs one batch through the model, takes each selected layer's output, cuts it
into slices along ``dim`` (channels of a conv map, tokens of a transformer block), and
measures how alike the slices are: the mean over ordered pairs ``i != j`` of a pairwise
measure, per sample, then averaged over the batch.

The cosine and KL measures are computed without forming the ``S x S`` pair matrix (exact
identities over sums of the slices, see :func:`slice_similarity`); ``abs_cosine`` needs the
pair matrix and builds it block by block. Either way memory stays within a fixed budget of
elements however many slices a layer has, and the work runs on the features' device in
float64 (float32 on MPS, which has no float64).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from typing import Any

import torch

from ..core import checks, distributed
from ..core.layers import Layer, Selector
from ..core.model import accumulator_dtype, first_tensor
from ..core.tree import as_call
from ..errors import BBDecoderTypeError, BBDecoderValueError
from ..output import layout
from ..output.schema import SIMILARITY_CSV_HEADER
from ..output.store import now_iso
from ..summary import printable
from ._base import AnalyzerBase

SIM_METHODS = ("cosine", "abs_cosine", "kl_divergence")
"""The measures ``get_sim`` accepts."""

DEFAULT_BLOCK_ELEMENTS = 1 << 24
"""Largest number of float64 elements one working block holds (128 MiB)."""

SECTION = "similarity"
SIM_CSV = layout.relative_path(SECTION, "csv")
SIM_TREND = layout.relative_path(SECTION, "trend")
CSV_COLUMNS = SIMILARITY_CSV_HEADER

_EPS = 1e-12
_LABELS = {"cosine": "mean cosine", "abs_cosine": "mean |cosine|", "kl_divergence": "mean KL"}


# ------------------------------------------------------------------ computation
def _check_method(sim_method: Any) -> str:
    if not isinstance(sim_method, str) or sim_method not in SIM_METHODS:
        raise BBDecoderValueError(f"sim_method must be one of {', '.join(map(repr, SIM_METHODS))}; got {sim_method!r}")
    return sim_method


def _check_dim(dim: Any) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise BBDecoderTypeError(f"dim must be an int (the dimension whose slices are compared); got {dim!r}")


def normalize_dim(dim: int, shape: torch.Size | tuple[int, ...], where: str = "the features") -> int:
    """``dim`` as a non-negative index into ``shape``, which is ``(N, ...)`` with the batch first.

    Raises:
        BBDecoderTypeError: ``dim`` is not an int.
        BBDecoderValueError: ``dim`` is out of range, is the batch dimension, or selects
            fewer than two slices.
    """
    _check_dim(dim)
    ndim = len(shape)
    if ndim < 2:
        raise BBDecoderValueError(
            f"{where} has shape {list(shape)}: need a batch dimension and at least one more to compare slices along"
        )
    if not -ndim <= dim < ndim:
        raise BBDecoderValueError(
            f"dim={dim} is out of range for {where} of shape {list(shape)}; valid: 1..{ndim - 1} or -{ndim - 1}..-1"
        )
    dim %= ndim
    if dim == 0:
        raise BBDecoderValueError(
            f"dim={dim} is the batch dimension of {where} (shape {list(shape)}); "
            f"slices are compared within each sample: use 1..{ndim - 1}"
        )
    if shape[dim] < 2:
        raise BBDecoderValueError(
            f"dim={dim} of {where} (shape {list(shape)}) holds {shape[dim]} slice: at least 2 are needed for pairs"
        )
    return dim


def _blocks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(total, start + size)


def _rows(moved: torch.Tensor, n: tuple[int, int], rows: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Samples ``n`` and slices ``rows`` of ``moved`` (N, S, ...), flattened to (g, r, F), as ``dtype``."""
    block = moved[n[0] : n[1], rows[0] : rows[1]]
    return block.reshape(block.shape[0], block.shape[1], -1).to(dtype)


def _unit(rows: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length; an all-zero row stays zero (its cosine with anything is 0)."""
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def slice_similarity(
    features: torch.Tensor,
    dim: int,
    sim_method: str = "cosine",
    *,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Per-sample mean pairwise similarity between the slices of ``features`` along ``dim``.

    Sample ``n`` gives ``S = features.shape[dim]`` slices ``h_1..h_S``, each flattened to a
    vector of length ``F``. Its value is the mean over the ``S(S-1)`` ordered pairs
    ``i != j`` of:

    - ``cosine``: ``cos(h_i, h_j)``, computed as ``(|Σ u_i|² - Σ |u_i|²) / (S(S-1))`` with
      ``u_i = h_i / |h_i|``, so no pair matrix is formed;
    - ``abs_cosine``: ``|cos(h_i, h_j)|``, from the Gram matrix of the ``u_i``, built in
      blocks (only the upper triangle: it is symmetric);
    - ``kl_divergence``: ``KL(p_i ‖ p_j)`` with ``p_i = softmax(h_i)``. With
      ``H_i = Σ_k p_ik log p_ik``, the sum over ``i != j`` is
      ``S Σ_i H_i - (Σ_i p_i) · (Σ_j log p_j)``; clamped at 0 (it is ≥ 0 exactly).

    A slice of zeros has cosine 0 with every other slice. All sums run in float64 on the
    features' device, over blocks of at most about ``block_elements`` elements, so the
    result does not depend on the block size beyond float64 rounding.

    Args:
        features: ``(N, ...)`` tensor, batch first.
        dim: the dimension whose slices are compared (not 0, the batch).
        sim_method: one of :data:`SIM_METHODS`.
        block_elements: working-memory budget in elements.

    Returns:
        ``(N,)`` float64 tensor (float32 on MPS) on the features' device.

    Raises:
        BBDecoderTypeError: ``features`` is not a real tensor, or ``dim`` not an int.
        BBDecoderValueError: a bad ``dim``, ``sim_method`` or ``block_elements``.
    """
    method = _check_method(sim_method)
    if not isinstance(features, torch.Tensor) or features.is_complex():
        raise BBDecoderTypeError(f"features must be a real torch.Tensor, got {type(features).__name__}")
    if isinstance(block_elements, bool) or not isinstance(block_elements, int) or block_elements < 1:
        raise BBDecoderValueError(f"block_elements must be a positive int, got {block_elements!r}")
    dim = normalize_dim(dim, features.shape)
    moved = features.detach().movedim(dim, 1)  # a view: (N, S, ...)
    count, width = moved.shape[0], math.prod(moved.shape[2:])
    dtype = accumulator_dtype(features.device)
    out = torch.zeros(count, dtype=dtype, device=features.device)
    if count == 0:
        return out
    if method == "abs_cosine":
        _abs_cosine(moved, out, width, dtype, block_elements)
    else:
        _by_sums(moved, out, method, width, dtype, block_elements)
    return out


def _by_sums(moved: torch.Tensor, out: torch.Tensor, method: str, width: int, dtype: torch.dtype, budget: int) -> None:
    """cosine and KL: one pass over row blocks, accumulating per-sample sums."""
    count, slices = moved.shape[0], moved.shape[1]
    per_sample = slices * max(width, 1)
    group = max(1, budget // per_sample) if per_sample <= budget else 1
    rows = slices if per_sample <= budget else max(1, budget // max(width, 1))
    pairs = slices * (slices - 1)
    for n in _blocks(count, group):
        g = n[1] - n[0]
        vec_a = torch.zeros(g, width, dtype=dtype, device=out.device)
        vec_b = torch.zeros(g, width, dtype=dtype, device=out.device)
        scalar = torch.zeros(g, dtype=dtype, device=out.device)
        for r in _blocks(slices, rows):
            block = _rows(moved, n, r, dtype)
            if method == "cosine":
                unit = _unit(block)
                vec_a += unit.sum(1)
                scalar += unit.square().sum((1, 2))
            else:
                logp = torch.log_softmax(block, dim=-1)
                prob = logp.exp()
                vec_a += prob.sum(1)
                vec_b += logp.sum(1)
                scalar += (prob * logp).sum((1, 2))
        if method == "cosine":
            total = vec_a.square().sum(1) - scalar
        else:
            total = (slices * scalar - (vec_a * vec_b).sum(1)).clamp_min(0)
        out[n[0] : n[1]] = total / pairs


def _abs_cosine(moved: torch.Tensor, out: torch.Tensor, width: int, dtype: torch.dtype, budget: int) -> None:
    """Mean |cos| over pairs from Gram blocks ``U_a U_c^T`` with ``c >= a``."""
    count, slices = moved.shape[0], moved.shape[1]
    width = max(width, 1)
    whole = 2 * slices * width + slices * slices  # two row blocks and their Gram block
    if whole <= budget:
        group, rows = max(1, budget // whole), slices
    else:
        group = 1
        rows = max(1, int(math.sqrt(width * width + budget) - width))  # 2rF + r² <= budget
    pairs = slices * (slices - 1)
    for n in _blocks(count, group):
        total = torch.zeros(n[1] - n[0], dtype=dtype, device=out.device)
        for a in _blocks(slices, rows):
            left = _unit(_rows(moved, n, a, dtype))
            for c in _blocks(slices, rows):
                if c[0] < a[0]:
                    continue
                right = left if c == a else _unit(_rows(moved, n, c, dtype))
                gram = torch.bmm(left, right.transpose(1, 2)).abs_()
                if c == a:
                    total += gram.sum((1, 2)) - torch.diagonal(gram, dim1=1, dim2=2).sum(1)
                else:
                    total += 2 * gram.sum((1, 2))
        out[n[0] : n[1]] = total / pairs


# ------------------------------------------------------------------------ mixin
class SimilarityMixin(AnalyzerBase):
    """``get_sim``: how alike the slices of a layer's output are, call after call.

    Outputs under ``save_path/similarity/``:

    - ``similarity.csv``: one row per layer per call (``CSV_COLUMNS``). It is cumulative:
      each call appends its rows under the folder's lock (a new process on the same folder,
      or a second process writing at the same time, continues it and loses nothing);
    - ``bar_call{k:03d}.png``: the values of call ``k``, one bar per layer;
    - ``trend.png``: every call so far, one line per layer (redrawn in place each call;
      its numbers are the CSV's).

    Manifest section ``"similarity"``, meta ``{"call", "kind": "bar" | "trend" | "csv"}``;
    the two fixed-name files get one entry each, when first written.
    """

    def get_sim(
        self,
        x: Any,
        layer_inds: Selector,
        dim: int,
        sim_method: str = "cosine",
        *,
        output_key: Any = None,
    ) -> dict[int, float]:
        """Mean pairwise similarity of the slices along ``dim`` of each layer's output.

        Runs ``x`` through the model once, in eval mode and without gradients (every
        module's train/eval flag is restored and the temporary hooks removed afterwards).
        For each sample, the layer output is cut into slices along ``dim`` (``dim=1`` on an
        ``(N, C, H, W)`` map compares channels, on ``(N, T, D)`` tokens compares tokens),
        each slice flattened; see :func:`slice_similarity` for the measures. Per-sample
        values are averaged over the batch, and under ``torch.distributed`` over every
        rank's samples (one all-reduce).

        Args:
            x: the model's input as it takes it (moved to its device): a tensor, a tuple of
                positional inputs, a dict of keyword inputs, or a list (one positional input).
            layer_inds: layer IDs or names (one or a list).
            dim: the dimension of the layer output to compare along; negative counts from
                the end; not 0, the batch.
            sim_method: ``'cosine'``, ``'abs_cosine'`` (arXiv 2104.12753) or
                ``'kl_divergence'`` (of the softmax of each slice; ≥ 0, 0 when identical).
            output_key: for layers returning a tuple/list/dict, the item to use; the first
                tensor by default.

        Returns:
            ``{layer_id: value}`` in the order the layers were requested.

        Raises:
            BBDecoderTypeError: ``dim`` is not an int, or a selected output is not a tensor.
            BBDecoderValueError: an unknown ``sim_method``; a ``dim`` out of range for a
                layer's output; a selected layer that did not run in the forward pass.
            LayerSelectionError: ``layer_inds`` selects no layer.
            ModelForwardError: the model raised on ``x``.
        """
        method = _check_method(sim_method)
        _check_dim(dim)
        layers = self._select(layer_inds, "layer_inds")
        _, captured = self._capture(as_call(x), layers, "get_sim")
        sums, counts, shapes = [], [], []
        for layer in layers:
            features = self._sim_features(layer, captured, output_key)
            checks.batch_not_empty(features, f"x (the output of layer {layer.id} {layer.name!r})")
            axis = normalize_dim(dim, features.shape, f"the output of layer {layer.id} {layer.name!r}")
            per_sample = slice_similarity(features, axis, method)
            sums.append(per_sample.sum())
            counts.append(per_sample.numel())
            shapes.append((axis, features.shape[axis], math.prod(features.shape[1:]) // features.shape[axis]))
        # One tensor, one collective, one host synchronisation for every layer: per-layer sums
        # and sample counts are averaged over ranks, so their ratio is the mean over all samples.
        device, dtype = sums[0].device, sums[0].dtype
        stacked = torch.stack([torch.stack([s.to(device) for s in sums]), torch.tensor(counts, dtype=dtype).to(device)])
        host = distributed.all_reduce_mean(stacked).tolist()
        values = {layer.id: host[0][i] / host[1][i] if host[1][i] else float("nan") for i, layer in enumerate(layers)}
        samples = [round(host[1][i] * distributed.world_size()) for i in range(len(layers))]
        if self.is_main_process:
            self._sim_record(layers, values, method, shapes, samples)
        return values

    # ------------------------------------------------------------- helpers
    def _sim_features(self, layer: Layer, captured: dict[int, Any], output_key: Any) -> torch.Tensor:
        if layer.id not in captured:
            raise BBDecoderValueError(
                f"get_sim: layer {layer.id} {layer.name!r} did not run during the forward pass, "
                "so it has no output to compare"
            )
        try:
            features = first_tensor(captured[layer.id], output_key)
        except (BBDecoderValueError, BBDecoderTypeError) as error:
            raise type(error)(f"get_sim: layer {layer.id} {layer.name!r}: {error}") from error
        if features.is_complex():
            raise BBDecoderTypeError(
                f"get_sim: layer {layer.id} {layer.name!r} returns a complex tensor; only real features are compared"
            )
        return features

    def _sim_history(self) -> list[dict[str, str]]:
        """Every row of ``similarity.csv`` as on disk: every call, earlier and other processes' too."""
        path = self.store.root / SIM_CSV
        if not path.is_file():
            return []
        with open(path, newline="", encoding="utf-8") as stream:
            return [dict(row) for row in csv.DictReader(stream)]

    def _sim_record(
        self,
        layers: list[Layer],
        values: dict[int, float],
        method: str,
        shapes: list[tuple[int, int, int]],
        samples: list[int],
    ) -> None:
        from ..plots.similarity import similarity_bar_figure, similarity_trend_figure

        call = layout.next_number(self.store, SECTION)
        stamp = now_iso()
        dim = shapes[0][0] if len({s[0] for s in shapes}) == 1 else "mixed"
        rows = [
            # the value in full (repr): the CSV is the record of the call
            [call, stamp, method, axis, layer.id, layer.name, repr(values[layer.id]), count, slices, size]
            for layer, (axis, slices, size), count in zip(layers, shapes, samples, strict=True)
        ]
        self._say(_format_values(layers, values, method, call, dim, samples[0]))

        labels = [f"{layer.id} {printable(layer.name)}" for layer in layers]
        bar = similarity_bar_figure(labels, [values[layer.id] for layer in layers], method, dim, call)
        self.store.save_figure(
            bar, layout.relative_path(SECTION, "bar", call=call), section=SECTION, meta={"call": call, "kind": "bar"}
        )
        # cumulative: rows are appended (never lost to another process), the trend is redrawn in place
        self.store.append_csv(SIM_CSV, CSV_COLUMNS, rows, section=SECTION, meta={"call": call, "kind": "csv"})
        self.store.save_figure(
            similarity_trend_figure(_trend_series(self._sim_history())),
            SIM_TREND,
            overwrite=True,
            section=SECTION,
            meta={"call": call, "kind": "trend"},
        )


def _as_int(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _trend_series(rows: list[dict[str, str]]) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """``{(method, dim): {layer label: [(call, value), ...]}}`` from CSV rows."""
    series: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        call = _as_int(row.get("call"))
        try:
            value = float(row.get("value", "nan"))
        except ValueError:
            continue
        if call is None:
            continue
        key = (row.get("method", "?"), row.get("dim", "?"))
        label = f"{row.get('layer_id', '?')} {printable(row.get('layer_name', ''))}"
        series.setdefault(key, {}).setdefault(label, []).append((call, value))
    return series


def _format_values(
    layers: list[Layer], values: dict[int, float], method: str, call: int, dim: Any, samples: int
) -> str:
    header = ["ID", "Name", _LABELS[method]]
    body = [[str(layer.id), printable(layer.name), f"{values[layer.id]:.6g}"] for layer in layers]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(3)]

    def render(line: list[str]) -> str:
        return f"{line[0].rjust(widths[0])}  {line[1].ljust(widths[1])}  {line[2].rjust(widths[2])}"

    title = f"get_sim call {call}: {method} between slices along dim {dim}, mean over {samples} sample(s)"
    rule = "-" * max(len(render(header)), len(title))
    return "\n".join([title, rule, render(header), rule, *map(render, body), rule])
