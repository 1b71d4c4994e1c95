"""compile_feature_evolution and BBDecoder.video: videos that read back, one shared scale."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from BBDecoder import Master_analyzer
from BBDecoder.errors import (
    BBDecoderTypeError,
    BBDecoderValueError,
    BBDecoderWarning,
    LayerSelectionError,
    VideoWriteError,
)
from BBDecoder.output import video
from BBDecoder.plots.features import color_scale, feature_figure


class Probe(nn.Module):
    """An identity layer whose output is exactly the input, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.head = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x))


def read_video(path: Path) -> list[np.ndarray]:
    """Every decoded frame (independently of BBDecoder.output.video.read_back)."""
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def videos_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in {".mp4", ".webm"})


@pytest.fixture
def probe(tmp_path: Path) -> Master_analyzer:
    return Master_analyzer(Probe(), tmp_path / "run", [1, 2, 6, 6], verbose=False)


def pattern(scale: float = 1.0) -> torch.Tensor:
    """A non-negative (1, 2, 6, 6) input: a ramp, so brightness varies inside each tile."""
    return scale * torch.linspace(0.0, 1.0, 72).reshape(1, 2, 6, 6)


# ---------------------------------------------------------------- the videos
def test_videos_have_one_frame_per_call_and_the_expected_size(probe: Master_analyzer) -> None:
    calls = 4
    for epoch in range(calls):
        probe.get_inter_features(pattern(1 + epoch), "feat", tag=f"epoch {epoch}")
    written = probe.compile_feature_evolution("feat", fps=3)
    mp4, webm, sheet = written
    assert (mp4.suffix, webm.suffix, sheet.suffix) == (".mp4", ".webm", ".png")
    assert mp4.parent == probe.store.root / "features" / "000_feat" and mp4.name == "evolution_001.mp4"

    # expected size: the frame figure at the shared scale, rounded up to even numbers
    arrays = [np.load(f["raw"])[None] for f in probe.feature_frames("feat")]
    scale = color_scale(arrays)
    height, width = video.figure_to_bgr(feature_figure(arrays[0], "grid", title="t", scale=scale)).shape[:2]
    expected = (height + height % 2, width + width % 2)
    for path in (mp4, webm):
        frames = read_video(path)
        assert len(frames) == calls, path
        assert {f.shape[:2] for f in frames} == {expected}
    assert cv2.VideoCapture(str(mp4)).get(cv2.CAP_PROP_FPS) == pytest.approx(3.0)

    entries = [e for e in json.loads((probe.store.root / "manifest.json").read_text()) if e["section"] == "video"]
    assert [(e["kind"], e["frames"], e["layer_id"], e["layer_name"]) for e in entries] == [
        ("mp4", calls, 0, "feat"),
        ("webm", calls, 0, "feat"),
        ("contact_sheet", calls, 0, "feat"),
    ]
    assert entries[0]["vmin"] == pytest.approx(scale.vmin) and entries[0]["vmax"] == pytest.approx(scale.vmax)
    image = cv2.imread(str(sheet))
    assert image is not None and image.shape[0] > 300 and image.shape[1] > 600
    assert not list((probe.store.root / ".tmp").iterdir())  # scratch files moved or removed


def test_one_normalisation_across_the_run(probe: Master_analyzer) -> None:
    """A frame twice as bright in the data is brighter in the video, not in the single pictures."""
    dim_picture, _ = probe.get_inter_features(pattern(1.0), "feat", tag="dim")
    bright_picture, _ = probe.get_inter_features(pattern(2.0), "feat", tag="bright")
    mp4, webm, _ = probe.compile_feature_evolution("feat", fps=2)

    def brightness(image: np.ndarray) -> float:
        return float(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float64).mean())

    for path in (mp4, webm):
        dim, bright = read_video(path)
        assert brightness(bright) > brightness(dim) + 5, path
    # each picture alone is scaled to its own data: the two look (nearly) the same
    a, b = cv2.imread(str(dim_picture)), cv2.imread(str(bright_picture))
    assert abs(brightness(a) - brightness(b)) < 2


def test_frames_of_different_shapes_are_padded_to_one_even_size(probe: Master_analyzer) -> None:
    probe.get_inter_features(pattern(), "feat")
    probe.get_inter_features(pattern(), "feat", dim=0)
    probe.get_inter_features(pattern(), "feat", post_proc=lambda t: t.mean((1, 2)))
    mp4, webm, _ = probe.compile_feature_evolution("feat", fps=1.5)
    for path in (mp4, webm):
        frames = read_video(path)
        assert len(frames) == 3
        height, width = frames[0].shape[:2]
        assert height % 2 == 0 and width % 2 == 0
        assert {f.shape for f in frames} == {frames[0].shape}


def test_formats_and_path(probe: Master_analyzer, tmp_path: Path) -> None:
    probe.get_inter_features(pattern(), "feat")
    written = probe.compile_feature_evolution("feat", path="movies", formats="webm")
    assert [p.name for p in written] == ["evolution_001.webm", "evolution_001_contact_sheet.png"]
    assert written[0].parent == probe.store.root / "movies" / "000_feat"  # inside its layer's folder
    with pytest.raises(BBDecoderValueError, match="unknown video format 'avi'"):
        probe.compile_feature_evolution("feat", formats=["avi"])
    # issue 11.6: a folder outside save_path is honoured, and listed in its manifest
    outside = probe.compile_feature_evolution("feat", path=tmp_path / "outside", formats="webm")
    assert [p.relative_to(tmp_path).as_posix() for p in outside] == [
        "outside/000_feat/evolution_002.webm",
        "outside/000_feat/evolution_002_contact_sheet.png",
    ]
    assert len(read_video(outside[0])) == 1
    listed = {e["path"]: e for e in probe.store.outputs("video")}
    assert all(listed[f"../{p.relative_to(tmp_path).as_posix()}"]["external"] is True for p in outside)
    assert not list((probe.store.root / ".tmp").iterdir())  # the scratch video was moved, not left behind
    # a later compile never overwrites an earlier one: it gets the next number, never a collision suffix
    again = probe.compile_feature_evolution("feat", path="movies", formats=["webm"])
    assert again[0].name == "evolution_003.webm"


# ---------------------------------------------------------------- failures
def test_no_frames_raises_and_writes_nothing(probe: Master_analyzer) -> None:
    with pytest.raises(VideoWriteError, match="no recorded feature frames"):
        probe.compile_feature_evolution("head")
    assert videos_under(probe.store.root) == []
    assert probe.store.outputs("video") == []


def test_unknown_layer(probe: Master_analyzer) -> None:
    with pytest.raises(LayerSelectionError, match="no layer named 'missing'"):
        probe.compile_feature_evolution("missing")


@pytest.mark.parametrize("fps", [0, -1, -0.5, math.nan, math.inf])
def test_fps_must_be_positive(probe: Master_analyzer, fps: float) -> None:
    probe.get_inter_features(pattern(), "feat")
    with pytest.raises(BBDecoderValueError, match=r"fps must be a positive.*fps="):
        probe.compile_feature_evolution("feat", fps=fps)
    assert videos_under(probe.store.root) == []


@pytest.mark.parametrize("fps", ["5", True, None])
def test_fps_must_be_a_number(probe: Master_analyzer, fps: object) -> None:
    with pytest.raises(BBDecoderTypeError, match="fps must be a positive number"):
        probe.compile_feature_evolution("feat", fps=fps)  # type: ignore[arg-type]


def test_a_codec_that_cannot_open_leaves_no_file(probe: Master_analyzer, monkeypatch: pytest.MonkeyPatch) -> None:
    probe.get_inter_features(pattern(), "feat")
    monkeypatch.setitem(video.CODECS, "webm", (".webm", "mp4v"))  # WebM cannot hold MPEG-4
    with pytest.raises(VideoWriteError, match=r"could not open the 'mp4v' encoder for a \.webm"):
        probe.compile_feature_evolution("feat")
    assert videos_under(probe.store.root) == []  # the mp4 made first is gone too
    assert probe.store.outputs("video") == []
    assert not list((probe.store.root / "features").glob("*contact_sheet*"))


def test_a_missing_raw_file_is_skipped_with_a_warning(probe: Master_analyzer) -> None:
    for scale in (1.0, 2.0, 3.0):
        probe.get_inter_features(pattern(scale), "feat")
    probe.feature_frames("feat")[1]["raw"].unlink()
    with pytest.warns(BBDecoderWarning, match="skipping frame 2"):
        mp4, _ = probe.compile_feature_evolution("feat", formats=["mp4"])
    assert len(read_video(mp4)) == 2


# ------------------------------------------------------------ video module
def test_equalize_pads_to_one_even_size_centred() -> None:
    a = np.zeros((5, 7, 3), np.uint8)
    b = np.full((9, 4), 100, np.uint8)
    c = np.zeros((3, 3, 4), np.uint8)
    out = video.equalize([a, b, c])
    assert {f.shape for f in out} == {(10, 8, 3)}
    assert out[0][2:7, 0:7].max() == 0 and out[0][0].min() == 255  # a centred vertically, left-aligned
    assert (out[1][0:9, 2:6] == 100).all()
    with pytest.raises(VideoWriteError, match="uint8"):
        video.equalize([np.zeros((4, 4), np.float32)])


def test_frame_sequence_matches_equalize_and_stays_compressed() -> None:
    rng = np.random.default_rng(0)
    raw = [np.full((41, 57, 3), 255, np.uint8), rng.integers(0, 255, (30, 60, 3), dtype=np.uint8)]
    raw[0][10:20, 10:40] = (10, 120, 250)
    frames = video.FrameSequence()
    for frame in raw:
        frames.append(frame)
    assert len(frames) == 2 and frames.size == (42, 60)
    for mine, reference in zip(frames, video.equalize(raw), strict=True):
        assert np.array_equal(mine, reference)  # PNG is lossless
    plain = video.FrameSequence()
    plain.append(np.full((400, 600, 3), 255, np.uint8))
    assert len(plain._encoded[0]) < 400 * 600 * 3 / 20


def test_encode_reads_back_every_frame(tmp_path: Path) -> None:
    frames = video.equalize([np.full((31, 45, 3), 20 * i, np.uint8) for i in range(6)])
    for suffix, fourcc in video.CODECS.values():
        target = tmp_path / f"clip{suffix}"
        assert video.encode(frames, target, 10, fourcc) == 6
        decoded = read_video(target)
        assert len(decoded) == 6 and decoded[0].shape == (32, 46, 3)
        means = [float(f[4:28, 4:42].mean()) for f in decoded]
        assert means == sorted(means)  # brightness order kept through the codec
        assert abs(means[-1] - 100) < 6
    assert video.read_back(tmp_path / "missing.mp4") == (0, (0, 0))


def test_encode_failures_remove_the_target(tmp_path: Path) -> None:
    target = tmp_path / "bad.mp4"
    target.write_bytes(b"")
    with pytest.raises(VideoWriteError, match="no frames"):
        video.encode([], target, 5, "mp4v")
    assert not target.exists()
    target.write_bytes(b"")
    with pytest.raises(VideoWriteError, match="could not open"):
        video.encode(video.equalize([np.zeros((4, 4, 3), np.uint8)]), target, 5, "XXXX")
    assert not target.exists()
    with pytest.raises(VideoWriteError, match="uint8 BGR image of 4×4 pixels, got uint8 \\(6, 4, 3\\)"):
        video.encode([np.zeros((4, 4, 3), np.uint8), np.zeros((6, 4, 3), np.uint8)], target, 5, "mp4v")
    assert not target.exists()


def test_contact_sheet_tiles_frames_in_order() -> None:
    frames = [np.full((20, 30, 3), 40 * i, np.uint8) for i in range(5)]
    sheet = video.contact_sheet(frames, columns=3, thumb_width=30)
    assert sheet.shape == (2 * (20 + 8) + 8, 3 * (30 + 8) + 8, 3)
    assert sheet[8 + 5, 8 + 5, 0] == 0 and sheet[8 + 5, 8 + 38 + 5, 0] == 40
    assert sheet[8 + 28 + 5, 8 + 38 + 5, 0] == 160  # frame 4: second row, second column
    assert video.spread(5, 3) == [0, 2, 4] and video.spread(100, 60)[-1] == 99 and len(video.spread(100, 60)) == 60
    sampled = video.contact_sheet(frames, columns=2, thumb_width=30, max_tiles=2)  # first and last only
    assert sampled[8 + 5, 8 + 38 + 5, 0] == 160
    decoded = cv2.imdecode(np.frombuffer(video.png_bytes(sheet), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(decoded, sheet)
