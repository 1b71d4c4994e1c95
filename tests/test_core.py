"""The wrapper never changes the model; layers, summary, graph, run.json."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from models import ZOO, FrozenNet, HostileNames, KwargsDictModel, NestedNet, ResidualNet, SmallCNN
from torch import nn

import BBDecoder
from BBDecoder import Master_analyzer, graph
from BBDecoder.core.hooks import count_module_hooks

GOLDEN = Path(__file__).parent / "golden"


def test_public_api() -> None:
    assert BBDecoder.__version__.count(".") == 2
    assert "Master_analyzer" in BBDecoder.__all__
    for name in BBDecoder.__all__:
        assert hasattr(BBDecoder, name), name
    assert (Path(BBDecoder.__file__).parent / "py.typed").is_file()


@pytest.mark.parametrize("name", sorted(ZOO))
def test_wrapping_changes_nothing(name: str, tmp_path: Path) -> None:
    """Same object, same keys, bit-identical outputs and gradients, no hooks left."""
    factory, shape = ZOO[name]
    torch.manual_seed(1)
    plain = factory()
    torch.manual_seed(1)
    model = factory()
    keys_before = list(model.state_dict())
    hooks_before = count_module_hooks(model)
    x = torch.randn(shape)

    wm = Master_analyzer(model, tmp_path, shape, verbose=False)
    assert wm.model is model
    assert list(model.state_dict()) == keys_before
    assert count_module_hooks(model) == hooks_before
    assert model.training

    assert torch.equal(wm(x), plain(x))  # __call__ is forward_propagation
    out_plain = plain(x)
    out_wrapped = wm.forward_propagation(x)
    assert torch.equal(out_plain, out_wrapped)
    out_plain.square().sum().backward()
    wm.backward_propagation(out_wrapped.square().sum())
    for (n1, p1), (n2, p2) in zip(plain.named_parameters(), model.named_parameters(), strict=True):
        assert n1 == n2
        assert (p1.grad is None) == (p2.grad is None)
        if p1.grad is not None:
            assert torch.equal(p1.grad, p2.grad), n1
    for (b1, t1), (_b2, t2) in zip(plain.named_buffers(), model.named_buffers(), strict=True):
        assert torch.equal(t1, t2), b1
    wm.close()
    assert count_module_hooks(model) == hooks_before


def test_forward_passes_args_kwargs_and_dict_outputs(tmp_path: Path) -> None:
    model = KwargsDictModel()
    wm = Master_analyzer(model, tmp_path, verbose=False)
    x = torch.randn(2, 6)
    out = wm.forward_propagation(x, scale=2.0)
    ref = model(x, scale=2.0)
    assert isinstance(out, dict) and set(out) == {"logits", "aux"}
    assert torch.equal(out["logits"], ref["logits"])
    # the first forward call's shape makes output shapes known without input_size
    rows = wm.summary()
    assert rows[0]["output_shape"] == [2, 12]


def test_context_manager_and_training_flags_restored(tmp_path: Path) -> None:
    model = ResidualNet()
    model.layer1.eval()  # a user's own mix of modes must survive analysis calls
    flags = {n: m.training for n, m in model.named_modules()}
    with Master_analyzer(model, tmp_path, [1, 3, 8, 8], verbose=False) as wm:
        wm.summary()
        wm.visualize_architecture()
        assert count_module_hooks(model) == 0
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_layer_ids_depth_one_follow_registration_order(tmp_path: Path) -> None:
    wm = Master_analyzer(ResidualNet(), tmp_path, verbose=False)
    assert [(layer.id, layer.name) for layer in wm.layers] == list(
        enumerate(["conv1", "bn1", "relu", "layer1", "layer2", "avgpool", "fc"])
    )


def test_layer_ids_deeper_are_preorder(tmp_path: Path) -> None:
    model = NestedNet()
    wm = Master_analyzer(model, tmp_path, depth=2, verbose=False)
    assert wm.layers.names == ["features", "features.0", "features.1", "head"]
    wm3 = Master_analyzer(model, tmp_path, depth=3, verbose=False)
    expected = [n for n, _ in model.named_modules() if n and n.count(".") <= 2]
    assert wm3.layers.names == expected
    assert wm3.layers.names[:4] == ["features", "features.0", "features.0.0", "features.0.1"]


def test_selectors_mix_ids_names_and_negatives(tmp_path: Path) -> None:
    wm = Master_analyzer(ResidualNet(), tmp_path, verbose=False)
    chosen = wm.layers.resolve([0, "fc", -2, "layer1", 0])
    assert [layer.name for layer in chosen] == ["conv1", "fc", "avgpool", "layer1"]
    assert wm.layers.resolve("bn1")[0].id == 1
    assert len(wm.layers.resolve(None, default_all=True)) == 7


def test_ddp_style_and_compiled_wrappers_are_unwrapped(tmp_path: Path) -> None:
    model = SmallCNN()
    dp = nn.DataParallel(model)
    wm = Master_analyzer(dp, tmp_path, verbose=False)
    assert wm.model is dp and wm.inner is model
    assert wm.layers.names[0] == "conv1"
    compiled = torch.compile(model)
    wm2 = Master_analyzer(compiled, tmp_path, verbose=False)
    assert wm2.inner is model and wm2.model is compiled


def test_model_without_children_is_one_layer(tmp_path: Path) -> None:
    wm = Master_analyzer(nn.Linear(3, 2), tmp_path, [4, 3], verbose=False)
    rows = wm.summary()
    assert len(rows) == 1 and rows[0]["params"] == 8 and rows[0]["output_shape"] == [4, 2]


def test_summary_rows_and_invariants(tmp_path: Path) -> None:
    model = FrozenNet()
    wm = Master_analyzer(model, tmp_path, [3, 5], verbose=False)
    rows = wm.summary()
    assert [r["name"] for r in rows] == ["frozen", "trainable", "unused"]
    assert set(rows[0]) == {"id", "name", "type", "params", "trainable_params", "output_shape"}
    assert rows[0]["params"] == 48 and rows[0]["trainable_params"] == 0
    assert rows[1]["output_shape"] == [3, 3]
    assert rows[2]["output_shape"] is None  # never ran
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())


def test_summary_golden(tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    torch.manual_seed(0)
    Master_analyzer(ResidualNet(), tmp_path, [1, 3, 16, 16], depth=2)
    printed = capsys.readouterr().out
    golden = GOLDEN / "summary_residualnet_depth2.out"
    if request.config.getoption("--overwrite") or not golden.exists():
        golden.write_text(printed)
    assert printed == golden.read_text()


def test_summary_printed_once_at_construction_only_when_verbose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wm = Master_analyzer(SmallCNN(), tmp_path / "a", [1, 3, 8, 8])
    assert capsys.readouterr().out.count("Total params") == 1
    rows = wm.summary()  # as the README shows it, after construction: the same table is not printed twice
    assert capsys.readouterr().out == "" and len(rows) == len(wm.layers)
    wm.summary(costs=True)  # a different table (measured columns) is printed
    assert "Fwd FLOPs" in capsys.readouterr().out
    quiet = Master_analyzer(SmallCNN(), tmp_path / "c", [1, 3, 8, 8], verbose=False)
    quiet.summary()  # printed nothing, so nothing counts as printed
    quiet.verbose = True
    quiet.summary()
    assert capsys.readouterr().out.count("Total params") == 1
    Master_analyzer(SmallCNN(), tmp_path / "b", [1, 3, 8, 8], verbose=False)
    assert capsys.readouterr().out == ""


def test_architecture_graph_has_layer_ids(tmp_path: Path) -> None:
    if not graph.dot_available():
        pytest.skip("Graphviz dot is not installed")
    wm = Master_analyzer(ResidualNet(), tmp_path, [1, 3, 8, 8], verbose=False)
    folder = tmp_path / "architecture"
    names = ["architecture_001.gv", "architecture_001.png", "architecture_001.svg"]  # named by the layout table
    assert sorted(p.name for p in folder.iterdir()) == names
    assert (folder / "architecture_001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = (folder / "architecture_001.svg").read_text()
    for layer in wm.layers:
        if layer.name != "layer1":  # containers are drawn as clusters, their children labelled
            assert f"#{layer.id}" in svg, layer.name


def test_architecture_falls_back_to_a_depth_torchview_can_draw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchview raises KeyError on GPT-2 below depth 1: the graph is drawn shallower, with a warning saying so."""
    import torchview

    real = torchview.draw_graph
    depths: list[int] = []

    def picky(*args: Any, depth: int, **kwargs: Any) -> Any:
        depths.append(depth)
        if depth > 1:
            raise KeyError("140509755406928")
        return real(*args, depth=depth, **kwargs)

    monkeypatch.setattr(torchview, "draw_graph", picky)
    with pytest.warns(
        BBDecoder.BBDecoderWarning, match=r"at depth 2 \(KeyError: '140509755406928'\); it is drawn at depth 1"
    ):
        wm = Master_analyzer(ResidualNet(), tmp_path, [1, 3, 8, 8], depth=2, verbose=False)
    assert depths == [2, 1]
    assert sorted(e["kind"] for e in wm.store.outputs("architecture"))[0] == "gv"
    assert "#0" in (tmp_path / "architecture/architecture_001.gv").read_text()


def test_architecture_without_dot_writes_source_and_warns_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graph, "dot_available", lambda: False)
    monkeypatch.setattr(graph, "_warned_missing_dot", False)
    with pytest.warns(BBDecoder.GraphvizMissingWarning, match="apt-get install graphviz"):
        Master_analyzer(SmallCNN(), tmp_path / "one", [1, 3, 8, 8], verbose=False)
    assert sorted(p.name for p in (tmp_path / "one" / "architecture").iterdir()) == ["architecture_001.gv"]
    source = (tmp_path / "one" / "architecture" / "architecture_001.gv").read_text()
    assert source.startswith("strict digraph architecture") and "#0" in source
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Master_analyzer(SmallCNN(), tmp_path / "two", [1, 3, 8, 8], verbose=False)  # no second warning


def test_graph_failure_warns_and_never_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchview

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(torchview, "draw_graph", broken)
    with pytest.warns(BBDecoder.BBDecoderWarning, match="boom"):
        wm = Master_analyzer(SmallCNN(), tmp_path, [1, 3, 8, 8], verbose=False)
    assert wm.layers.names[0] == "conv1"


def test_hostile_names_stay_inside_save_path(tmp_path: Path) -> None:
    root = tmp_path / "out"
    wm = Master_analyzer(HostileNames(), root, [1, 4], depth=2, verbose=False)
    assert "blocks./etc/passwd" in wm.layers.names
    outside = {p for p in tmp_path.rglob("*")} - {root} - set(root.rglob("*"))
    assert outside == set()
    if graph.dot_available():
        svg = (root / "architecture" / "architecture_001.svg").read_text()
        assert "<script>" not in svg and "&lt;script&gt;" in svg


def test_run_json_records_layers_versions_and_sessions(tmp_path: Path) -> None:
    Master_analyzer(SmallCNN(), tmp_path, [1, 3, 8, 8], verbose=False)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["version"] == BBDecoder.__version__ and record["torch"] == torch.__version__
    assert [layer["name"] for layer in record["layers"]][:2] == ["conv1", "bn1"]
    assert record["layers"][0]["params"] == 3 * 8 * 9 + 8
    Master_analyzer(SmallCNN(), tmp_path, verbose=False)
    again = json.loads((tmp_path / "run.json").read_text())
    assert again["created"] == record["created"] and len(again["sessions"]) == 2
