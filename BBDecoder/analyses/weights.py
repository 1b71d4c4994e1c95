"""Weight histograms over training (issue: weights and similarity).

Histograms and statistics are computed on the parameters' device, in blocks of at most
``chunk`` elements, without a single host synchronisation; the results of every tensor of
every selected layer are then moved to the host in one copy per device. A bin holds
``edges[i] <= w < edges[i+1]`` (the last bin also holds its right edge), as in
``numpy.histogram``; the edges span the finite minimum to maximum of the tensor.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core import checks, distributed
from ..core.layers import Layer, Selector, tied_names
from ..core.model import accumulator_dtype
from ..errors import BBDecoderTypeError, BBDecoderValueError, WeightHistogramWarning
from ..output import layout
from ._base import AnalyzerBase
from .histograms import PILE_UP, SATURATION, LayerHistograms, ParamHistogram

DEFAULT_CHUNK = 1 << 24
"""Largest number of elements of one parameter handled at once (as float64: 128 MiB)."""

__all__ = [
    "PILE_UP",
    "SATURATION",
    "LayerHistograms",
    "ParamHistogram",
    "WeightMixin",
    "collect_histograms",
    "histogram_arrays",
    "load_histograms",
    "tensor_histogram",
]

SECTION = "weights"
_STATS = ("numel", "finite", "sum", "sum_squares", "mean", "std", "min", "max", "zeros", "saturated")


# ------------------------------------------------------------------ computation
def tensor_histogram(tensor: torch.Tensor, bins: int, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Statistics, bin edges and counts of ``tensor``, as one vector on its device.

    On an accelerator (and for CPU tensors above ``chunk`` elements), two passes over
    blocks of ``chunk`` elements, never a host synchronisation: the first
    finds the finite range, sums, and zero count; the second bins (then ``scatter_add_``:
    unlike ``torch.histc`` or ``bincount``,
    neither needs the range on the host; the bin comes from the equal widths, then a one-step
    correction against the exact edges) and counts saturated elements. A tensor with a
    single value gets edges ``value ± 0.5``, as ``numpy.histogram`` does. A CPU tensor of
    at most ``chunk`` elements is done by numpy instead, with the same arithmetic (there is no
    device to stay on, and a few numpy calls cost far less than forty small torch ops).

    Saturation: let the finite elements span ``[lo, hi]``, ``W = hi - lo``, ``A = max|w|``
    and ``n`` the finite count. Each end has a band of width ``e·W``, ``e = (1 - SATURATION)
    / 2`` (0.5%): ``[lo, lo + e·W]`` and ``[hi - e·W, hi]``; for a range symmetric about 0
    that is exactly ``|w| >= 0.99·max|w|``. An even spread over the range puts
    ``λ = e·n`` elements in a band. An end *piles up* when its band holds, besides the
    extreme element itself (always there), more than ``PILE_UP·λ + 3·sqrt(λ) + 1``
    elements: four times the even share, with a margin that keeps chance clusters of small
    tensors out (a 16-element bias has ``λ = 0.08`` and needs 3 more). The saturated count
    is the number of elements in the bands that pile up. It is 0 for a *narrow* tensor,
    whose whole range lies within 1% of its largest magnitude (``W <= (1 - SATURATION)·A``:
    a constant, or a norm layer's γ ≈ 1 ± 1e-4), where the bands are noise around one
    value, not limits the weights are pressed against. Bell-shaped and uniform tensors
    (every default initialisation) thin out or stay flat towards their ends and are not
    flagged; clipped, binarised or sign-quantised weights, and weights held at a max-norm
    limit, are.

    Args:
        tensor: any real tensor (a parameter).
        bins: number of equal-width bins.
        chunk: elements per block.

    Returns:
        ``[*stats, *edges, *counts]`` with ``stats`` in the order of ``_STATS``: a float64
        (float32 on MPS) vector of ``len(_STATS) + 2 * bins + 1`` elements.
    """
    flat = tensor.detach().reshape(-1)
    if flat.device.type == "cpu" and flat.numel() <= chunk:
        # on the CPU there is no device to stay on: numpy does the same arithmetic in a few
        # calls instead of some forty small torch ops (the overhead that dominated small tensors)
        native = flat.dtype in (torch.float64, torch.float32, torch.float16)  # numpy reads these as they are
        return torch.from_numpy(_host_histogram((flat if native else flat.to(torch.float64)).numpy(), bins))
    dtype = accumulator_dtype(flat.device)

    def zero() -> torch.Tensor:
        return torch.zeros((), dtype=dtype, device=flat.device)

    finite, total, squares, zeros = zero(), zero(), zero(), zero()
    low = torch.full((), float("inf"), dtype=dtype, device=flat.device)
    high = torch.full((), -float("inf"), dtype=dtype, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        block = flat[start : start + chunk].to(dtype)
        ok = torch.isfinite(block)
        clean = torch.where(ok, block, 0)
        finite += ok.sum()
        zeros += (block == 0).sum()
        total += clean.sum()
        squares += clean.square().sum()
        low = torch.minimum(low, torch.where(ok, block, float("inf")).amin())
        high = torch.maximum(high, torch.where(ok, block, -float("inf")).amax())
    has_values = finite > 0
    data_min = torch.where(has_values, low, float("nan"))
    data_max = torch.where(has_values, high, float("nan"))
    low = torch.where(has_values, low, 0)
    high = torch.where(has_values, high, 0)
    flat_range = high <= low
    first = torch.where(flat_range, low - 0.5, low)
    last = torch.where(flat_range, high + 0.5, high)
    # numpy.linspace's arithmetic (i * step + first, the last edge exact), as numpy.histogram's own bins
    edges = torch.arange(bins + 1, dtype=dtype, device=flat.device) * ((last - first) / bins) + first
    edges[-1] = last
    mean = total / finite.clamp_min(1)
    abs_max = torch.maximum(low.abs(), high.abs())
    band = (1.0 - SATURATION) / 2 * (high - low)
    low_band, high_band = low + band, high - band
    counts = torch.zeros(bins + 1, dtype=torch.int64, device=flat.device)  # last: non-finite
    centred, at_low, at_high = zero(), zero(), zero()
    scale = bins / (last - first)
    for start in range(0, flat.numel(), chunk):
        block = flat[start : start + chunk].to(dtype)
        ok = torch.isfinite(block)
        # the bin from the equal widths, then a step to the exact edges where rounding put a value
        # one bin off: numpy's convention, at a fraction of bucketize's binary search
        guess = torch.where(ok, (block - first) * scale, 0).floor_().clamp_(0, bins - 1).to(torch.int64)
        guess -= (block < edges[guess]).to(torch.int64)
        guess += ((block >= edges[guess + 1]) & (guess < bins - 1)).to(torch.int64)
        index = torch.where(ok, guess, bins)
        counts.scatter_add_(0, index, torch.ones_like(index))
        centred += torch.where(ok, block - mean, 0).square().sum()
        at_low += (ok & (block <= low_band)).sum()
        at_high += (ok & (block >= high_band)).sum()
    std = (centred / finite.clamp_min(1)).sqrt()
    narrow = (high - low) <= (1.0 - SATURATION) * abs_max  # also: constant, all zero, nothing finite
    even = (1.0 - SATURATION) / 2 * finite  # elements an even spread over the range puts in a band
    enough = PILE_UP * even + 3.0 * even.sqrt() + 1.0  # extra elements that are no chance cluster

    def piled(count: torch.Tensor) -> torch.Tensor:
        return torch.where(count - 1 > enough, count, 0)

    saturated = torch.where(narrow, 0, piled(at_low) + piled(at_high)).to(dtype)
    numel = torch.full((), flat.numel(), dtype=dtype, device=flat.device)
    stats = torch.stack([numel, finite, total, squares, mean, std, data_min, data_max, zeros, saturated])
    return torch.cat([stats, edges, counts[:bins].to(dtype)])


_HOST_BLOCK = 1 << 18
"""Elements per block of the host path (2 MiB as float64: temporaries stay in cache, no fresh pages)."""


def _host_histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """:func:`tensor_histogram` of a host float array: the same statistics, edges, counts and saturation.

    Two passes over blocks of :data:`_HOST_BLOCK` elements, each cast to float64 on its own.
    """

    def blocks() -> Iterator[np.ndarray]:
        for start in range(0, values.size, _HOST_BLOCK):
            block = values[start : start + _HOST_BLOCK].astype(np.float64, copy=False)
            ok = np.isfinite(block)
            yield block if ok.all() else block[ok]

    single = values.size <= _HOST_BLOCK
    cached = list(blocks()) if single else None  # one block: clean it once for both passes
    finite, zeros, total, squares = 0, 0, 0.0, 0.0
    low, high = math.inf, -math.inf
    for clean in cached if cached is not None else blocks():
        if clean.size:
            finite += clean.size
            zeros += int(np.count_nonzero(clean == 0))
            low, high = min(low, float(clean.min())), max(high, float(clean.max()))
            total += float(clean.sum())
            squares += float(np.dot(clean, clean))
    nan = float("nan")
    if finite:
        mean = total / finite
        data_min, data_max = low, high
    else:
        low = high = mean = 0.0
        data_min = data_max = nan
    first, last = (low - 0.5, high + 0.5) if high <= low else (low, high)
    edges = np.linspace(first, last, bins + 1)
    band = (1.0 - SATURATION) / 2 * (high - low)
    counts = np.zeros(bins, dtype=np.int64)
    centred, at_low, at_high = 0.0, 0, 0
    for clean in cached if cached is not None else blocks():
        if clean.size:
            offset = clean - mean
            centred += float(np.dot(offset, offset))
            # numpy's equal-width path: the same arithmetic as on the device (numpy.linspace's edges)
            counts += np.histogram(clean, bins=bins, range=(first, last))[0]
            at_low += int(np.count_nonzero(clean <= low + band))
            at_high += int(np.count_nonzero(clean >= high - band))
    std = math.sqrt(centred / finite) if finite else 0.0
    even = (1.0 - SATURATION) / 2 * finite
    enough = PILE_UP * even + 3.0 * math.sqrt(even) + 1.0
    narrow = (high - low) <= (1.0 - SATURATION) * max(abs(low), abs(high))
    saturated = 0.0 if narrow else float(sum(c for c in (at_low, at_high) if c - 1 > enough))
    stats = [float(values.size), float(finite), total, squares, mean, std, data_min, data_max, float(zeros), saturated]
    return np.concatenate([np.asarray(stats, dtype=np.float64), edges, counts.astype(np.float64)])


def _unpack(
    name: str, shape: tuple[int, ...], vector: np.ndarray, bins: int, tied: tuple[str, ...] = ()
) -> ParamHistogram:
    stats = dict(zip(_STATS, vector[: len(_STATS)].tolist(), strict=True))
    edges = vector[len(_STATS) : len(_STATS) + bins + 1].astype(np.float64)
    counts = np.rint(vector[len(_STATS) + bins + 1 :]).astype(np.int64)
    numel = int(stats["numel"])
    return ParamHistogram(
        name=name,
        shape=shape,
        edges=edges,
        counts=counts,
        numel=numel,
        finite=int(stats["finite"]),
        mean=stats["mean"] if stats["finite"] else float("nan"),
        std=stats["std"] if stats["finite"] else float("nan"),
        min=stats["min"],
        max=stats["max"],
        sum=stats["sum"],
        sum_squares=stats["sum_squares"],
        zeros_fraction=stats["zeros"] / numel if numel else 0.0,
        saturation_fraction=stats["saturated"] / numel if numel else 0.0,
        tied=tied,
    )


def layer_parameters(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Named parameters of ``module`` (recursively) that hold values; lazy ones are left out."""
    return [
        (name, p)
        for name, p in module.named_parameters()
        if not isinstance(p, nn.parameter.UninitializedParameter) and p.numel() > 0 and not p.is_complex()
    ]


def collect_histograms(
    layers: Sequence[Layer],
    bins: int,
    call: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    grads: bool = False,
    names: Mapping[int, Sequence[str]] | None = None,
) -> list[LayerHistograms]:
    """Histograms of every parameter tensor of ``layers``; one host copy per device.

    A tensor is histogrammed once per call however many selected layers hold it (a
    container and its children, or weights tied under two names).

    Args:
        layers: layers that all have parameters.
        bins: bins per histogram.
        call: the call number recorded in the result.
        chunk: elements per block (see :func:`tensor_histogram`).
        grads: histograms of the parameters' current ``.grad`` instead (parameters
            without one, or whose gradient is an FSDP2 shard, are left out).
        names: ``{id(parameter): every full name}`` of the parameters registered under
            more than one name (``tied_names``); each result lists the others in ``tied``.

    Returns:
        One :class:`LayerHistograms` per layer, parameters in ``named_parameters`` order.
    """
    vectors: dict[torch.device, list[torch.Tensor]] = {}
    row_of: dict[int, tuple[torch.device, int]] = {}
    places: list[tuple[LayerHistograms, str, tuple[int, ...], tuple[torch.device, int], tuple[str, ...]]] = []
    results = []
    for layer in layers:
        entry = LayerHistograms(layer.id, layer.name, layer.type, call)
        results.append(entry)
        for name, param in layer_parameters(layer.module):
            if grads and (param.grad is None or distributed.is_dtensor(param.grad)):
                continue  # a shard's histogram would mislead, and rank 0 alone cannot gather it
            if id(param) not in row_of:
                tensor = param.grad if grads else distributed.full_tensor(param)
                queue = vectors.setdefault(param.device, [])
                row_of[id(param)] = (param.device, len(queue))
                queue.append(tensor_histogram(tensor, bins, chunk=chunk))
            full = f"{layer.name}.{name}"
            others = tuple(other for other in (names or {}).get(id(param), ()) if other != full)
            places.append((entry, name, tuple(param.shape), row_of[id(param)], others))
    host = {device: torch.stack(queue).cpu().double().numpy() for device, queue in vectors.items()}
    for entry, name, shape, (device, row), others in places:
        entry.params.append(_unpack(name, shape, host[device][row], bins, tied=others))
    return results


# ------------------------------------------------------------------ saved data
def histogram_arrays(layer: LayerHistograms) -> dict[str, np.ndarray]:
    """The arrays saved in a call's ``.npz`` (loadable with ``allow_pickle=False``)."""
    params = layer.params
    return {
        "call": np.asarray(layer.call),
        "layer_id": np.asarray(layer.layer_id),
        "layer_name": np.asarray(layer.layer_name),
        "layer_type": np.asarray(layer.layer_type),
        "param_names": np.asarray([p.name for p in params], dtype=str),
        "shapes": np.asarray(["x".join(map(str, p.shape)) for p in params], dtype=str),
        "tied": np.asarray([json.dumps(list(p.tied)) for p in params], dtype=str),  # names may hold spaces
        "edges": np.stack([p.edges for p in params]),
        "counts": np.stack([p.counts for p in params]),
        **{
            key: np.asarray([getattr(p, key) for p in params])
            for key in (
                "numel",
                "finite",
                "mean",
                "std",
                "min",
                "max",
                "sum",
                "sum_squares",
                "zeros_fraction",
                "saturation_fraction",
            )
        },
    }


def load_histograms(path: str | os.PathLike[str]) -> LayerHistograms:
    """Read back a ``.npz`` written by :meth:`WeightMixin.visualize_weight_hist`."""
    with np.load(path, allow_pickle=False) as data:
        layer = LayerHistograms(
            int(data["layer_id"]), str(data["layer_name"]), str(data["layer_type"]), int(data["call"])
        )
        tied = data["tied"].tolist() if "tied" in data else ["[]"] * len(data["param_names"])  # not before 0.2
        for i, name in enumerate(data["param_names"].tolist()):
            shape = tuple(int(d) for d in str(data["shapes"][i]).split("x") if d)
            layer.params.append(
                ParamHistogram(
                    name=name,
                    shape=shape,
                    edges=data["edges"][i],
                    counts=data["counts"][i],
                    numel=int(data["numel"][i]),
                    finite=int(data["finite"][i]),
                    mean=float(data["mean"][i]),
                    std=float(data["std"][i]),
                    min=float(data["min"][i]),
                    max=float(data["max"][i]),
                    sum=float(data["sum"][i]),
                    sum_squares=float(data["sum_squares"][i]),
                    zeros_fraction=float(data["zeros_fraction"][i]),
                    saturation_fraction=float(data["saturation_fraction"][i]),
                    tied=tuple(json.loads(str(tied[i]))),
                )
            )
    return layer


# ------------------------------------------------------------------------ mixin
class WeightMixin(AnalyzerBase):
    """``visualize_weight_hist``: weight distributions per layer, call after call.

    Per selected layer, in ``<save_folder>/<ID>_<name>/`` (default ``save_path/weights/``):

    - ``hist_call{k:03d}.png``: one panel per parameter tensor, with statistics;
    - ``hist_call{k:03d}.npz``: that call's edges, counts and statistics
      (:func:`histogram_arrays`, read back with :func:`load_histograms`);
    - ``evolution.png``: a ridge plot of every call so far, per tensor. It is redrawn in
      place each call (every number in it is in the ``.npz`` files) and continues the
      history found in the manifest when a new analyzer opens the same ``save_path``.

    Manifest section ``"weights"``, meta ``{"layer_id", "layer_name", "call",
    "kind": "histogram" | "evolution" | "data"}``; ``evolution.png`` gets one entry, when
    first written.
    """

    _weight_calls: int | None
    _weight_history: dict[str, list[LayerHistograms]]

    def _init_weights(self) -> None:
        self._weight_calls = None  # continued from the manifest on first use
        self._weight_history = {}

    def visualize_weight_hist(
        self,
        layer_inds: Selector | None = None,
        save_folder: str | os.PathLike[str] | None = None,
        *,
        bins: int = 100,
    ) -> list[Path]:
        """Save weight histograms of the selected layers, and their evolution over calls.

        Histograms are computed on the model's device; only edges, counts and statistics
        reach the host. Call it once per epoch to watch drift, saturation and collapse.
        After each call the ``weights_histogram`` event carries the histograms (TensorBoard).

        Args:
            layer_inds: layer IDs or names (one or a list); a container layer (a
                Sequential block, a ResNet stage) shows all its parameters. ``None`` (the
                default): every numbered layer that holds parameters.
            save_folder: the folder (default ``save_path/weights``); relative to
                ``save_path``, or absolute; a folder outside ``save_path`` is honoured and
                listed in its manifest.
            bins: equal-width bins per histogram.

        Returns:
            The paths written, per layer: histogram figure, data, evolution figure
            (empty off rank 0, where nothing is written).

        Raises:
            BBDecoderTypeError: ``bins`` is not an int, or ``save_folder`` not a path.
            BBDecoderValueError: ``bins < 1``, or no selected layer has parameters.
            LayerSelectionError: ``layer_inds`` selects no layer.
            SavePathError: ``save_folder`` is empty or names a file (a folder outside
                ``save_path`` is honoured and listed in its manifest).
            OutputWriteError: a file could not be written (disk full, permission denied).
        """
        if isinstance(bins, bool) or not isinstance(bins, int):
            raise BBDecoderTypeError(f"bins must be a positive int, got {bins!r}")
        if bins < 1:
            raise BBDecoderValueError(f"bins must be at least 1, got bins={bins}")
        checks.integer(bins, "bins", low=1)  # and not so many that the histograms would not fit
        folder = self.store.subfolder(save_folder, "save_folder", default=SECTION)
        every = layer_inds is None  # every layer with parameters: the parameter-free ones are not asked for
        chosen = list(self.layers) if every else self._select(layer_inds, "layer_inds")
        layers = [layer for layer in chosen if layer_parameters(layer.module)]
        empty = [] if every else [layer for layer in chosen if layer not in layers]
        if not layers and every:
            raise BBDecoderValueError("visualize_weight_hist: no layer of the model holds parameters")
        if not layers:
            listed = ", ".join(f"{layer.id} {layer.name!r}" for layer in empty)
            raise BBDecoderValueError(f"visualize_weight_hist: none of the selected layers has parameters ({listed})")
        if empty:
            listed = ", ".join(f"{layer.id} {layer.name!r} ({layer.type})" for layer in empty)
            warnings.warn(
                f"visualize_weight_hist: skipping layers without parameters: {listed}",
                WeightHistogramWarning,
                stacklevel=2,
            )
        # FSDP2 shards parameters: every rank joins the gathers of full tensors, rank 0 draws
        if not distributed.is_sharded(self.inner) and not self.is_main_process:
            return []
        call = self._next_weight_call()
        names = tied_names(self.inner)
        results = collect_histograms(layers, bins, call, names=names)
        if not self.is_main_process:
            return []
        written = self._write_histograms(results, folder)
        if self.events.wanted("weights_histogram"):
            grads = collect_histograms(layers, bins, call, grads=True, names=names)
            self.events.emit("weights_histogram", call=call, weights=results, grads=grads)
        self._say(
            f"visualize_weight_hist call {call}: {sum(len(r.params) for r in results)} tensors of "
            f"{len(results)} layer(s) → {self.store.root / folder}"
        )
        return written

    # ------------------------------------------------------------- helpers
    def _next_weight_call(self) -> int:
        if self._weight_calls is None:
            self._weight_calls = layout.next_number(self.store, SECTION) - 1
        self._weight_calls += 1
        return self._weight_calls

    def _weight_history_of(self, name: str) -> list[LayerHistograms]:
        """Earlier calls of the layer named ``name``: from memory, else from the manifest."""
        if name not in self._weight_history:
            earlier: list[LayerHistograms] = []
            for entry in self.store.outputs(SECTION):
                if entry.get("kind") != "data" or entry.get("layer_name") != name:
                    continue
                try:
                    earlier.append(load_histograms(self.store.root / entry["path"]))
                except (OSError, ValueError, KeyError) as error:
                    warnings.warn(
                        f"weight history: cannot read {entry['path']!r} ({error}); left out of the evolution figure",
                        WeightHistogramWarning,
                        stacklevel=4,
                    )
            self._weight_history[name] = sorted(earlier, key=lambda h: h.call)
        return self._weight_history[name]

    def _write_histograms(self, results: Sequence[LayerHistograms], folder: Path) -> list[Path]:
        """Per layer: the call's figure, its ``.npz`` and the evolution figure redrawn, in that order.

        The figures of all layers are drawn first, together (shared with the figure helper,
        :mod:`BBDecoder.plots.helper`). A figure that failed raises where its file would go,
        after the files of the layers before it and its own layer's ``.npz``.
        """
        from ..plots.helper import draw_pngs
        from ..plots.weights import evolution_calls, weight_evolution_figure, weight_histogram_figure

        jobs = []
        for result in results:  # the history grows once the call's data is on disk
            history = [*self._weight_history_of(result.layer_name), result]
            drawn = (evolution_calls(history), len(history))  # the calls drawn: sent to the helper, whatever the count
            jobs += [(weight_histogram_figure, (result,)), (weight_evolution_figure, drawn)]
        pngs = iter(draw_pngs(jobs))
        written: list[Path] = []
        for result in results:
            layer = (result.layer_id, result.layer_name)
            meta = {"layer_id": result.layer_id, "layer_name": result.layer_name, "call": result.call}

            def where(kind: str, result: LayerHistograms = result, layer: tuple[int, str] = layer) -> str:
                return layout.relative_path(SECTION, kind, folder=folder, layer=layer, call=result.call)

            histogram, evolution = next(pngs), next(pngs)
            paths = []
            if not isinstance(histogram, Exception):
                paths.append(self._write_png(histogram, where("histogram"), meta={**meta, "kind": "histogram"}))
            paths.append(self._write_npz(result, where("data"), meta={**meta, "kind": "data"}))
            if isinstance(histogram, Exception):
                raise histogram  # the call's numbers are on disk: only its picture is missing
            # redrawn in place each call; the store keeps the manifest entry of its first write
            meta["kind"] = "evolution"
            paths.append(self._write_png(evolution, where("evolution"), meta=meta, overwrite=True))
            written += [p for p in paths if p is not None]
        return written

    def _write_npz(self, result: LayerHistograms, relative: str, **kwargs: Any) -> Path | None:
        path = self.store.write_npz(relative, histogram_arrays(result), section=SECTION, **kwargs)
        self._weight_history_of(result.layer_name).append(result)
        return path

    def _write_png(self, png: bytes | Exception, relative: str, **kwargs: Any) -> Path | None:
        if isinstance(png, Exception):
            raise png
        return self.store.write_bytes(relative, png, section=SECTION, **kwargs)
