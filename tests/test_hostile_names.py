"""Layer names that are paths, markup, TeX and control characters, through every analysis."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from BBDecoder import Master_analyzer

KEYS = ["/etc/passwd", "<b>bold</b>", "price $5 and $x^2$", "a\\b_{c}", "\n", "~user "]


class Hostile(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({key: nn.Conv2d(3, 3, 3, padding=1) for key in KEYS})
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks.values():
            x = torch.tanh(block(x))
        return self.fc(x.mean((2, 3)))


def test_every_analysis_stays_inside_save_path_and_escapes_names(tmp_path: Path) -> None:
    root = tmp_path / "run"
    model = Hostile()
    wm = Master_analyzer(model, root, [2, 3, 8, 8], depth=2, verbose=False)
    hostile = [layer.id for layer in wm.layers if layer.name.startswith("blocks.")]
    assert len(hostile) == len(KEYS)
    x = torch.randn(2, 3, 8, 8)
    for epoch in range(2):
        model.zero_grad()
        wm.backward_propagation(wm(x).sum(), collect_grads=True, include_bias=True)
        wm.save_collected_grads(epoch)
        wm.visualize_weight_hist(hostile)
        wm.get_sim(x, hostile, dim=1)
        for layer in hostile:
            wm.get_inter_features(x, layer, tag=f"epoch {epoch} $x$ <i>")
    wm.compile_feature_evolution(hostile[0], fps=2)
    wm.grad_cam(hostile[2], x)
    wm.layer_costs(x)
    report = wm.build_report()

    assert {p for p in tmp_path.iterdir()} == {root}  # nothing beside save_path
    for path in root.rglob("*"):
        part = path.relative_to(root).as_posix()
        assert re.fullmatch(r"[A-Za-z0-9._/-]+", part), part
        assert not any(piece.endswith(".") for piece in part.split("/")), part
    html = report.read_text()
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "<i>" not in html
