"""get_sim: hand-computed values, float64 references, chunking, memory, files, errors."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models import MLP, FrozenNet, SmallCNN, TokenModel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from BBDecoder import BBDecoderTypeError, BBDecoderValueError, Master_analyzer, ModelForwardError
from BBDecoder.analyses import similarity
from BBDecoder.analyses.similarity import CSV_COLUMNS, SIM_METHODS, slice_similarity
from BBDecoder.core import distributed
from BBDecoder.core.hooks import count_module_hooks

PNG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------- references
def reference(features: torch.Tensor, dim: int, method: str) -> float:
    """Obviously-right float64 value: explicit loop over samples and ordered pairs."""
    values = []
    for sample in features.double():
        rows = sample.movedim(dim - 1, 0).reshape(sample.shape[dim - 1], -1)
        total, pairs = 0.0, 0
        for i, j in itertools.permutations(range(rows.shape[0]), 2):
            if method == "kl_divergence":
                # KL(p_i || p_j): F.kl_div takes the log-probabilities of the *second* argument.
                term = F.kl_div(F.log_softmax(rows[j], 0), F.softmax(rows[i], 0), reduction="sum")
            else:
                norms = rows[i].norm() * rows[j].norm()
                term = (rows[i] @ rows[j]) / norms if norms > 0 else torch.zeros((), dtype=torch.float64)
                term = term.abs() if method == "abs_cosine" else term
            total += float(term)
            pairs += 1
        values.append(total / pairs)
    return sum(values) / len(values)


def features_of(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's output in eval mode, captured independently of BBDecoder."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0]


def analyzer(model: nn.Module, path: Path, **kwargs: Any) -> Master_analyzer:
    return Master_analyzer(model, path, None, verbose=kwargs.pop("verbose", False), **kwargs)


# ------------------------------------------------------------- hand-computed
@pytest.mark.parametrize("method", SIM_METHODS)
def test_identical_slices(method: str) -> None:
    row = torch.tensor([0.5, -1.0, 2.0, 3.0])
    features = row.expand(2, 5, 4).clone()  # 2 samples, 5 identical slices
    values = slice_similarity(features, 1, method)
    expected = 0.0 if method == "kl_divergence" else 1.0
    assert values.dtype == torch.float64
    assert values.tolist() == pytest.approx([expected, expected], abs=1e-12)


def test_orthogonal_and_known_values() -> None:
    eye = torch.eye(3).unsqueeze(0)  # slices e1, e2, e3
    assert slice_similarity(eye, 1, "cosine").item() == pytest.approx(0.0, abs=1e-15)
    assert slice_similarity(eye, 1, "abs_cosine").item() == pytest.approx(0.0, abs=1e-15)
    # softmax(e_i) = (e, 1, 1)/(e+2) up to order: KL(p_i||p_j) = a log(a/b) + b log(b/a) = a - b = (e-1)/(e+2)
    assert slice_similarity(eye, 1, "kl_divergence").item() == pytest.approx((math.e - 1) / (math.e + 2), rel=1e-12)
    # cos([1,0],[1,1]) = 1/sqrt(2), both orders
    pair = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert slice_similarity(pair, 1, "cosine").item() == pytest.approx(1 / math.sqrt(2), rel=1e-12)
    # opposite slices: cosine -1, |cosine| 1
    opposite = torch.tensor([[[1.0, 2.0], [-1.0, -2.0]]])
    assert slice_similarity(opposite, 1, "cosine").item() == pytest.approx(-1.0, rel=1e-12)
    assert slice_similarity(opposite, 1, "abs_cosine").item() == pytest.approx(1.0, rel=1e-12)
    # a zero slice has cosine 0 with the others: pairs (a,b)=1, (a,0)=(b,0)=0 -> 2/6
    with_zero = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]]])
    assert slice_similarity(with_zero, 1, "cosine").item() == pytest.approx(2 / 6, rel=1e-12)


def test_known_kl_two_slices() -> None:
    """KL(p||q) + KL(q||p) for two explicit distributions, averaged over the 2 ordered pairs."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.3, 0.6], dtype=torch.float64)
    features = torch.stack([p.log(), q.log()]).unsqueeze(0)  # softmax(log p) = p
    kl_pq = float((p * (p / q).log()).sum())
    kl_qp = float((q * (q / p).log()).sum())
    assert slice_similarity(features, 1, "kl_divergence").item() == pytest.approx((kl_pq + kl_qp) / 2, rel=1e-12)


def test_dim_selects_the_sliced_axis() -> None:
    """dim=2 of (N, A, B) compares the B columns, each of length A."""
    features = torch.randn(2, 4, 6, dtype=torch.float64)
    for method in SIM_METHODS:
        by_2 = slice_similarity(features, 2, method)
        by_t = slice_similarity(features.transpose(1, 2), 1, method)
        assert torch.allclose(by_2, by_t, rtol=1e-12, atol=1e-14)
        assert slice_similarity(features, -1, method).tolist() == by_2.tolist()


# ------------------------------------------------------------- chunking, memory
@pytest.mark.parametrize("method", SIM_METHODS)
@pytest.mark.parametrize("block", [1, 7, 64, 500, 10_000])
def test_chunked_equals_unchunked(method: str, block: int) -> None:
    features = torch.randn(3, 37, 5, 3) * 2
    whole = slice_similarity(features, 1, method, block_elements=1 << 30)
    chunked = slice_similarity(features, 1, method, block_elements=block)
    assert torch.allclose(chunked, whole, rtol=1e-12, atol=1e-13)
    expected = [reference(features[i : i + 1], 1, method) for i in range(3)]
    assert whole.tolist() == pytest.approx(expected, rel=1e-10, abs=1e-12)


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor storage any op creates (views and in-place results excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("method", SIM_METHODS)
@pytest.mark.parametrize("shape", [(1, 197, 768), (1, 2048, 7, 7)], ids=["vit-tokens", "2048-channels"])
def test_bounded_memory(method: str, shape: tuple[int, ...]) -> None:
    """Working memory stays within the block budget; the n² pair matrix is never formed whole."""
    budget = 1 << 16
    features = torch.randn(shape)
    with LargestAllocation() as tracker:
        bounded = slice_similarity(features, 1, method, block_elements=budget)
    assert tracker.largest <= budget
    slices = shape[1]
    if method == "abs_cosine":
        with LargestAllocation() as free:
            whole = slice_similarity(features, 1, method, block_elements=1 << 30)
        assert free.largest >= slices * slices  # unchunked does build the Gram matrix
        assert torch.allclose(bounded, whole, rtol=1e-12)


@pytest.mark.parametrize("method", SIM_METHODS)
def test_no_synchronisation_while_computing(method: str) -> None:
    reads: list[Any] = []

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.ops.aten._local_scalar_dense.default:
                reads.append(func)
            return func(*args, **(kwargs or {}))

    with ScalarReads():
        slice_similarity(torch.randn(3, 40, 6), 1, method, block_elements=50)
    assert reads == []


def test_abs_cosine_matches_reference_on_many_slices() -> None:
    features = torch.randn(2, 300, 9)
    unit = F.normalize(features.double(), dim=-1)
    gram = (unit @ unit.transpose(1, 2)).abs()
    expected = (gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / (300 * 299)
    got = slice_similarity(features, 1, "abs_cosine", block_elements=2000)
    assert torch.allclose(got, expected, rtol=1e-12)


# -------------------------------------------------------------- through get_sim
CASES = [
    ("cnn-channels", SmallCNN, (3, 3, 8, 8), "conv1", 1),
    ("cnn-rows", SmallCNN, (2, 3, 8, 8), "relu", 2),
    ("cnn-linear-out", SmallCNN, (3, 3, 8, 8), "fc", 1),
    ("tokens", TokenModel, (2, 6, 3), "block", 1),
    ("token-features", TokenModel, (2, 6, 3), "block", -1),
    ("mlp", MLP, (4, 10), "net", 1),
]


@pytest.mark.parametrize("method", SIM_METHODS)
@pytest.mark.parametrize(("case", "factory", "shape", "name", "dim"), CASES, ids=[c[0] for c in CASES])
def test_get_sim_matches_float64_reference(
    case: str, factory: Any, shape: tuple[int, ...], name: str, dim: int, method: str, tmp_path: Path
) -> None:
    model = factory()
    x = torch.randn(shape)
    features = features_of(model, model.get_submodule(name), x)
    axis = dim % features.dim()
    wm = analyzer(model, tmp_path)
    got = wm.get_sim(x, [name], dim, method)
    layer_id = wm.layers.names.index(name)
    assert list(got) == [layer_id]
    assert got[layer_id] == pytest.approx(reference(features, axis, method), rel=1e-9, abs=1e-9)
    if method == "kl_divergence":
        assert got[layer_id] >= 0


def test_returns_in_requested_order_and_averages_the_batch(tmp_path: Path) -> None:
    model = SmallCNN()
    x = torch.randn(4, 3, 8, 8)
    wm = analyzer(model, tmp_path)
    got = wm.get_sim(x, ["conv2", 0, "relu"], 1, "abs_cosine")
    assert list(got) == [3, 0, 2]
    singles = [wm.get_sim(x[i : i + 1], ["conv2", 0, "relu"], 1, "abs_cosine") for i in range(4)]
    for layer_id in got:
        # float32 convolutions of a batch and of single samples differ in the last bits
        assert got[layer_id] == pytest.approx(sum(s[layer_id] for s in singles) / 4, rel=1e-6)


class Recorder(nn.Module):
    """Records the grad mode and its own training flag when it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_grad_enabled(), self.training))
        return self.linear(x).reshape(-1, 2, 3)


class RecorderNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rec = Recorder()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.rec(x)))


def test_eval_no_grad_modes_restored_no_hooks(tmp_path: Path) -> None:
    model = RecorderNet()
    model.train()
    model.drop.eval()  # a mixed state must come back exactly
    hooks = count_module_hooks(model)
    wm = analyzer(model, tmp_path)
    x = torch.randn(5, 4)
    first = wm.get_sim(x, ["rec", "drop"], 1)
    assert model.rec.seen[-1] == (False, False)  # no grad, eval mode during the pass
    assert first == wm.get_sim(x, ["rec", "drop"], 1)  # dropout off: deterministic
    assert model.training and model.rec.training and model.head.training and not model.drop.training
    assert count_module_hooks(model) == hooks and wm.hooks.active == 0
    assert all(p.grad is None for p in model.parameters())


def test_errors_leave_no_hooks_and_restore_mode(tmp_path: Path) -> None:
    model = SmallCNN()
    wm = analyzer(model, tmp_path)
    with pytest.raises(ModelForwardError):
        wm.get_sim(torch.randn(2, 5, 8, 8), [0], 1)
    with pytest.raises(BBDecoderValueError, match=r"dim=7.*layer 0 'conv1'.*\[2, 8, 8, 8\]"):
        wm.get_sim(torch.randn(2, 3, 8, 8), [0], 7)
    assert count_module_hooks(model) == 0 and model.training


class TupleBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.flip(-1) * torch.arange(x.shape[-1], dtype=x.dtype)


class DictBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"first": x.cos(), "second": x.sin()}


class MultiOutputNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 5)
        self.pair = TupleBlock()
        self.named = DictBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.pair(self.embed(x))
        out = self.named(a + b)
        return out["first"] + out["second"]


def test_tuple_and_dict_outputs(tmp_path: Path) -> None:
    model = MultiOutputNet()
    x = torch.randn(2, 4, 3)
    wm = analyzer(model, tmp_path)
    embedded = model.embed(x).detach()
    a, b = model.pair(embedded)
    named = model.named(a + b)
    assert wm.get_sim(x, ["pair"], 1)[1] == pytest.approx(reference(a, 1, "cosine"), rel=1e-9)
    assert wm.get_sim(x, ["pair"], 1, output_key=1)[1] == pytest.approx(reference(b, 1, "cosine"), rel=1e-9)
    assert wm.get_sim(x, ["named"], 1)[2] == pytest.approx(reference(named["first"], 1, "cosine"), rel=1e-9)
    got = wm.get_sim(x, ["named"], 2, "kl_divergence", output_key="second")[2]
    assert got == pytest.approx(reference(named["second"], 2, "kl_divergence"), rel=1e-9)
    with pytest.raises(BBDecoderValueError, match=r"layer 2 'named'.*output_key='third'"):
        wm.get_sim(x, ["named"], 1, output_key="third")


# -------------------------------------------------------------------- errors
def test_argument_errors(tmp_path: Path) -> None:
    model = FrozenNet()
    wm = analyzer(model, tmp_path)
    x = torch.randn(3, 5)
    for bad in ("1", 1.0, True, None):
        with pytest.raises(BBDecoderTypeError, match="dim must be an int"):
            wm.get_sim(x, [0], bad)  # type: ignore[arg-type]
    with pytest.raises(BBDecoderValueError, match=r"sim_method.*'cosine'.*got 'kl'"):
        wm.get_sim(x, [0], 1, "kl")
    with pytest.raises(BBDecoderValueError, match=r"dim=2 is out of range.*layer 0 'frozen'.*\[3, 8\]"):
        wm.get_sim(x, [0], 2)
    with pytest.raises(BBDecoderValueError, match=r"dim=-3 is out of range"):
        wm.get_sim(x, [0], -3)
    with pytest.raises(BBDecoderValueError, match=r"dim=0 is the batch dimension"):
        wm.get_sim(x, [0], 0)
    with pytest.raises(BBDecoderValueError, match=r"layer 2 'unused' did not run"):
        wm.get_sim(x, [0, "unused"], 1)
    with pytest.raises(BBDecoderValueError, match=r"holds 1 slice"):
        slice_similarity(torch.randn(2, 1, 4), 1)
    assert not (tmp_path / "similarity").exists()  # nothing written by failed calls


# ------------------------------------------------------------ files, printing
def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_csv_figures_manifest_and_continuation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = SmallCNN()
    x = torch.randn(2, 3, 8, 8)
    wm = analyzer(model, tmp_path, verbose=True)
    capsys.readouterr()
    first = wm.get_sim(x, [0, "relu2"], 1)
    printed = capsys.readouterr().out
    assert "get_sim call 1: cosine" in printed and "relu2" in printed and f"{first[0]:.6g}" in printed
    second = wm.get_sim(x, [3], -1, "kl_divergence")

    table = tmp_path / "similarity" / "similarity.csv"
    rows = read_csv(table)
    assert list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["call"], r["layer_id"], r["method"], r["dim"]) for r in rows] == [
        ("1", "0", "cosine", "1"),
        ("1", "4", "cosine", "1"),
        ("2", "3", "kl_divergence", "3"),
    ]
    assert float(rows[0]["value"]) == first[0] and float(rows[2]["value"]) == second[3]  # repr: exact
    assert rows[0]["samples"] == "2" and rows[0]["slices"] == "8" and rows[0]["slice_size"] == "64"
    assert rows[2]["slices"] == "8" and rows[2]["slice_size"] == "128"  # 16 channels x 8 rows

    entries = wm.store.outputs("similarity")
    kinds = [(e["kind"], e["call"], e["path"]) for e in entries]
    assert kinds == [
        ("bar", 1, "similarity/bar_call001.png"),
        ("csv", 1, "similarity/similarity.csv"),
        ("trend", 1, "similarity/trend.png"),
        ("bar", 2, "similarity/bar_call002.png"),
    ]
    for entry in entries:
        data = (tmp_path / entry["path"]).read_bytes()
        assert data.startswith(PNG) if entry["path"].endswith(".png") else data.startswith(b"call,")
    wm.close()

    # A new analyzer on the same folder keeps the earlier rows and continues the numbering.
    again = analyzer(SmallCNN(), tmp_path)
    third = again.get_sim(x, [0], 1, "abs_cosine")
    rows = read_csv(table)
    assert [r["call"] for r in rows] == ["1", "1", "2", "3"]
    assert float(rows[-1]["value"]) == third[0]
    assert (tmp_path / "similarity" / "bar_call003.png").read_bytes().startswith(PNG)
    assert len([e for e in again.store.outputs("similarity") if e["kind"] == "csv"]) == 1


def test_one_all_reduce_per_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All layers' values travel in one collective (the distributed issue tests several ranks)."""
    calls: list[torch.Size] = []

    def counting(tensor: torch.Tensor) -> torch.Tensor:
        calls.append(tensor.shape)
        return tensor

    monkeypatch.setattr(distributed, "all_reduce_mean", counting)
    wm = analyzer(SmallCNN(), tmp_path)
    wm.get_sim(torch.randn(2, 3, 8, 8), [0, 1, 2, 3], 1)
    assert calls == [torch.Size([2, 4])]


def test_figures_are_built_without_pyplot() -> None:
    from BBDecoder.plots.similarity import similarity_bar_figure, similarity_trend_figure

    bar = similarity_bar_figure(["0 a", "1 b"], [0.5, -0.25], "cosine", 1, 3)
    assert [t.get_text() for t in bar.axes[0].get_yticklabels()] == ["0 a", "1 b"]
    trend = similarity_trend_figure(similarity._trend_series([]))
    assert trend.axes
    series = {("cosine", "1"): {"0 a": [(2, 0.3), (1, 0.1)]}}
    line = similarity_trend_figure(series).axes[0].get_lines()[0]
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [0.1, 0.3]
