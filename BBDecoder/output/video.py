"""Frames → video files with OpenCV, verified by reading them back.

OpenCV's pip wheel has no H.264 encoder, so two codecs it does ship are used: ``mp4v``
(MPEG-4 Part 2 in an ``.mp4``: plays in VLC and most desktop players) and ``VP80``
(VP8 in a ``.webm``: plays in every modern browser, hence in the HTML report).

Nothing here knows about models or the store: :func:`encode` writes to a path it is
given (a scratch file) and deletes it again if the result is not a readable video with
every frame in it.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from ..errors import BBDecoderTypeError, BBDecoderValueError, VideoWriteError
from ..plots import spread

# format name → (file suffix, OpenCV fourcc)
CODECS: dict[str, tuple[str, str]] = {"mp4": (".mp4", "mp4v"), "webm": (".webm", "VP80")}


def check_fps(fps: object) -> float:
    """``fps`` as a float, or a clear error.

    Raises:
        BBDecoderTypeError: ``fps`` is not a real number (or is a bool).
        BBDecoderValueError: ``fps`` is zero, negative, NaN or infinite.
    """
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)):
        raise BBDecoderTypeError(
            f"fps must be a positive number of frames per second, got {type(fps).__name__} {fps!r}"
        )
    value = float(fps)
    if not math.isfinite(value) or value <= 0:
        raise BBDecoderValueError(f"fps must be a positive, finite number of frames per second, got fps={fps!r}")
    return value


def check_formats(formats: object) -> list[str]:
    """The requested video formats (``"mp4"``, ``"webm"``), validated and de-duplicated."""
    if isinstance(formats, str):
        formats = [formats]
    if not isinstance(formats, (list, tuple)) or not formats:
        raise BBDecoderValueError(f"formats must be a non-empty list of {sorted(CODECS)}, got {formats!r}")
    chosen: list[str] = []
    for name in formats:
        if name not in CODECS:
            raise BBDecoderValueError(f"formats: unknown video format {name!r}; choose from {sorted(CODECS)}")
        if name not in chosen:
            chosen.append(name)
    return chosen


def equalize(frames: Sequence[np.ndarray], background: int = 255) -> list[np.ndarray]:
    """Pad every frame to one common size with even width and height (codecs need both).

    Frames are centred on a ``background`` canvas; grayscale and BGRA frames become BGR.

    Args:
        frames: ``uint8`` images, ``(H, W)``, ``(H, W, 3)`` (BGR) or ``(H, W, 4)`` (BGRA).
        background: the padding's grey level.

    Returns:
        ``(H, W, 3)`` ``uint8`` BGR frames of one size.
    """
    bgr = [_to_bgr(frame) for frame in frames]
    if not bgr:
        return []
    size = _even_size(f.shape for f in bgr)
    return [_pad(frame, size, background) for frame in bgr]


class FrameSequence(Sequence[np.ndarray]):
    """Frames kept PNG-compressed in memory and padded to one even size when read.

    A run of a few hundred rendered frames would otherwise hold gigabytes of pixels; this
    keeps about a tenth of that and hands out one padded BGR frame at a time, so it can be
    given to :func:`encode` and :func:`contact_sheet` like a list.

    Args:
        background: the padding's grey level.
    """

    def __init__(self, background: int = 255) -> None:
        self._encoded: list[bytes] = []
        self._shapes: list[tuple[int, ...]] = []
        self._background = background

    def append(self, frame: np.ndarray) -> None:
        """Add one ``uint8`` image (see :func:`equalize` for the accepted layouts)."""
        bgr = _to_bgr(frame)
        self._encoded.append(png_bytes(bgr, fast=True))
        self._shapes.append(bgr.shape)

    @property
    def size(self) -> tuple[int, int]:
        """``(height, width)`` of every frame handed out: the largest, rounded up to even."""
        return _even_size(self._shapes)

    def __len__(self) -> int:
        return len(self._encoded)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        import cv2

        raw = np.frombuffer(self._encoded[index], dtype=np.uint8)
        return _pad(cv2.imdecode(raw, cv2.IMREAD_COLOR), self.size, self._background)


def encode(frames: Sequence[np.ndarray], target: str | os.PathLike[str], fps: float, fourcc: str) -> int:
    """Write ``frames`` to ``target`` and check the result by reading it back.

    Args:
        frames: BGR ``uint8`` frames of one even size (a list from :func:`equalize` or a
            :class:`FrameSequence`).
        target: the file to write (its suffix picks the container).
        fps: frames per second.
        fourcc: the OpenCV codec code, e.g. ``"mp4v"``.

    Returns:
        The number of frames read back (equal to ``len(frames)``).

    Raises:
        VideoWriteError: no frames, frames of unequal size, the codec cannot be opened,
            or the file does not read back with every frame; ``target`` is then removed.
    """
    import cv2

    target = Path(target)
    if len(frames) == 0:
        _remove(target)
        raise VideoWriteError(f"no frames to write to {target.name}")
    height, width = frames[0].shape[:2]
    try:
        with _quiet_opencv(), _silenced_stderr():
            writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*fourcc), float(fps), (width, height), True)
            if not writer.isOpened():
                raise VideoWriteError(
                    f"OpenCV could not open the {fourcc!r} encoder for a {target.suffix} file of {width}×{height} "
                    "pixels (this OpenCV build may lack the codec); choose other formats= or install "
                    "opencv-python-headless from PyPI"
                )
            try:
                for frame in frames:
                    if frame.shape != (height, width, 3) or frame.dtype != np.uint8:
                        raise VideoWriteError(
                            f"every frame must be a uint8 BGR image of {width}×{height} pixels, got "
                            f"{frame.dtype} {frame.shape}; pad them with equalize() or FrameSequence"
                        )
                    writer.write(frame)
            finally:
                writer.release()
            count, size = read_back(target)
        if count != len(frames) or (count and size != (width, height)):
            raise VideoWriteError(
                f"the {fourcc!r} video {target.name} reads back with {count} frames of {size[0]}×{size[1]} "
                f"pixels, expected {len(frames)} frames of {width}×{height}"
            )
    except BaseException:
        _remove(target)
        raise
    return count


def read_back(path: str | os.PathLike[str]) -> tuple[int, tuple[int, int]]:
    """Decode ``path`` and return ``(frame count, (width, height))`` (``(0, (0, 0))`` if unreadable)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    count, size = 0, (0, 0)
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            count += 1
            size = (frame.shape[1], frame.shape[0])
    finally:
        capture.release()
    return count, size


def contact_sheet(
    frames: Sequence[np.ndarray],
    *,
    columns: int | None = None,
    thumb_width: int = 560,
    max_tiles: int = 60,
) -> np.ndarray:
    """Tile frames (already captioned) into one BGR image, in order, left to right.

    Args:
        frames: BGR frames of one size (a list or a :class:`FrameSequence`).
        columns: tiles per row; default about square, at most 5.
        thumb_width: each tile is scaled to this width (never enlarged).
        max_tiles: longer runs are sampled evenly, first and last frame included.

    Returns:
        The sheet as a ``uint8`` BGR image.

    Raises:
        VideoWriteError: no frames.
    """
    import cv2

    if len(frames) == 0:
        raise VideoWriteError("no frames for the contact sheet")
    picks = spread(len(frames), max_tiles)
    height, width = frames[0].shape[:2]
    scale = min(1.0, thumb_width / width)
    tile_w, tile_h = max(1, round(width * scale)), max(1, round(height * scale))
    columns = columns or min(5, math.ceil(math.sqrt(len(picks))))
    rows = math.ceil(len(picks) / columns)
    gap = 8
    sheet = np.full((rows * (tile_h + gap) + gap, columns * (tile_w + gap) + gap, 3), 235, dtype=np.uint8)
    for index, pick in enumerate(picks):
        frame = frames[pick]
        row, col = divmod(index, columns)
        tile = cv2.resize(frame, (tile_w, tile_h), interpolation=cv2.INTER_AREA) if scale < 1 else frame
        top, left = gap + row * (tile_h + gap), gap + col * (tile_w + gap)
        sheet[top : top + tile_h, left : left + tile_w] = tile
    return sheet


def png_bytes(image: np.ndarray, *, fast: bool = False) -> bytes:
    """Encode a BGR image as PNG bytes (``fast``: light compression, for frames kept in memory)."""
    import cv2

    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1 if fast else 6])
    if not ok:
        raise VideoWriteError("OpenCV could not encode the contact sheet as PNG")
    return buffer.tobytes()


def figure_to_bgr(figure: object) -> np.ndarray:
    """Render a matplotlib Figure (at its own size and dpi) to a BGR ``uint8`` image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)  # type: ignore[arg-type]
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[:, :, 2::-1])


def _to_bgr(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8:
        raise VideoWriteError(f"frames must be uint8 images, got dtype {frame.dtype}")
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return np.ascontiguousarray(frame[:, :, :3])
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame
    raise VideoWriteError(f"frames must be (H, W), (H, W, 3) or (H, W, 4) images, got shape {frame.shape}")


def _even_size(shapes: Iterable[tuple[int, ...]]) -> tuple[int, int]:
    shapes = list(shapes)
    height = max(shape[0] for shape in shapes)
    width = max(shape[1] for shape in shapes)
    return height + height % 2, width + width % 2


def _pad(frame: np.ndarray, size: tuple[int, int], background: int) -> np.ndarray:
    """``frame`` centred on a ``background`` canvas of ``size`` (height, width)."""
    if frame.shape[:2] == size:
        return frame
    canvas = np.full((*size, 3), background, dtype=np.uint8)
    top = (size[0] - frame.shape[0]) // 2
    left = (size[1] - frame.shape[1]) // 2
    canvas[top : top + frame.shape[0], left : left + frame.shape[1]] = frame
    return canvas


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.contextmanager
def _silenced_stderr() -> Iterator[None]:
    """Discard what C code prints on file descriptor 2 while the writer opens.

    OpenCV's FFmpeg backend prints "tag 'VP80' is not supported with codec id 139" for
    every WebM file although it then writes VP8 correctly; a failure is reported by our
    own exception instead.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no usable stderr descriptor: nothing to silence
        yield
        return
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        sys.stderr.flush()
        os.dup2(sink, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(sink)


@contextlib.contextmanager
def _quiet_opencv() -> Iterator[None]:
    """Silence OpenCV's FFmpeg chatter (it logs a harmless tag warning for every VP8 file)."""
    import cv2

    logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if logging is None:
        yield
        return
    previous = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        logging.setLogLevel(previous)
