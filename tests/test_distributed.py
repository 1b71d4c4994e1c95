"""Distributed training on two gloo ranks (CPU): DDP and FSDP2 against one process.

One spawned run (the module fixture ``world``) trains the same model three ways on the
same global batches: in the parent process on the whole batch, and on two ranks with half
the batch each, under ``DistributedDataParallel`` and under FSDP2's ``fully_shard``. Each
rank is given its own ``save_path``; rank 1 calls every analysis and must write nothing,
print nothing, and never leave rank 0 waiting in a collective. The tests below then
compare what each rank recorded and rank 0 wrote with the single-process numbers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_distributed
from torch import nn

from BBDecoder import BBDecoderValueError, Master_analyzer
from BBDecoder.analyses.gradients import CSV_HEADER
from BBDecoder.kernels import gradstats as _gradstats

pytestmark = pytest.mark.distributed

WORLD = 2
BATCH = 8  # global batch; each rank gets BATCH // WORLD samples
STEPS = (3, 2)  # training steps of epoch 0 and epoch 1
SIM_LAYERS = [0, "conv2"]
RTOL = 1e-5


class TwinNet(nn.Module):
    """A small classifier with awkward parameters for sharding.

    ``gate`` has one output row, so its FSDP2 shard on rank 1 is empty; ``frozen`` never
    has a gradient and ``unused`` never runs (both recorded as missing); no BatchNorm, so
    the half batches of two ranks see the same model as the whole batch of one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.gate = nn.Linear(5, 1)
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.flatten(self.pool(self.relu(self.conv2(self.relu(self.conv1(x))))))
        h = torch.tanh(self.frozen(self.fc(h)))
        return self.head(h) * (1 + torch.sigmoid(self.gate(h)))


class Probe(Master_analyzer):
    """Keeps a copy of each epoch's statistics as this rank sees them (after any reduction)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.epochs: list[np.ndarray] = []

    def _gradient_epoch(self, epoch: int) -> Any:
        data = super()._gradient_epoch(epoch)
        self.epochs.append(data.values.copy())
        return data


# ------------------------------------------------------------------------------ data
def batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(steps, BATCH, 3, 6, 6)`` and labels ``(steps, BATCH)``, the same in every process."""
    generator = torch.Generator().manual_seed(7)
    steps = sum(STEPS)
    return torch.randn(steps, BATCH, 3, 6, 6, generator=generator), torch.randint(
        0, 3, (steps, BATCH), generator=generator
    )


def probe_input() -> torch.Tensor:
    """The analysis input, ``BATCH`` samples: rank ``r`` takes its half."""
    return torch.randn(BATCH, 3, 6, 6, generator=torch.Generator().manual_seed(11))


def half(x: torch.Tensor, rank: int) -> torch.Tensor:
    size = x.shape[0] // WORLD
    return x[rank * size : (rank + 1) * size]


def train(wm: Master_analyzer, optimizer: torch.optim.Optimizer, epoch: int, rank: int | None, **collect: Any) -> None:
    """``STEPS[epoch]`` SGD steps, collecting statistics; ``rank=None``: the whole batch."""
    images, labels = batches()
    first = sum(STEPS[:epoch])
    for step in range(first, first + STEPS[epoch]):
        x, y = images[step], labels[step]
        if rank is not None:
            x, y = half(x, rank), half(y, rank)
        loss = F.cross_entropy(wm.forward_propagation(x), y)  # mean: DDP/FSDP average the ranks' means
        optimizer.zero_grad()
        wm.backward_propagation(loss, **{"collect_grads": True, **collect})
        optimizer.step()


def session(wm: Probe, optimizer: torch.optim.Optimizer, rank: int | None) -> dict[str, Any]:
    """The calls every process makes, in the same order; returns what it saw.

    ``rank=None`` is the single process: its ``get_sim`` sees the whole batch, its other
    analyses rank 0's half (the one whose results rank 0 writes).
    """
    sims = wm.get_sim(probe_input() if rank is None else half(probe_input(), rank), SIM_LAYERS, dim=1)
    train(wm, optimizer, 0, rank)
    wm.save_collected_grads(0)
    train(wm, optimizer, 1, rank)
    wm.save_collected_grads(1)
    x = half(probe_input(), rank or 0)
    grads = [local(p.grad).clone() for p in wm.inner.parameters() if p.grad is not None]
    wm.get_inter_features(x, 0, tag="a")
    wm.get_inter_features(x, 0, tag="b")
    wm.compile_feature_evolution(0, formats=("mp4",))
    maps = wm.grad_cam("conv2", x)
    wm.visualize_weight_hist([0, "fc"])  # FSDP2: every rank joins the gathers, rank 0 draws
    wm.layer_costs(x, repeats=1, warmup=0)
    wm.summary()
    wm.visualize_architecture()
    wm.build_report()
    after = [local(p.grad) for p in wm.inner.parameters() if p.grad is not None]
    return {
        "sim": {str(k): v for k, v in sims.items()},
        "epochs": [e.tolist() for e in wm.epochs],
        "alerts": len(wm.gradient_alerts()),
        "maps": maps.tolist(),
        "grads_untouched": len(grads) == len(after)
        and all(torch.equal(a, b) for a, b in zip(grads, after, strict=True)),
    }


def local(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor: an FSDP2 DTensor's local shard."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def reference_run(root: Path) -> dict[str, Any]:
    """One process, whole batches, the same calls (rank 0's analysis input for Grad-CAM/features)."""
    torch.manual_seed(0)
    model = TwinNet()
    wm = Probe(model, root, [BATCH // WORLD, 3, 6, 6], verbose=False, include_bias=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frozen/unused layers' alerts
        result = session(wm, optimizer, None)
    wm.close()
    return result


# --------------------------------------------------------------------------- workers
def _ranks(rank: int, world_size: int, root: str) -> None:
    """Both ranks: a DDP phase, an FSDP2 phase, then FSDP2 ranks that disagree."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    warnings.simplefilter("ignore")
    _gradstats.set_backend("eager")
    out = Path(root)
    printed = io.StringIO()
    results: dict[str, Any] = {}
    with contextlib.redirect_stdout(printed):
        for mode in ("ddp", "fsdp"):
            torch.manual_seed(0)
            model = TwinNet()
            if mode == "ddp":
                wrapped: nn.Module = DistributedDataParallel(model, find_unused_parameters=True)
            else:
                fully_shard(model.conv2)
                fully_shard(model)
                wrapped = model
            save_path = out / mode / f"rank{rank}"  # rank 1 gets its own folder: it must stay absent
            wm = Probe(wrapped, save_path, [BATCH // WORLD, 3, 6, 6], verbose=True, include_bias=True)
            optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
            results[mode] = session(wm, optimizer, rank)
            if mode == "ddp":  # DDP: BBDecoder's forward passes make no collective, so rank 0 may analyse alone
                if rank == 0:
                    x = half(probe_input(), 0)
                    wm.get_inter_features(x, 0)
                    wm.grad_cam("conv2", x)
                    wm.layer_costs(x, repeats=1, warmup=0)
                train(wm, optimizer, 1, rank, collect_every=2)  # DDP's own all-reduce still pairs up
            results[mode]["types"] = [layer.type for layer in wm.layers]
            results[mode]["folder_exists"] = save_path.exists()
            wm.close()

        # FSDP2, rank 1 does not collect: save_collected_grads must raise on both ranks, not hang
        torch.manual_seed(0)
        model = TwinNet()
        fully_shard(model)
        wm = Master_analyzer(model, out / "mismatch" / f"rank{rank}", verbose=False)
        loss = F.cross_entropy(wm.forward_propagation(half(probe_input(), rank)), torch.zeros(BATCH // WORLD).long())
        wm.backward_propagation(loss, collect_grads=rank == 0)
        try:
            wm.save_collected_grads(0)
            results["mismatch"] = "no error"
        except BBDecoderValueError as error:
            results["mismatch"] = str(error)
    results["stdout"] = printed.getvalue()
    (out / f"results_rank{rank}.json").write_text(json.dumps(results))


# ---------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("world")
    run_distributed(_ranks, WORLD, root, str(root))
    ranks = [json.loads((root / f"results_rank{r}.json").read_text()) for r in range(WORLD)]
    return {"root": root, "ranks": ranks, "single": reference_run(root / "single")}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def csv_numbers(folder: Path, epoch: int) -> dict[tuple[str, ...], list[float]]:
    rows = read_csv(folder / "gradients" / f"epoch_{epoch:03d}_grads.csv")
    assert rows and tuple(rows[0]) == CSV_HEADER
    return {(r["iteration"], r["layer_name"], r["param"]): [float(r[k]) for k in CSV_HEADER[5:]] for r in rows}


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    """Largest |got - expected| / |expected| over entries present in both (NaN must match NaN)."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    ok = ~np.isnan(expected)
    scale = np.maximum(np.abs(expected[ok]), 1e-30)
    return float(np.max(np.abs(got[ok] - expected[ok]) / scale, initial=0.0))


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_statistics_equal_single_process_on_every_rank(world: dict[str, Any], mode: str) -> None:
    single = world["single"]["epochs"]
    for epoch, steps in enumerate(STEPS):
        expected = np.array(single[epoch])
        assert expected.shape[0] == steps
        assert np.isnan(expected[..., 3]).any() and (~np.isnan(expected[..., 3])).sum() > 10  # missing and present
        for rank in range(WORLD):
            got = np.array(world["ranks"][rank][mode]["epochs"][epoch])
            error = relative_error(got, expected)
            print(f"{mode} epoch {epoch} rank {rank}: max relative error {error:.2e}")
            assert error < RTOL
        # every rank holds the very same numbers
        np.testing.assert_array_equal(
            world["ranks"][0][mode]["epochs"][epoch], world["ranks"][1][mode]["epochs"][epoch]
        )


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_rank0_csv_equals_single_process_csv(world: dict[str, Any], mode: str) -> None:
    for epoch in range(len(STEPS)):
        expected = csv_numbers(world["root"] / "single", epoch)
        got = csv_numbers(world["root"] / mode / "rank0", epoch)
        assert set(got) == set(expected)
        assert any(math.isnan(v[0]) for v in expected.values())  # the unused layer: missing, not 0
        assert any(p == "weight" and n == "gate" for _, n, p in expected)  # the tensor with an empty shard
        keys = sorted(expected)
        error = relative_error(np.array([got[k] for k in keys]), np.array([expected[k] for k in keys]))
        print(f"{mode} CSV epoch {epoch}: max relative error {error:.2e}")
        assert error < RTOL


def test_fsdp_layer_table_keeps_user_classes(world: dict[str, Any]) -> None:
    types = world["ranks"][0]["fsdp"]["types"]
    assert types == world["ranks"][0]["ddp"]["types"]
    assert types[:2] == ["Conv2d", "ReLU"] and types[2] == "Conv2d"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_only_rank0_writes_and_prints(world: dict[str, Any], mode: str) -> None:
    root = world["root"] / mode
    assert not (root / "rank1").exists()
    assert world["ranks"][1][mode]["folder_exists"] is False
    assert world["ranks"][1]["stdout"] == ""
    assert "gradients: epoch 0" in world["ranks"][0]["stdout"]
    written = {p.relative_to(root / "rank0").parts[0] for p in (root / "rank0").rglob("*") if p.is_file()}
    for section in ("gradients", "features", "gradcam", "costs", "similarity", "architecture"):
        assert section in written, section
    assert (root / "rank0" / "report.html").is_file()
    assert json.loads((root / "rank0" / "run.json").read_text())["world_size"] == WORLD
    assert world["ranks"][0][mode]["alerts"] == world["ranks"][1][mode]["alerts"] == world["single"]["alerts"]
    assert world["ranks"][0][mode]["grads_untouched"] and world["ranks"][1][mode]["grads_untouched"]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_get_sim_is_the_mean_over_every_ranks_samples(world: dict[str, Any], mode: str) -> None:
    """Ranks saw different halves; each returns the value of the whole batch in one process."""
    expected = world["single"]["sim"]
    for rank in range(WORLD):
        got = world["ranks"][rank][mode]["sim"]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6)
    rows = read_csv(world["root"] / mode / "rank0" / "similarity" / "similarity.csv")
    assert [int(r["samples"]) for r in rows] == [BATCH] * len(SIM_LAYERS)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_features_and_gradcam_files_are_rank0s_input(world: dict[str, Any], mode: str) -> None:
    single, rank0 = world["root"] / "single", world["root"] / mode / "rank0"
    for kind in ("features", "gradcam"):
        expected = sorted((single / kind).rglob("*.npy"))
        assert len(expected) >= 2 if kind == "features" else len(expected) == 1
        for path in expected:  # rank 0 wrote the same files (DDP: and then some, from its solo calls)
            np.testing.assert_allclose(np.load(rank0 / path.relative_to(single)), np.load(path), rtol=1e-4, atol=1e-5)
    assert list((rank0 / "features").rglob("*.mp4"))
    np.testing.assert_allclose(world["ranks"][0][mode]["maps"], world["single"]["maps"], rtol=1e-4, atol=1e-5)


def test_fsdp_ranks_that_recorded_differently_raise_instead_of_hanging(world: dict[str, Any]) -> None:
    for rank in range(WORLD):
        message = world["ranks"][rank]["mismatch"]
        assert "ranks recorded different gradient statistics" in message and "0 to 1 rows" in message


def test_single_process_save_makes_no_collective(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without torch.distributed nothing is reduced: the eager path stays as it was."""
    import BBDecoder.core.distributed as distributed

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("a collective in a single process")

    monkeypatch.setattr(distributed, "all_reduce_sum_max", refuse)
    monkeypatch.setattr(distributed, "spread", refuse)
    model = TwinNet()
    wm = Master_analyzer(model, tmp_path, verbose=False)
    wm.backward_propagation(model(torch.randn(2, 3, 6, 6)).sum(), collect_grads=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert wm.save_collected_grads(0)


@pytest.mark.parametrize("backend", ["eager", "foreach"])
def test_shard_reduction_arithmetic(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Two shards' statistics, reduced as save_collected_grads does, equal the whole tensor's.

    The collective is replaced by its meaning: the peer's contribution (captured from the
    peer's own call) is summed / maximised in; NaN, inf, an empty shard and a missing
    gradient must come out as the single-process kernel gives them.
    """
    import BBDecoder.core.distributed as distributed
    from BBDecoder.analyses.gradients.recorder import Column as _Column
    from BBDecoder.analyses.gradients.recorder import Recorder as _Recorder

    monkeypatch.setattr(_gradstats, "_backend", backend)  # the shards' kernel; restored afterwards
    nan, inf = math.nan, math.inf
    wholes = [
        torch.tensor([1.0, -2.0, 0.5, 4.0, -0.25]),
        torch.tensor([1.0, -2.0, nan, inf, 3.0]),
        torch.tensor([1.0, -inf, 2.0, 0.0, -3.0]),
        torch.tensor([-7.0, 0.0]),  # split 2 / 0: the second shard is empty
    ]
    cuts = [3, 2, 4, 2]

    def recorder(shards: list[torch.Tensor]) -> _Recorder:
        rec = _Recorder()
        for i, shard in enumerate(shards):
            rec.columns.append(_Column(i + 1, i, f"l{i}", "weight", wholes[i].numel(), nn.Parameter(shard.clone())))
            rec.columns[-1].shard_groups = ("fake group",)
        stats, order = _gradstats.grad_stats([_gradstats.flat(s) for s in shards], allow_empty=True)
        rec.data = torch.full((2, len(shards) + 2, 4), nan)  # row 1 and the last column: missing
        rec.data[0, [o + 1 for o in order]] = stats
        rec.rows = 2
        return rec

    peer = recorder([w[c:] for w, c in zip(wholes, cuts, strict=True)])
    mine = recorder([w[:c] for w, c in zip(wholes, cuts, strict=True)])
    mine.columns.append(_Column(len(wholes) + 1, 9, "gone", "weight", 3, nn.Parameter(torch.zeros(3))))
    mine.columns[-1].shard_groups = ("fake group",)
    peer.columns.append(mine.columns[-1])
    sent: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(sums: torch.Tensor, maxima: torch.Tensor, groups: Any) -> None:
        assert groups == ("fake group",)
        sent.append((sums.clone(), maxima.clone()))

    def combine(sums: torch.Tensor, maxima: torch.Tensor, groups: Any) -> None:
        theirs = sent.pop()
        sums += theirs[0]
        torch.maximum(maxima, theirs[1], out=maxima)

    monkeypatch.setattr(distributed, "all_reduce_sum_max", capture)
    peer.reduce_shards()
    monkeypatch.setattr(distributed, "all_reduce_sum_max", combine)
    mine.reduce_shards()
    assert mine.reduced == 2 and not sent
    expected, _ = _gradstats.grad_stats([_gradstats.flat(w) for w in wholes])
    got = mine.data[0, 1 : len(wholes) + 1]
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert torch.isnan(mine.data[1]).all() and torch.isnan(mine.data[0, len(wholes) + 1]).all()
    mine.reduce_shards()  # nothing new: no second reduction
    torch.testing.assert_close(mine.data[0, 1 : len(wholes) + 1], expected, equal_nan=True)


# --------------------------------------------------------------------------- example
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"


def run_example(out: Path, *args: str) -> str:
    """``torchrun --standalone --nproc_per_node 2 examples/ddp_train.py``; returns its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    command += [str(EXAMPLE), "--out", str(out), "--epochs", "2", "--steps", "5", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def example_numbers(out: Path) -> np.ndarray:
    """Both epochs' CSV numbers, ``(rows, 5)``, after checking what each row must satisfy."""
    run = json.loads((out / "run.json").read_text())
    numel = {str(layer["id"]): layer["params"] for layer in run["layers"]}
    table = []
    for epoch in range(2):
        rows = read_csv(out / "gradients" / f"epoch_{epoch:03d}_grads.csv")
        assert len(rows) == 5 * 3  # 5 steps × 3 weight tensors (conv, conv, linear)
        for row in rows:
            mean, top, l1, l2, bad = (float(row[k]) for k in CSV_HEADER[5:])
            assert bad == 0 and 0 < top <= l2 <= l1
            bias = {"0": 8, "3": 16, "7": 2}[row["layer_id"]]  # the layer's params count its bias too
            assert mean == pytest.approx(l1 / (numel[row["layer_id"]] - bias), rel=1e-6)
            table.append([mean, top, l1, l2, bad])
    return np.array(table)


def test_torchrun_example_ddp(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    printed = run_example(out)
    assert printed.count("done on 2 ranks (ddp)") == 1 and printed.count("Total params") == 1  # rank 0 prints
    assert example_numbers(out).shape == (30, 5)
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert not [f for f in files if "-1." in f]  # one writer: no name was ever taken twice
    assert {"report.html", "gradients/epoch_001_flow.png", "features/000_0/frame_0001.npy"} <= set(files)
    rows = read_csv(out / "similarity" / "similarity.csv")
    assert [int(r["samples"]) for r in rows] == [2 * WORLD] * 4  # 2 layers × 2 epochs, every rank's samples


@pytest.mark.slow
def test_torchrun_example_fsdp_equals_ddp(tmp_path: Path) -> None:
    run_example(tmp_path / "ddp")
    printed = run_example(tmp_path / "fsdp", "--strategy", "fsdp")
    assert printed.count("done on 2 ranks (fsdp)") == 1
    error = relative_error(example_numbers(tmp_path / "fsdp"), example_numbers(tmp_path / "ddp"))
    print(f"example, FSDP2 vs DDP: max relative error {error:.2e}")
    assert error < RTOL


if __name__ == "__main__":  # pragma: no cover - a manual run prints the measured errors
    sys.exit(pytest.main([__file__, "-q", "-s"]))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_weight_histograms_are_of_the_full_tensors(world: dict[str, Any], mode: str) -> None:
    """Under FSDP2 the histograms cover whole parameters (gathered), not rank 0's shard."""
    ours = sorted((world["root"] / mode / "rank0" / "weights").rglob("hist_call001.npz"))
    single = sorted((world["root"] / "single" / "weights").rglob("hist_call001.npz"))
    assert [p.parent.name for p in ours] == [p.parent.name for p in single] and len(ours) == 2
    for got_path, want_path in zip(ours, single, strict=True):
        with np.load(got_path) as got, np.load(want_path) as want:
            assert got["numel"].tolist() == want["numel"].tolist()  # full element counts
            assert int(got["counts"].sum()) == int(want["numel"].sum())
            np.testing.assert_allclose(got["min"], want["min"], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got["max"], want["max"], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-4, atol=1e-6)
