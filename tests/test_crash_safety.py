"""A process killed (SIGKILL) in the middle of saving loses nothing saved earlier."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, tempfile
    import torch
    from torch import nn
    from BBDecoder import Master_analyzer
    from BBDecoder.output.store import Store

    save_path, kill_at, epochs = sys.argv[1], int(sys.argv[2]), [int(e) for e in sys.argv[3].split(",")]
    if kill_at >= 0:  # die half-way through the kill_at-th file write of this process
        original, count = Store._commit, [0]

        def dying(self, target, data, *, overwrite):
            if count[0] == kill_at:
                handle, _ = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
                os.write(handle, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            count[0] += 1
            return original(self, target, data, overwrite=overwrite)

        Store._commit = dying
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    wm = Master_analyzer(model, save_path, verbose=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for epoch in epochs:
        for _ in range(8):
            loss = wm.forward_propagation(torch.randn(4, 6)).square().mean()
            optimizer.zero_grad()
            wm.backward_propagation(loss, collect_grads=True)
            optimizer.step()
        wm.save_collected_grads(epoch)
    print("finished")
    """
)


def run(script: Path, save_path: Path, kill_at: int, epochs: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), str(save_path), str(kill_at), epochs],
        capture_output=True,
        text=True,
        timeout=300,
    )


def snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != "manifest.json" and p.name != "run.json"
    }


def assert_every_final_file_is_whole(root: Path) -> None:
    """Every file under a final name parses; only hidden temporary files may be partial."""
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        if path.name.startswith("."):
            assert path.name.endswith(".tmp"), path
            continue
        if path.suffix == ".csv":
            rows = list(csv.reader(path.open()))
            assert rows[0][:3] == ["epoch", "iteration", "layer_id"] and len(rows) > 1, path
            assert all(len(row) == len(rows[0]) for row in rows), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            assert cv2.imread(str(path)) is not None, path
        elif path.suffix == ".npz":
            with np.load(path) as data:
                assert len(data.files) > 0, path


# Writes of one process: 0 is run.json at construction; then each file of the epoch's save
# (flow, norms, CSV, heatmap PNG and NPZ, alerts), each followed by the manifest's rewrite.
@pytest.mark.parametrize("kill_points", [(0, 1, 4, 7, 10)])
def test_sigkill_during_save_keeps_earlier_epochs(tmp_path: Path, kill_points: tuple[int, ...]) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    save_path = tmp_path / "run"

    first = run(script, save_path, -1, "0,1")
    assert first.returncode == 0, first.stderr
    saved = snapshot(save_path)
    assert any(name.endswith("epoch_001_grads.csv") for name in saved)

    for kill_at in kill_points:  # each run dies at a different write of epoch 2's save
        killed = run(script, save_path, kill_at, "2")
        assert killed.returncode == -9, killed.stderr
        assert "finished" not in killed.stdout
        after = snapshot(save_path)
        assert {k: after[k] for k in saved} == saved  # nothing earlier changed or vanished
        assert_every_final_file_is_whole(save_path)
        json.loads((save_path / "manifest.json").read_text())

    resumed = run(script, save_path, -1, "2,3")
    assert resumed.returncode == 0, resumed.stderr
    final = snapshot(save_path)
    assert {k: final[k] for k in saved} == saved
    assert_every_final_file_is_whole(save_path)
    manifest = json.loads((save_path / "manifest.json").read_text())
    epochs = {entry["epoch"] for entry in manifest if entry["section"] == "gradients"}
    assert {0, 1, 2, 3} <= epochs
    for entry in manifest:
        assert (save_path / entry["path"]).is_file(), entry
