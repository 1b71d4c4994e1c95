"""Distributed training: DDP on two gloo ranks (CPU), rank 0 alone writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from models import SmallCNN
from torch.nn.parallel import DistributedDataParallel

from BBDecoder import Master_analyzer

pytestmark = pytest.mark.distributed


def _wrap_ddp(rank: int, world_size: int, root: str) -> None:
    torch.manual_seed(0)
    model = DistributedDataParallel(SmallCNN())
    save_path = Path(root, f"rank{rank}")  # each rank given its own folder: only rank 0 may write
    wm = Master_analyzer(model, save_path, [2, 3, 8, 8])
    assert wm.inner is model.module and wm.model is model
    rows = wm.summary()
    assert rows[0]["name"] == "conv1" and rows[0]["output_shape"] == [2, 8, 8, 8]
    out = wm.forward_propagation(torch.randn(2, 3, 8, 8))
    wm.backward_propagation(out.sum())


def test_ddp_wrapping_and_only_rank0_writes(tmp_path: Path) -> None:
    run_distributed(_wrap_ddp, 2, tmp_path, str(tmp_path))
    assert (tmp_path / "rank0" / "run.json").is_file()
    assert json.loads((tmp_path / "rank0" / "run.json").read_text())["world_size"] == 2
    assert not (tmp_path / "rank1").exists()
