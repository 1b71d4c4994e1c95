"""The command line (``bbdecoder`` / ``python -m BBDecoder``) and the demo behind it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_report import HOSTILE, make_save_path

from BBDecoder import BBDecoderTypeError, BBDecoderValueError, __version__
from BBDecoder.cli import main
from BBDecoder.demo import CLASSES, ShapesCNN, draw_shapes, fresh_folder, run_demo


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"BBDecoder {__version__}"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "demo" in out and "report" in out


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_save_path(tmp_path)
    assert main(["report", str(tmp_path), "--title", HOSTILE]) == 0
    printed = Path(capsys.readouterr().out.strip())
    assert printed == (tmp_path / "report.html").resolve()
    text = printed.read_text(encoding="utf-8")
    assert "<title>&lt;script&gt;alert(&#34;pwned&#34;)&lt;/script&gt;</title>" in text


def test_report_on_a_missing_folder_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bbdecoder report: error: save_path") and "missing" in err
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
        (["demo", "--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
        (["demo", "--samples", "10"], "argument --samples: must be at least 100, got 10"),
        (["report"], "the following arguments are required: SAVE_PATH"),
        (["fly"], "invalid choice: 'fly'"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "BBDecoder", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"BBDecoder {__version__}"


@pytest.mark.skipif(shutil.which("bbdecoder") is None, reason="the package is not installed (no console script)")
def test_console_script(tmp_path: Path) -> None:
    make_save_path(tmp_path)
    done = subprocess.run(["bbdecoder", "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == (tmp_path / "report.html").resolve()


def test_demo_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--samples", "200", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/1: train loss" in printed and "held-out accuracy" in printed
    assert f"open the report: {(out / 'report.html').resolve()}" in printed
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "ShapesCNN" in text
    manifest = (out / "manifest.json").read_text(encoding="utf-8")
    for section in ("architecture", "gradients", "weights", "similarity", "features", "video", "gradcam", "costs"):
        assert f'"section": "{section}"' in manifest, f"the demo wrote nothing for {section}"


def test_fresh_folder_never_reuses_a_run(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    assert fresh_folder(target) == target
    target.mkdir()
    assert fresh_folder(target) == target  # empty: fine
    (target / "run.json").write_text("{}")
    assert fresh_folder(target) == tmp_path / "demo-1"
    (tmp_path / "demo-1").mkdir()
    (tmp_path / "demo-1" / "x").write_text("")
    assert fresh_folder(target) == tmp_path / "demo-2"


def test_draw_shapes_is_deterministic_and_balanced() -> None:
    images, labels = draw_shapes(500, seed=3)
    again, labels_again = draw_shapes(500, seed=3)
    other, _ = draw_shapes(500, seed=4)
    assert images.shape == (500, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert not torch.equal(images, other)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert torch.bincount(labels, minlength=len(CLASSES)).tolist() == [100] * len(CLASSES)
    # the shape is brighter than the background: the mean of each image's brightest 5% is high
    top = images.mean(1).flatten(1).topk(51, dim=1).values.mean(1)
    assert (top > 0.5).all()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"count": 0}, BBDecoderValueError), ({"count": 10, "size": 8}, BBDecoderValueError), ({"count": 2.5}, Exception)],
)
def test_draw_shapes_rejects_bad_arguments(kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        draw_shapes(**kwargs)


def test_run_demo_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(BBDecoderValueError, match="epochs must be at least 1, got epochs=0"):
        run_demo(tmp_path, epochs=0)
    with pytest.raises(BBDecoderTypeError, match="samples must be an int"):
        run_demo(tmp_path, samples=1.5)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_the_demo_model_learns_the_shapes() -> None:
    torch.manual_seed(0)
    images, labels = draw_shapes(1200, seed=0)
    test_images, test_labels = draw_shapes(300, seed=1)
    model = ShapesCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(2):
        for batch in torch.randperm(len(images)).split(64):
            loss = F.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test_images).argmax(1) == test_labels).float().mean().item()
    assert accuracy > 0.6  # chance is 0.2


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_gradients.py", "vit_token_diversity.py", "feature_evolution.py"])
def test_examples_run(script: str, tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / script
    done = subprocess.run(
        [sys.executable, str(example), "--epochs", "2", "--samples", "300", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "report.html").is_file()
