"""Any calling convention, gradients without owning backward, root-owned and lazy parameters."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sync import SyncCounter
from torch import nn

from BBDecoder import BBDecoderTypeError, BBDecoderValueError, Master_analyzer
from BBDecoder.core.hooks import count_module_hooks
from BBDecoder.kernels import gradstats


@pytest.fixture(autouse=True)
def eager_backend() -> Any:
    previous = gradstats.set_backend("eager")
    yield
    gradstats.set_backend(previous)


class KeywordNet(nn.Module):
    """Takes keyword-only token IDs and a mask, returns a dict, like a Hugging Face model."""

    def __init__(self, vocab: int = 20, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.gru = nn.GRU(width, width, batch_first=True)
        self.head = nn.Linear(width, 3)

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, Any]:
        hidden, _ = self.gru(self.embed(input_ids))
        if attention_mask is not None:
            hidden = hidden * attention_mask[..., None]
        return {"logits": self.head(hidden.mean(1)), "hidden": hidden}


class TokenNet(nn.Module):
    """A GRU over an embedding, called positionally with integer IDs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 6)
        self.gru = nn.GRU(6, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gru(self.embed(ids))[0][:, -1])


class TokenViT(nn.Module):
    """A model that owns parameters itself (class token, position embedding) besides its children."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 4))
        self.proj = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.proj(x)], dim=1) + self.pos_embed
        return self.head(tokens.mean(1))


def batch(n: int = 2, t: int = 7) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, 20, (n, t), generator=generator),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


# ------------------------------------------------------------------ calling conventions
def test_keyword_only_call_returns_exactly_the_models_output(tmp_path: Path) -> None:
    model = KeywordNet()
    wm = Master_analyzer(model, tmp_path, verbose=False)
    inputs = batch()
    expected = model(**inputs)
    got = wm.forward_propagation(**inputs)
    assert set(got) == {"logits", "hidden"}
    torch.testing.assert_close(got["logits"], expected["logits"], rtol=0, atol=0)
    torch.testing.assert_close(wm(**inputs)["hidden"], expected["hidden"], rtol=0, atol=0)
    assert count_module_hooks(model) == 0


def test_example_input_dict_gives_output_shapes_and_graph(tmp_path: Path) -> None:
    wm = Master_analyzer(KeywordNet(), tmp_path, example_input=batch(3, 5), verbose=False)
    shapes = {row["name"]: row["output_shape"] for row in wm.summary()}
    assert shapes["embed"] == [3, 5, 8]
    assert shapes["gru"] == [[3, 5, 8], [1, 3, 8]]
    assert shapes["head"] == [3, 3]
    assert wm.visualize_architecture(), "the graph is drawn from the keyword inputs"


def test_input_size_with_integer_dtype(tmp_path: Path) -> None:
    wm = Master_analyzer(TokenNet(), tmp_path, input_size=[4, 9], input_dtype=torch.long, verbose=False)
    shapes = {row["name"]: row["output_shape"] for row in wm.summary()}
    assert shapes == {"embed": [4, 9, 6], "gru": [[4, 9, 5], [1, 4, 5]], "fc": [4, 2]}


def test_first_real_call_is_remembered_as_a_spec(tmp_path: Path) -> None:
    model = TokenNet()
    wm = Master_analyzer(model, tmp_path, verbose=False)
    assert wm.summary()[0]["output_shape"] is None
    ids = torch.randint(0, 30, (2, 11))
    wm.forward_propagation(ids)
    assert wm._call_spec is not None and wm._call_spec.args[0].dtype == torch.long
    assert not any(isinstance(a, torch.Tensor) for a in wm._call_spec.args), "never the data"
    assert wm.summary()[0]["output_shape"] == [2, 11, 6]
    assert wm.visualize_architecture() != []


def test_example_input_errors(tmp_path: Path) -> None:
    with pytest.raises(BBDecoderValueError, match="input_size or example_input, not both"):
        Master_analyzer(TokenNet(), tmp_path, input_size=[1, 3], example_input=torch.zeros(1, 3), verbose=False)
    with pytest.raises(BBDecoderTypeError, match=r"input_dtype must be a torch\.dtype.*'long'"):
        Master_analyzer(TokenNet(), tmp_path, input_size=[1, 3], input_dtype="long", verbose=False)
    with pytest.raises(BBDecoderTypeError, match="example_input must hold at least one tensor"):
        Master_analyzer(TokenNet(), tmp_path, example_input=[1, 2], verbose=False)


def test_analyses_take_keyword_inputs(tmp_path: Path) -> None:
    wm = Master_analyzer(KeywordNet(), tmp_path, verbose=False)
    inputs = batch(2, 6)
    values = wm.get_sim(inputs, "gru", dim=1)
    assert set(values) == {1}
    costs = wm.layer_costs(inputs, repeats=1, warmup=0)
    assert [row["name"] for row in costs] == ["embed", "gru", "head"]
    assert costs[2]["forward_flops"] == 2 * 2 * 8 * 3  # a Linear 8 -> 3 on 2 samples, multiply-adds × 2
    assert wm.get_inter_features(inputs, "head")


# --------------------------------------------------------------------- collect_grads
def train_steps(wm: Master_analyzer, model: nn.Module, steps: int, *, own: bool) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    grads = []
    for _ in range(steps):
        model.zero_grad()
        loss = model(torch.randn(4, 3, 6, 6, generator=generator)).square().mean()
        if own:
            wm.backward_propagation(loss, collect_grads=True)
        else:
            loss.backward()
            wm.collect_grads()
        grads.append([p.grad.detach().double().clone() for p in model.parameters() if p.grad is not None])
    return grads


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))


def test_collect_grads_records_what_backward_propagation_records(tmp_path: Path) -> None:
    a, b = small_cnn(), small_cnn()
    wa = Master_analyzer(a, tmp_path / "a", verbose=False)
    wb = Master_analyzer(b, tmp_path / "b", verbose=False)
    grads = train_steps(wa, a, 3, own=True)
    train_steps(wb, b, 3, own=False)
    rows_a = read_csv(wa.save_collected_grads(0)[0].parent / "epoch_000_grads.csv")
    rows_b = read_csv(wb.save_collected_grads(0)[0].parent / "epoch_000_grads.csv")
    assert rows_a == rows_b
    assert [r["iteration"] for r in rows_b][::2] == ["0", "1", "2"]
    # and against float64: step 2, the Linear weight
    row = next(r for r in rows_b if r["iteration"] == "2" and r["layer_id"] == "3")
    g = grads[2][2]
    np.testing.assert_allclose(float(row["l2"]), g.norm().item(), rtol=1e-6)
    np.testing.assert_allclose(float(row["mean_abs"]), g.abs().mean().item(), rtol=1e-6)


def test_collect_grads_never_syncs(tmp_path: Path) -> None:
    model = small_cnn()
    wm = Master_analyzer(model, tmp_path, verbose=False)
    for _ in range(70):  # past the first buffer growth
        model.zero_grad()
        model(torch.randn(2, 3, 6, 6)).sum().backward()
        with SyncCounter() as counter:
            wm.collect_grads(collect_every=1)
        assert counter.calls == []


def test_collect_grads_unscales_with_scaler(tmp_path: Path) -> None:
    model = small_cnn()
    wm = Master_analyzer(model, tmp_path, verbose=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    plain = model[3].weight.grad.double().norm().item()
    model.zero_grad()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6)
    scaler.scale(model(x).sum()).backward()
    expected = (model[3].weight.grad.double() / 1024.0).norm().item()
    wm.collect_grads(scaler=scaler)
    rows = read_csv(wm.save_collected_grads(0)[0].parent / "epoch_000_grads.csv")
    row = next(r for r in rows if r["layer_id"] == "3")
    np.testing.assert_allclose(float(row["l2"]), expected, rtol=1e-6)
    assert plain != pytest.approx(expected * 1024.0)  # the scaled value was not what got recorded


def test_root_owned_parameters_are_recorded(tmp_path: Path) -> None:
    model = TokenViT()
    wm = Master_analyzer(model, tmp_path, verbose=False)
    model(torch.randn(2, 4, 3)).sum().backward()
    wm.collect_grads()
    rows = read_csv(wm.save_collected_grads(0)[0].parent / "epoch_000_grads.csv")
    own = {r["param"]: r for r in rows if r["layer_name"] == "(model)"}
    assert set(own) == {"cls_token", "pos_embed"} and {r["layer_id"] for r in own.values()} == {"-1"}
    np.testing.assert_allclose(float(own["cls_token"]["l2"]), model.cls_token.grad.double().norm().item(), rtol=1e-6)
    selected = Master_analyzer(model, tmp_path / "b", verbose=False)
    selected.collect_grads(layer_inds=[0, 1])  # an explicit selection names layers only
    rows = read_csv(selected.save_collected_grads(0)[0].parent / "epoch_000_grads.csv")
    assert {r["layer_name"] for r in rows} == {"proj", "head"}


# ------------------------------------------------------------------------- lazy modules
def test_lazy_modules_are_wrapped_then_recorded(tmp_path: Path) -> None:
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    keys = None
    wm = Master_analyzer(model, tmp_path, verbose=False)
    assert wm.summary()[0]["params"] is None  # unknown until the first forward pass
    out = wm.forward_propagation(torch.randn(2, 3, 8, 8))
    keys = list(model.state_dict())
    wm.backward_propagation(out.sum(), collect_grads=True)
    rows = read_csv(wm.save_collected_grads(0)[0].parent / "epoch_000_grads.csv")
    assert {r["layer_id"] for r in rows} == {"0", "3"}
    np.testing.assert_allclose(float(rows[-1]["l2"]), model[3].weight.grad.double().norm().item(), rtol=1e-6)
    assert [row["params"] for row in wm.summary()] == [4 * 3 * 9 + 4, 0, 0, 144 * 2 + 2]
    import json

    run = json.loads((tmp_path / "run.json").read_text())
    assert run["totals"]["params"] == 112 + 290
    assert list(model.state_dict()) == keys
