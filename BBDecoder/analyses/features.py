"""Intermediate features as pictures, and the video of their evolution over training.

:meth:`FeatureMixin.get_inter_features` adds one numbered *frame* per call (the raw array
as ``.npy`` and a picture) and records it in the store's manifest (section
``"features"``), so :meth:`FeatureMixin.compile_feature_evolution`, the report and a new
process on the same ``save_path`` find every frame of a layer, wherever it was saved.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core import checks
from ..core.layers import Layer
from ..core.model import first_tensor
from ..core.tree import as_call
from ..errors import (
    BBDecoderTypeError,
    BBDecoderValueError,
    BBDecoderWarning,
    LayerSelectionError,
    VideoWriteError,
)
from ..output import layout, video
from ..plots.features import ColorScale, color_scale, feature_figure, view_for
from ._base import AnalyzerBase

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FEATURES_SECTION = "features"
VIDEO_SECTION = "video"
DEFAULT_FOLDER = "features"
CONTACT_SHEET_MAX = 60  # frames on one contact sheet; longer runs are sampled evenly

PostProc = Callable[[torch.Tensor], Any]
Dim = int | Sequence[int] | None


class FeatureMixin(AnalyzerBase):
    """``get_inter_features``, ``compile_feature_evolution`` and ``feature_frames``."""

    def get_inter_features(
        self,
        test_input: Any,
        layer: int | str,
        path: str | os.PathLike[str] | None = None,
        post_proc: PostProc | None = None,
        dim: Dim = None,
        *,
        tag: str | int | float | None = None,
        all_samples: bool = False,
    ) -> list[Path]:
        """Save ``layer``'s output for ``test_input`` as one numbered frame.

        One forward pass runs in eval mode without gradients, with a hook on ``layer``
        only for that pass; every module's train/eval flag is restored afterwards. The
        layer's output for the first sample (each sample with ``all_samples``), without
        its batch axis, is passed through ``post_proc``, restricted to the channels
        ``dim``, and saved as ``frame_NNNN.npy`` (always) and ``frame_NNNN.png``:

        * ``(C, H, W)`` (and ``(C, D, H, W)``): a labelled grid of channel images;
        * ``(T, D)`` token outputs: a heatmap; ``(D,)``: a bar plot;
        * a 2-D array returned by ``post_proc``: shown as it is, as an image.

        A layer whose output is 1-D has no batch axis to drop; it is saved whole.

        Args:
            test_input: the model's input as it takes it (moved to its device): a tensor, a tuple of
                positional inputs, a dict of keyword inputs, or a list (one positional input).
            layer: the layer's ID or dotted name.
            path: the folder that receives ``{ID:03d}_{name}/``; default
                ``save_path/features``. A relative ``path`` is read relative to
                ``save_path`` (unless, read from the working directory, it already lies
                inside ``save_path`` or climbs out of it, ``"../saves"``); an absolute one is
                used as it is. A folder outside ``save_path`` is honoured and listed in
                its manifest, so the report shows it.
            post_proc: any callable taking the sample's output tensor (on the model's
                device, no batch axis) and returning a tensor or NumPy array.
            dim: channel/feature indices to keep: an int or a list of ints (negative
                count from the end). The channel axis is the first one of a ``(C, H, W)``
                map and of a ``(D,)`` vector, and the last one of a 2-D array.
            tag: the frame's caption, e.g. the epoch (default: the frame number).
            all_samples: keep every sample of the batch, not just the first.

        Returns:
            ``[picture, raw .npy]`` paths (``[]`` on ranks other than 0).

        Raises:
            LayerSelectionError: an unknown ``layer``, or one that did not run.
            BBDecoderTypeError: ``post_proc`` is not callable or returned something other
                than a tensor/array; ``dim`` or ``tag`` has the wrong type.
            BBDecoderValueError: a ``dim`` index out of range.
            SavePathError: ``path`` is empty or names a file (a folder outside
                ``save_path`` is honoured and listed in its manifest).
            OutputWriteError: a file could not be written (disk full, permission denied).
            ModelForwardError: the model raised.
        """
        target = self._layer(layer, "layer")
        if post_proc is not None and not callable(post_proc):
            raise BBDecoderTypeError(
                f"post_proc must be a callable (tensor → tensor or ndarray) or None, got "
                f"{type(post_proc).__name__} {post_proc!r:.80}"
            )
        indices = _check_dim(dim)
        _check_tag(tag)
        all_samples = checks.flag(all_samples, "all_samples")
        folder = self._features_folder(path)
        where = (target.id, target.name)

        _, outputs = self._capture(as_call(test_input), [target], "get_inter_features")
        if target.id not in outputs:
            raise LayerSelectionError(
                f"layer {target.id} {target.name!r} did not run during the forward pass of "
                "get_inter_features, so it has no features to save"
            )
        output = first_tensor(outputs[target.id], argument="layer")
        batch = [output] if output.ndim <= 1 else list(output[: None if all_samples else 1])
        with torch.no_grad():
            samples = [_post_process(sample, post_proc) for sample in batch]
        if len({s.shape for s in samples}) != 1:
            raise BBDecoderValueError(
                f"post_proc returned arrays of different shapes for the samples: {[s.shape for s in samples]}"
            )
        view = view_for(samples[0].ndim, from_post_proc=post_proc is not None)
        channels = None
        if indices is not None:
            samples, channels = _select_channels(samples, indices, view)
        raw = np.stack(samples) if all_samples else samples[0]
        if not self.store.enabled:
            return []

        frame = self._next_frame(target)
        tag_text = None if tag is None else str(tag)
        planned = layout.relative_path(FEATURES_SECTION, "raw", folder=folder, layer=where, frame=frame, tag=tag_text)
        raw_rel = self._free_name(planned)
        picture_rel = str(PurePosixPath(raw_rel).with_suffix(".png"))
        meta = {
            "layer_id": target.id,
            "layer_name": target.name,
            "frame": frame,
            "tag": _json_tag(tag),
            "view": view,
            "shape": list(raw.shape),
            "all_samples": bool(all_samples),
            "channels": channels,
        }
        raw_key = self.store.relative(self.store.root / raw_rel)  # how the manifest names it (``../`` outside)
        raw_path = self.store.write_npy(
            raw_rel, raw, section=FEATURES_SECTION, meta={**meta, "kind": "raw", "raw": raw_key}
        )
        figure = self._feature_figure(target, raw if all_samples else raw[None], meta, scale=None, dpi=100)
        picture = self.store.save_figure(
            figure,
            picture_rel,
            section=FEATURES_SECTION,
            meta={**meta, "kind": "picture", "raw": raw_key},
        )
        if picture is None or raw_path is None:  # the store writes on rank 0 only
            return []
        self._say(f"get_inter_features: layer {target.label} frame {frame} → {self.store.relative(picture)}")
        return [picture, raw_path]

    def compile_feature_evolution(
        self,
        layer: int | str,
        fps: float = 5,
        *,
        path: str | os.PathLike[str] | None = None,
        formats: Sequence[str] = ("mp4", "webm"),
    ) -> list[Path]:
        """Stitch every recorded frame of ``layer``, in order, into videos and a contact sheet.

        Frames are re-drawn from their raw ``.npy`` arrays with one colour scale for the
        whole run (so a change in brightness is a change in the features, not in the
        scaling), captioned with their tag, padded to one even size, and written as an
        ``.mp4`` (``mp4v``) and a ``.webm`` (VP8, which browsers play). Each video is
        read back and its frames counted before it is moved into place; a contact sheet
        PNG shows the frames where video does not play.

        Args:
            layer: the layer's ID or dotted name.
            fps: frames per second, a positive number.
            path: the output folder (default ``save_path/features``), read as for
                :meth:`get_inter_features`.
            formats: which videos to write: ``"mp4"``, ``"webm"`` or both.

        Returns:
            The paths written: the videos in ``formats`` order, then the contact sheet
            (``[]`` on ranks other than 0).

        Raises:
            LayerSelectionError: an unknown ``layer``.
            BBDecoderTypeError, BBDecoderValueError: ``fps`` is not a positive number;
                unknown ``formats``.
            VideoWriteError: no recorded frames, or a codec that cannot be opened or a
                video that does not read back (nothing is left behind).
            SavePathError: ``path`` is empty or names a file (a folder outside
                ``save_path`` is honoured and listed in its manifest).
            OutputWriteError: a file could not be written (disk full, permission denied).
        """
        target = self._layer(layer, "layer")
        rate = video.check_fps(fps)
        chosen = video.check_formats(formats)
        folder = self._features_folder(path)
        if not self.store.enabled:
            return []
        entries = self._frame_entries(target, kind="raw")
        arrays: list[np.ndarray] = []
        used: list[dict[str, Any]] = []
        for entry in entries:
            try:
                array = np.load(self.store.root / entry["path"], allow_pickle=False)
            except (OSError, ValueError) as error:
                warnings.warn(
                    f"compile_feature_evolution: skipping frame {entry.get('frame')} of layer {target.label}: "
                    f"cannot read {entry['path']!r} ({error})",
                    BBDecoderWarning,
                    stacklevel=2,
                )
                continue
            arrays.append(array if entry.get("all_samples") else array[None])
            used.append(entry)
        if not arrays:
            raise VideoWriteError(
                f"layer {target.id} {target.name!r} has no recorded feature frames in {str(self.store.root)!r}; "
                f"call get_inter_features(x, layer={target.id}) first (e.g. once per epoch)"
            )
        scale = color_scale(arrays)
        frames = video.FrameSequence()
        for array, entry in zip(arrays, used, strict=True):
            frames.append(video.figure_to_bgr(self._feature_figure(target, array, entry, scale=scale, dpi=100)))

        scratch: list[tuple[Path, str]] = []
        try:
            for name in chosen:
                suffix, fourcc = video.CODECS[name]
                file = self.store.scratch_file(suffix)
                scratch.append((file, name))
                video.encode(frames, file, rate, fourcc)
        except BaseException:
            for file, _ in scratch:
                file.unlink(missing_ok=True)
            raise

        call = layout.next_number(self.store, VIDEO_SECTION, layer_name=target.name)

        def where(kind: str) -> str:
            return layout.relative_path(VIDEO_SECTION, kind, folder=folder, layer=(target.id, target.name), call=call)

        base = {
            "layer_id": target.id,
            "layer_name": target.name,
            "call": call,
            "frames": len(frames),
            "fps": rate,
            "vmin": scale.vmin,
            "vmax": scale.vmax,
            "cmap": scale.cmap,
        }
        written: list[Path] = []
        for file, name in scratch:
            final = self.store.adopt(
                file,
                where(name),
                section=VIDEO_SECTION,
                meta={
                    **base,
                    "kind": name,
                },
            )
            if final is not None:
                written.append(final)
        sheet = self.store.write_bytes(
            where("contact_sheet"),
            video.png_bytes(video.contact_sheet(frames, max_tiles=CONTACT_SHEET_MAX)),
            section=VIDEO_SECTION,
            meta={**base, "kind": "contact_sheet", "frames": len(video.spread(len(frames), CONTACT_SHEET_MAX))},
        )
        if sheet is not None:
            written.append(sheet)
        self._say(
            f"compile_feature_evolution: layer {target.label}, {len(frames)} frames at {rate:g} fps → "
            + ", ".join(self.store.relative(p) for p in written)
        )
        return written

    def feature_frames(self, layer: int | str | None = None) -> list[dict[str, Any]]:
        """Every recorded feature frame (of one layer, or all), oldest first.

        Each item holds ``layer_id``, ``layer_name``, ``frame``, ``tag``, ``view`` and the
        absolute ``picture`` and ``raw`` paths; frames saved by an earlier process on the
        same ``save_path`` are included.
        """
        target = None if layer is None else self._layer(layer, "layer")
        frames = []
        pictures = {e.get("raw"): e for e in self.store.outputs(FEATURES_SECTION) if e.get("kind") == "picture"}
        for entry in self.store.outputs(FEATURES_SECTION):
            if entry.get("kind") != "raw" or (target is not None and entry.get("layer_name") != target.name):
                continue
            picture = pictures.get(entry["path"])
            frames.append(
                {
                    "layer_id": entry.get("layer_id"),
                    "layer_name": entry.get("layer_name"),
                    "frame": entry.get("frame"),
                    "tag": entry.get("tag"),
                    "view": entry.get("view"),
                    "picture": None if picture is None else self.store.root / picture["path"],
                    "raw": self.store.root / entry["path"],
                }
            )
        frames.sort(key=lambda f: (str(f["layer_name"]), f["frame"] or 0))
        return frames

    # ------------------------------------------------------------- helpers
    def _features_folder(self, path: str | os.PathLike[str] | None) -> Path:
        """``path`` as a folder relative to ``save_path`` (see ``get_inter_features``)."""
        return self.store.subfolder(path, "path", default=DEFAULT_FOLDER)

    def _free_name(self, relative: str) -> str:
        """``relative`` (a ``.npy``), or ``…-1.npy``… so that neither it nor its ``.png`` exists yet.

        Frame numbers come from the manifest; this only matters when two processes record
        the same layer at once.
        """
        path = PurePosixPath(relative)
        candidate, counter = path, 0
        while any((self.store.root / candidate.with_suffix(s)).exists() for s in (".npy", ".png")):
            counter += 1
            candidate = path.with_name(f"{path.stem}-{counter}{path.suffix}")
        return candidate.as_posix()

    def _frame_entries(self, target: Layer, *, kind: str) -> list[dict[str, Any]]:
        entries = [
            e
            for e in self.store.outputs(FEATURES_SECTION)
            if e.get("kind") == kind and e.get("layer_name") == target.name
        ]
        return sorted(entries, key=lambda e: (int(e.get("frame") or 0), str(e.get("time", ""))))

    def _next_frame(self, target: Layer) -> int:
        return layout.next_number(self.store, FEATURES_SECTION, kind="raw", layer_name=target.name)

    def _feature_figure(
        self,
        target: Layer,
        array: np.ndarray,
        meta: dict[str, Any],
        *,
        scale: ColorScale | None,
        dpi: int,
    ) -> Figure:
        tag = meta.get("tag")
        title = f"layer {target.id} {target.name}  ·  frame {meta.get('frame')}"
        if tag is not None:
            title += f"  ·  {tag}" if isinstance(tag, str) else f"  ·  tag {tag}"
        notes = []
        channels = meta.get("channels")
        if channels is not None:
            notes.append(f"channels {_short_list(channels)} selected")
        subtitle = ", ".join(notes)
        return feature_figure(
            array, meta["view"], title=title, subtitle=subtitle, channels=channels, scale=scale, dpi=dpi
        )


# ----------------------------------------------------------------- checks
def _check_dim(dim: Any) -> list[int] | None:
    if dim is None:
        return None
    items = [dim] if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) else dim
    if not isinstance(items, (list, tuple, range)) or not items:
        raise BBDecoderTypeError(
            "dim must be an int or a non-empty list of ints (channel indices to keep), "
            f"got {type(dim).__name__} {dim!r}"
        )
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in items):
        raise BBDecoderTypeError(f"dim must hold ints (channel indices to keep), got dim={dim!r}")
    return [int(i) for i in items]


def _check_tag(tag: Any) -> None:
    if tag is not None and (isinstance(tag, bool) or not isinstance(tag, (str, int, float, np.integer, np.floating))):
        raise BBDecoderTypeError(f"tag must be a str or a number (e.g. the epoch), got {type(tag).__name__} {tag!r}")


def _json_tag(tag: Any) -> Any:
    return tag.item() if isinstance(tag, np.generic) else tag


def _post_process(sample: torch.Tensor, post_proc: PostProc | None) -> np.ndarray:
    """One sample, through ``post_proc``, as a float NumPy array."""
    result: Any = sample if post_proc is None else post_proc(sample)
    if isinstance(result, torch.Tensor):
        result = result.detach()
        if result.is_complex():
            raise BBDecoderTypeError(
                "the features are complex; pass post_proc=lambda t: t.abs() (or .real) to save real values"
            )
        array = result.to(torch.float64 if result.dtype == torch.float64 else torch.float32).cpu().numpy()
    elif isinstance(result, np.ndarray):
        if result.dtype.kind not in "biuf":
            raise BBDecoderTypeError(
                f"post_proc returned an ndarray of dtype {result.dtype}; it must hold real numbers"
            )
        array = result.astype(np.float64 if result.dtype == np.float64 else np.float32)
    else:
        name = getattr(post_proc, "__name__", type(post_proc).__name__)
        raise BBDecoderTypeError(
            f"post_proc must return a torch.Tensor or numpy.ndarray; post_proc {name!r} returned "
            f"{type(result).__name__}"
        )
    return array.reshape(1) if array.ndim == 0 else array


def _select_channels(samples: list[np.ndarray], indices: list[int], view: str) -> tuple[list[np.ndarray], list[int]]:
    """Keep ``indices`` along the channel axis (first; last for 2-D arrays)."""
    axis = -1 if samples[0].ndim == 2 else 0
    size = samples[0].shape[axis]
    bad = [i for i in indices if not -size <= i < size]
    if bad:
        raise BBDecoderValueError(
            f"dim={indices if len(indices) > 1 else indices[0]!r}: index {bad[0]} is out of range for "
            f"{size} channels/features (valid: 0..{size - 1}, or -{size}..-1); the {view} values have "
            f"shape {samples[0].shape}"
        )
    kept = list(dict.fromkeys(i % size for i in indices))
    return [np.take(s, kept, axis=axis) for s in samples], kept


def _short_list(values: Sequence[int], limit: int = 8) -> str:
    text = ", ".join(map(str, values[:limit]))
    return f"[{text}{', …' if len(values) > limit else ''}]"
