"""Runs side by side: compare_runs / ``bbdecoder compare``, read from disk only, and the demo's broken twin."""

from __future__ import annotations

import base64
import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from BBDecoder import BBDecoderTypeError, BBDecoderValueError, Master_analyzer, SavePathError, compare_runs
from BBDecoder.cli import main
from BBDecoder.output.schema import GradientRow, UpdateRow
from BBDecoder.report.compare import collect_comparison, gradient_curves, load_run, update_curves


def net(extra: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Sigmoid(), nn.Linear(8, 3)]
    if extra:
        layers.append(nn.Linear(3, 3))
    return nn.Sequential(*layers)


def write_run(path: Path, lr: float, *, extra: bool = False, epochs: int = 2, weights: bool = True) -> Path:
    torch.manual_seed(0)
    model = net(extra)
    wm = Master_analyzer(model, path, verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    wm.watch_optimizer(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broken run alerts; that is the point
        for epoch in range(epochs):
            for _ in range(12):
                loss = F.cross_entropy(wm(torch.randn(8, 6), collect_acts=3), torch.randint(0, 3, (8,)))
                optimizer.zero_grad()
                wm.backward_propagation(loss, collect_grads=True)
                optimizer.step()
            wm.save_collected_grads(epoch)
            if weights:
                wm.visualize_weight_hist([0, 2])
    wm.close()
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("runs")
    return write_run(base / "healthy", 0.05), write_run(base / "broken", 20.0)


def images(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]


def listing(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


def test_compare_two_runs_self_contained(runs: tuple[Path, Path], tmp_path: Path) -> None:
    healthy, broken = runs
    before = [listing(healthy), listing(broken)]
    path = compare_runs([healthy, broken], tmp_path / "out", names=["healthy", "broken"])
    assert path == (tmp_path / "out" / "compare.html").resolve()
    html = path.read_text(encoding="utf-8")
    assert [listing(healthy), listing(broken)] == before  # nothing written into the runs
    pictures = images(html)
    assert len(pictures) == 4 and all(p.startswith(b"\x89PNG") for p in pictures)  # grads, updates, acts, weights
    assert not re.search(r'(src|href)="(?!data:|#)', html)  # every figure inline: one file, no network
    for heading in ("Gradient norms", "Update-to-weight ratio", "Activation health", "Weight evolution"):
        assert heading in html
    assert "healthy" in html and "broken" in html


def test_alerts_side_by_side(runs: tuple[Path, Path]) -> None:
    healthy, broken = (load_run(p) for p in runs)
    assert healthy.alerts == [] and broken.alerts  # the broken run alerts, the healthy one does not
    context = collect_comparison([healthy, broken])
    rows = context["alerts"]["rows"]
    assert rows and all(row["cells"][0]["count"] == 0 and row["cells"][1]["count"] > 0 for row in rows)
    assert context["alerts"]["totals"] == [0, len(broken.alerts)]


def test_numbers_come_from_the_csv(runs: tuple[Path, Path]) -> None:
    run = load_run(runs[0])
    assert run.gradients and all(isinstance(r, GradientRow) for r in run.gradients)
    assert run.updates and all(isinstance(r, UpdateRow) for r in run.updates)
    curves = gradient_curves(run.gradients)
    first = [r for r in run.gradients if r.layer_name == "0" and r.iteration == 0]
    x, y = curves["0"]
    assert x[0] == 0 and y[0] == pytest.approx(math.sqrt(sum(r.l2**2 for r in first)))
    x, y = update_curves(run.updates)["2"]
    (row,) = [r for r in run.updates if r.layer_name == "2" and r.step == 0]
    assert y[0] == pytest.approx(row.update_norm / row.weight_norm)
    assert len(x) == 24  # two epochs of 12 steps


def test_different_models_compare_what_they_share(runs: tuple[Path, Path], tmp_path: Path) -> None:
    other = write_run(tmp_path / "other", 0.05, extra=True, epochs=1, weights=False)
    context = collect_comparison([load_run(runs[0]), load_run(other)])
    assert any("Only other has layer(s) 5" in note for note in context["differences"])
    grads = context["sections"]["gradients"]
    assert "5" not in grads["shared"] and {"run": "other", "layers": ["5"]} in grads["only"]
    assert context["sections"]["weights"]["missing_runs"] == ["other"]
    html = compare_runs([runs[0], other], tmp_path / "out")
    assert "Not recorded by other" in html.read_text(encoding="utf-8")


def test_cli_compare(runs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", str(runs[0]), str(runs[1]), "--out", str(out), "--names", "a", "b"]) == 0
    assert capsys.readouterr().out.strip() == str((out / "compare.html").resolve())
    assert main(["compare", str(runs[0]), "--out", str(out)]) == 1
    assert "at least two runs" in capsys.readouterr().err
    assert main(["compare", str(runs[0]), str(tmp_path / "missing"), "--out", str(out)]) == 1
    assert "missing" in capsys.readouterr().err


def test_bad_arguments(runs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(BBDecoderTypeError, match="paths must be a list"):
        compare_runs(str(runs[0]), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(BBDecoderValueError, match="names must name every run"):
        compare_runs(list(runs), tmp_path, names=["only one"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SavePathError, match="not a BBDecoder save_path"):
        compare_runs([runs[0], tmp_path / "empty"], tmp_path)


def test_the_demo_catches_its_broken_twin(tmp_path: Path) -> None:
    """Alerts fire on the broken twin and not on the healthy run, and the comparison shows them."""
    from BBDecoder.demo import run_demo

    result = run_demo(tmp_path / "demo", epochs=2, samples=700, progress=False, log=lambda _: None)
    assert result.alerts == []
    kinds = {alert["kind"] for alert in result.twin_alerts}
    assert "dead" in kinds
    assert len(result.twin_accuracies) == len(result.accuracies) == 2  # the same epochs
    assert result.comparison is not None and result.comparison.is_file()
    html = result.comparison.read_text(encoding="utf-8")
    assert "Dead units" in html and "broken twin" in html


def test_a_run_resumed_in_a_new_process_reads_as_one_run(tmp_path: Path) -> None:
    """Each process counts from 0: the second epoch is placed after the first, not on top of it."""
    from BBDecoder.report.compare import activation_curves

    write_run(tmp_path / "run", 0.05, epochs=1, weights=False)  # epoch 0, then a new analyzer writes epoch 1
    torch.manual_seed(1)
    model = net()
    wm = Master_analyzer(model, tmp_path / "run", verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    wm.watch_optimizer(optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(12):
            loss = F.cross_entropy(wm(torch.randn(8, 6), collect_acts=3), torch.randint(0, 3, (8,)))
            optimizer.zero_grad()
            wm.backward_propagation(loss, collect_grads=True)
            optimizer.step()
        wm.save_collected_grads(1)
    wm.close()
    run = load_run(tmp_path / "run")
    assert sorted({r.iteration for r in run.gradients if r.epoch == 1}) == list(range(12))  # restarted at 0
    x, _ = gradient_curves(run.gradients)["0"]
    assert list(x) == list(range(24))  # 12 + 12 points, one after the other
    x, _ = update_curves(run.updates)["0"]
    assert list(x) == list(range(24))
    x, _ = activation_curves(run.activations, "dead_frac")["1"]
    assert list(x) == [0, 3, 6, 9, 10, 13, 16, 19]  # passes 0, 3, 6, 9 of each process
