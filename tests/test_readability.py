"""Issue 13: figures and statistics that stay readable and honest on big models.

Every figure function is fed synthetic data for 5, 100 and 500 tensors (or layers) and
saved the way the store saves it (110 dpi, tight bounding box); each must stay under
4,000 px on its long side, and no text may be smaller than 8 px at 100% zoom. Then the
statistics: saturation is not flagged for norm layers at init (nor for default
initialisations), is flagged for weights piling up at the ends of their range; backward
FLOPs go to the layer whose forward created the work; a container that never runs itself
reports the sum of its children.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.text import Text
from models import DropoutHeadNet, ResNet50Like, TinyGPT
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from BBDecoder import Master_analyzer
from BBDecoder.analyses.weights import LayerHistograms, ParamHistogram, histogram_arrays, load_histograms
from BBDecoder.analyses.weights import tensor_histogram as _tensor_histogram
from BBDecoder.plots import STORE_DPI, PlainFormatter
from BBDecoder.plots import cost as cost_plots
from BBDecoder.plots import gradients as grad_plots
from BBDecoder.plots import similarity as sim_plots
from BBDecoder.plots import weights as weight_plots

SIZES = (5, 100, 500)
MAX_PX = 4000
MIN_TEXT_PX = 8.0


# ------------------------------------------------------------------ helpers
def saved_size(figure: Figure) -> tuple[int, int]:
    """Pixel size of ``figure`` saved as the store saves it (``Store.save_figure``).

    A figure laid out by hand keeps everything on its canvas: its PNG is cut from one
    drawing, never measured and drawn again by matplotlib (a text past the edge would be).
    """
    buffer = io.BytesIO()
    with mock.patch.object(Figure, "savefig", autospec=True, side_effect=Figure.savefig) as measured_again:
        figure.savefig(buffer, format="png", dpi=STORE_DPI, bbox_inches="tight")
    if figure.get_layout_engine() is None:
        assert not measured_again.called, f"{figure.get_label()!r} spills past its canvas"
    buffer.seek(0)
    with Image.open(buffer) as image:
        return image.size


def smallest_text_px(figure: Figure) -> float:
    """The smallest visible, non-empty text of ``figure``, in pixels at the store's dpi."""
    figure.canvas.draw()  # tick labels exist only once drawn
    sizes = [
        text.get_fontsize() * STORE_DPI / 72
        for text in figure.findobj(Text)
        if text.get_visible() and text.get_text().strip() and _on_figure(text)
    ]
    return min(sizes, default=math.inf)


def _on_figure(text: Text) -> bool:
    axes = text.axes
    if axes is not None and not axes.get_visible():
        return False
    return text.get_window_extent().width > 0


def check(figure: Figure) -> tuple[int, int]:
    width, height = saved_size(figure)
    assert max(width, height) <= MAX_PX, (width, height)
    assert smallest_text_px(figure) >= MIN_TEXT_PX
    return width, height


def row_labels_of(axes: Any) -> list[str]:
    """The row labels of a bar chart, whether drawn as tick labels or as text columns left of the axes."""
    ticks = [tick.get_text() for tick in axes.get_yticklabels()]
    if any(ticks):
        return ticks
    rows: dict[int, str] = {}
    for text in axes.texts:
        x, y = text.get_position()
        if x >= 0:
            continue  # the notes, right of the bars
        for offset, line in enumerate(text.get_text().split("\n")):
            if line:
                rows[round(y + 0.5) + offset] = line
    return [rows[i] for i in sorted(rows)]


def tensor_labels(count: int) -> list[str]:
    """``"ID name.param"`` labels of a ResNet-like model at depth 2 with ``count`` tensors."""
    labels = []
    per_block = 6
    for index in range(count):
        block, slot = divmod(index, per_block)
        stage, inner = divmod(block, 4)
        module = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")[slot]
        labels.append(f"{block + 2} layer{stage + 1}.{inner}.{module}.weight")
    return labels


def flow_data(count: int) -> dict[str, Any]:
    rng = np.random.default_rng(count)
    mean = 10.0 ** rng.uniform(-7, -1, count)
    top = mean * 10.0 ** rng.uniform(0.5, 2, count)
    status = ["ok"] * count
    for index, state in ((1, "zero"), (2, "frozen"), (3, "nonfinite")):
        if index < count:
            status[index] = state
            mean[index] = 0.0 if state == "zero" else np.nan
            top[index] = 0.0 if state == "zero" else np.nan if state == "frozen" else np.inf
    return {"labels": tensor_labels(count), "mean_abs": mean, "max_abs": top, "status": status}


def norm_panels(count: int, iterations: int = 60) -> list[grad_plots.NormPanel]:
    rng = np.random.default_rng(count)
    its = np.arange(100, 100 + iterations)
    return [
        grad_plots.NormPanel(
            f"{i} layer{i // 20}.{i % 20}",
            its,
            10.0 ** rng.normal(-1 - i % 5, 0.2, iterations),
            10.0 ** rng.normal(-2 - i % 5, 0.2, iterations),
        )
        for i in range(count)
    ]


def histogram(name: str, values: np.ndarray, bins: int = 100) -> ParamHistogram:
    tensor = torch.as_tensor(values, dtype=torch.float64)
    vector = _tensor_histogram(tensor, bins).numpy()
    from BBDecoder.analyses.weights import _unpack

    return _unpack(name, tuple(tensor.shape), vector, bins)


def layer_histograms(count: int, call: int = 1, drift: float = 0.0) -> LayerHistograms:
    rng = np.random.default_rng(count + call)
    layer = LayerHistograms(7, "features.denseblock4", "DenseBlock", call)
    for index in range(count):
        unit, slot = divmod(index, 3)
        if slot == 1:  # a norm layer's γ near init: narrow around 1
            values = 1 + 4e-5 * rng.standard_normal(64) + drift * 0.01
            name = f"denselayer{unit + 1}.norm.weight"
        elif slot == 2:
            values = np.clip(rng.standard_normal(200), -1, 1) if unit == 3 else rng.standard_normal(64) * 0.01
            name = f"denselayer{unit + 1}.norm.bias"
        else:
            values = rng.uniform(-0.05, 0.05, (16, 8, 3, 3)) * (1 + drift)
            name = f"denselayer{unit + 1}.conv.weight"
        layer.params.append(histogram(name, values))
    return layer


# ---------------------------------------------------------------- figures
@pytest.mark.parametrize("count", SIZES)
def test_gradient_flow_stays_readable(count: int) -> None:
    data = flow_data(count)
    figure = grad_plots.gradient_flow_figure(**data, title="flow", vanish_threshold=1e-8, explode_threshold=1e3)
    check(figure)
    (axes,) = figure.axes
    assert axes.xaxis.get_label_position() == "top"  # the log axis is where the eye starts
    rows = len(row_labels_of(axes))
    assert rows == count if count <= grad_plots.FLOW_PAGE else rows <= grad_plots.FLOW_PAGE
    if count > grad_plots.FLOW_PAGE:  # grouped: one row per block, the detail paged
        assert "per-tensor detail" in figure.get_label()
    pages = grad_plots.gradient_flow_pages(**data, title="flow")
    assert len(pages) == math.ceil(count / grad_plots.FLOW_PAGE)
    shown = [label for page in pages for label in row_labels_of(page.axes[0])]
    assert shown == data["labels"]  # every tensor, once, in order
    limits = {page.axes[0].get_xlim() for page in pages}
    assert len(limits) == 1  # every page on the same axis
    for page in pages[:2] + pages[-1:]:
        check(page)
    if len(pages) > 1:
        assert "page 2 of" in pages[1].get_label() and f"{grad_plots.FLOW_PAGE} a page" in pages[1].get_label()


def test_flow_groups_follow_the_module_tree() -> None:
    labels = tensor_labels(107)
    groups = grad_plots.flow_groups(labels, max_rows=60)
    assert len(groups) <= 60
    assert sorted(i for _, members in groups for i in members) == list(range(107))
    assert groups[0][0] == "2 layer1.0"  # one row per block
    depth_one = grad_plots.flow_groups([f"0 features.denseblock{i % 4}.layer{i}.weight" for i in range(242)], 60)
    assert [label for label, _ in depth_one] == [f"0 features.denseblock{i}" for i in range(4)]


@pytest.mark.parametrize("count", SIZES)
def test_norm_curves_stay_readable(count: int) -> None:
    panels = norm_panels(count)
    pages = grad_plots.norm_curves_pages(panels, title="norms", skipped=[110])
    assert len(pages) == math.ceil(count / grad_plots.NORM_PAGE)
    for page in pages[:1] + pages[-1:]:
        check(page)
    first = pages[0]
    ranges = {axes.get_ylim() for axes in first.axes}
    assert len(ranges) == 1  # shared y scale by default, across pages too
    assert {axes.get_ylim() for page in pages for axes in page.axes} == ranges
    first.canvas.draw()
    ticks = [float(t.get_text().replace("−", "-")) for t in first.axes[-1].get_xticklabels() if t.get_text()]
    assert ticks and all(value == int(value) for value in ticks)  # integer iterations
    own = grad_plots.norm_curves_figure(panels[:5], title="own", y_scale="panel")
    assert len({axes.get_ylim() for axes in own.axes}) > 1
    with pytest.raises(ValueError, match="norm_curves_pages"):
        grad_plots.norm_curves_figure(norm_panels(grad_plots.MAX_NORM_PANELS + 1), title="too many")


def test_a_big_models_epoch_saves_a_grouped_flow_its_tensors_numbers_and_shared_norm_pages(tmp_path: Path) -> None:
    """save_collected_grads on 70 tensors: the grouped chart, every tensor in alerts.json and the report's table."""
    from BBDecoder.report.builder import collect

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4, bias=False) for _ in range(70)])
    wm = Master_analyzer(model, tmp_path, verbose=False)
    for _ in range(3):
        wm.backward_propagation(wm.forward_propagation(torch.randn(2, 4)).square().sum(), collect_grads=True)
    grads = [[p.grad.detach().double().abs() for p in model.parameters()]]  # the last step's, for one check
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 70 stacked linears: the gradients do vanish
        written = wm.save_collected_grads(0)
    kinds: dict[str, list[str]] = {}
    for entry in wm.store.outputs("gradients"):
        kinds.setdefault(entry["kind"], []).append(entry["path"])
    assert kinds["flow"] == ["gradients/epoch_000_flow.png"]
    assert kinds["norms"] == [f"gradients/epoch_000_norms_{k}of3.png" for k in (1, 2, 3)]  # 24 layers a page
    for path in kinds["norms"]:
        assert tmp_path / path in written
        with Image.open(tmp_path / path) as image:
            assert max(image.size) <= MAX_PX
    (frame,) = collect(wm.store)["gradients"]["frames"]
    table = frame["details"]["table"]
    assert [row[0] for row in table["rows"]] == [f"{i} {i}.weight" for i in range(70)]  # every tensor, in order
    assert all(row[2] >= grads[0][i].max().item() * (1 - 1e-6) for i, row in enumerate(table["rows"]))  # epoch max
    positive = [v for row in table["rows"] for v in row[1:3] if v]
    assert 10.0 ** table["low"] <= min(positive) and max(positive) <= 10.0 ** table["high"]


@pytest.mark.parametrize("count", SIZES)
def test_heatmap_stays_readable(count: int) -> None:
    rng = np.random.default_rng(0)
    matrix = 10.0 ** rng.normal(-3, 1, (count, 300))
    figure = grad_plots.gradient_heatmap_figure(
        matrix, [f"{i} layer.{i}" for i in range(count)], np.arange(300), np.repeat(np.arange(3), 100)
    )
    check(figure)


@pytest.mark.parametrize("count", SIZES)
def test_weight_histograms_stay_readable(count: int) -> None:
    first = layer_histograms(count)
    figure = weight_plots.weight_histogram_figure(first)
    check(figure)
    if count > weight_plots.MAX_PANELS:  # a container: one summary, not a wall of panels
        assert len(figure.axes) <= 4  # one panel per kind of tensor
    history = [first, layer_histograms(count, call=2, drift=0.5), layer_histograms(count, call=3, drift=1.0)]
    check(weight_plots.weight_evolution_figure(history))


@pytest.mark.parametrize("count", SIZES)
def test_cost_and_similarity_stay_readable(count: int) -> None:
    rng = np.random.default_rng(count)
    labels = [f"{i} features.block{i}" for i in range(count)]
    forward = rng.integers(0, 10**9, count)
    totals = {"total_forward": int(forward.sum()), "total_backward": int(2 * forward.sum())}
    check(cost_plots.flops_figure(labels, forward, 2 * forward, **totals, title="t"))
    ms = rng.uniform(0.01, 3, count)
    check(cost_plots.time_figure(labels, ms, ms * 0.9, ms * 1.1, whole_ms=float(ms.sum()), title="t"))
    check(sim_plots.similarity_bar_figure(labels, rng.uniform(0, 1, count).tolist(), "cosine", 1, 3))
    series = {("cosine", "1"): {label: [(c, float(rng.uniform())) for c in (1, 2, 3)] for label in labels}}
    check(sim_plots.similarity_trend_figure(series))


def test_tick_labels_never_use_offsets() -> None:
    formatter = PlainFormatter()
    locs = [0.99996, 0.99998, 1.0, 1.00002, 1.00004]
    labels = formatter.format_ticks(locs)
    assert labels == ["0.99996", "0.99998", "1", "1.00002", "1.00004"]
    assert formatter.get_offset() == ""
    assert PlainFormatter().format_ticks([-2e-5, 0.0, 2e-5]) == ["-2e-5", "0", "2e-5"]
    gamma = histogram("norm.weight", 1 + 4e-5 * np.random.default_rng(0).standard_normal(64))
    figure = weight_plots.weight_histogram_figure(LayerHistograms(1, "bn1", "BatchNorm2d", 1, [gamma]))
    figure.canvas.draw()
    axes = figure.axes[0]
    assert axes.xaxis.get_offset_text().get_text() == ""
    assert all("e-4+1" not in t.get_text() and "+1" not in t.get_text() for t in axes.get_xticklabels())


# ------------------------------------------------------------- saturation
def saturation(values: torch.Tensor) -> float:
    return histogram("w", values.detach().double().numpy()).saturation_fraction


def test_norm_layers_at_init_are_not_saturated() -> None:
    torch.manual_seed(0)
    for module in (nn.BatchNorm2d(64), nn.LayerNorm(768), nn.BatchNorm1d(2048)):
        for param in module.parameters():  # γ = 1 and β = 0 exactly: constant tensors
            assert saturation(param) == 0.0
            near = param.detach() + 4e-5 * torch.randn_like(param)  # after a few steps: ≈1 ± 4e-5
            assert saturation(near) == 0.0
        # Adam's sign-like first step puts every γ at 1 ± lr: narrow, not saturated. (β = 0 ± lr is two-valued
        # around 0, as a binarised weight is, and is counted as saturated until the next steps spread it.)
        steps = module.weight.detach() + 1e-3 * torch.sign(torch.randn_like(module.weight))
        assert saturation(steps) == 0.0
    for module in (nn.Linear(128, 64), nn.Conv2d(3, 16, 3), nn.Conv2d(64, 64, 1), nn.Embedding(100, 16)):
        for param in module.parameters():  # default initialisations: uniform or normal
            assert saturation(param) == 0.0


def test_weights_piling_up_at_the_extremes_are_saturated() -> None:
    torch.manual_seed(0)
    clipped = torch.randn(256, 128).clamp(-1.0, 1.0)  # weight clipping (WGAN)
    expected = float((clipped.abs() >= 0.99).double().mean())
    assert saturation(clipped) == pytest.approx(expected)
    assert 0.3 < saturation(clipped) < 0.34
    assert saturation(torch.sign(torch.randn(1000))) == 1.0  # binarised
    one_sided = torch.randn(5000).clamp(max=1.0)
    band = 1.0 - 0.005 * (1.0 - float(one_sided.min()))  # the top 0.5% of the range
    assert saturation(one_sided) == pytest.approx(float((one_sided >= band).double().mean()))
    linear = nn.Linear(64, 32)
    with torch.no_grad():  # pressed against a max-norm limit: a quarter of the weights at ±max
        bound = linear.weight.abs().max().item()
        linear.weight[:8] = bound * torch.sign(linear.weight[:8])
    assert 0.25 <= saturation(linear.weight) < 0.27  # the quarter, and the few others in the bands


def test_saturation_is_saved_and_shaded_only_where_it_piles_up(tmp_path: Path) -> None:
    clipped = histogram("clipped", torch.randn(4000).clamp(max=1.0).numpy())
    assert weight_plots.saturated_ends(clipped) == (False, True)
    assert weight_plots.saturated_ends(histogram("flat", np.linspace(-1, 1, 1000))) == (False, False)
    layer = LayerHistograms(0, "fc", "Linear", 1, [clipped])
    np.savez(tmp_path / "h.npz", **histogram_arrays(layer))
    assert load_histograms(tmp_path / "h.npz").params[0].saturation_fraction == clipped.saturation_fraction > 0


def test_a_cut_png_matches_matplotlibs_tight_box() -> None:
    """PlotFigure draws once and cuts the inked box; the picture is matplotlib's own tight save."""
    from BBDecoder.plots import new_figure

    def drawn(spill: str) -> Figure:
        figure = new_figure(4.0, 2.0, layout=None)
        ax = figure.add_axes((0.2, 0.25, 0.6, 0.5))
        ax.plot([0, 1, 2], [3, 1, 2], label="a line")
        ax.set_title("a title")
        note_x = 1.05 if spill == "note" else 0.02
        figure.text(note_x, 0.95, "a note that may spill past the right edge", fontsize=8, va="top")
        if spill == "legend":  # wholly beyond the edge: no ink of it on the canvas
            ax.legend(loc="upper left", bbox_to_anchor=(1.9, 1.0))
        return figure

    for spill in ("none", "note", "legend"):
        buffer = io.BytesIO()
        drawn(spill).savefig(buffer, format="png", dpi=STORE_DPI, bbox_inches="tight")
        reference = io.BytesIO()
        Figure.savefig(drawn(spill), reference, format="png", dpi=STORE_DPI, bbox_inches="tight")
        ours, theirs = (np.asarray(Image.open(b).convert("L")) < 128 for b in (buffer, reference))
        # the same picture, give or take a few pixels of margin: the cut counts the faint edge of
        # antialiased ink, matplotlib's box leaves it out and rounds its edges
        assert abs(ours.shape[0] - theirs.shape[0]) <= 4 and abs(ours.shape[1] - theirs.shape[1]) <= 4, spill
        if spill != "none":  # it lies outside the figure: it was measured, the picture is wider than the figure
            assert ours.shape[1] > 4.0 * STORE_DPI
        ours, theirs = inked(ours), inked(theirs)
        assert ours.shape == theirs.shape and (ours != theirs).mean() < 0.01, spill


def test_a_cut_png_keeps_what_a_save_draws() -> None:
    """Animated artists, a transparent save and a figure frame come out as matplotlib's savefig makes them."""
    import matplotlib as mpl

    from BBDecoder.plots import new_figure

    def drawn(frame: bool = False) -> Figure:
        figure = new_figure(3.0, 2.0, layout=None)
        if frame:
            figure.set_linewidth(3)
            figure.set_edgecolor("red")
        ax = figure.add_axes((0.2, 0.2, 0.6, 0.6))
        ax.plot([0, 1], [0, 1], color="k", linewidth=6, animated=True)
        return figure

    def pixels(figure: Figure, saver: Any) -> np.ndarray:
        buffer = io.BytesIO()
        saver(figure, buffer, format="png", dpi=STORE_DPI, bbox_inches="tight")
        return np.asarray(Image.open(buffer).convert("RGBA"))

    for frame, rc in ((False, {}), (False, {"savefig.transparent": True}), (True, {})):
        with mpl.rc_context(rc):
            ours = pixels(drawn(frame), lambda f, *a, **k: f.savefig(*a, **k))
            theirs = pixels(drawn(frame), lambda f, *a, **k: Figure.savefig(f, *a, **k))
        dark = lambda a: int((a[..., :3].max(axis=2) < 60).sum())  # noqa: E731
        assert dark(ours) == pytest.approx(dark(theirs), rel=0.05), (frame, rc)  # the animated line is there
        assert int((ours[..., 3] == 0).sum()) == pytest.approx(int((theirs[..., 3] == 0).sum()), rel=0.05)
        red = lambda a: int(((a[..., 0] > 200) & (a[..., 1] < 60)).sum())  # noqa: E731
        assert red(ours) == pytest.approx(red(theirs), rel=0.05, abs=5), (frame, rc)


def inked(dark: np.ndarray) -> np.ndarray:
    rows, columns = np.flatnonzero(dark.any(axis=1)), np.flatnonzero(dark.any(axis=0))
    return dark[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]


def test_zeros_are_flagged_where_they_replace_values_not_at_a_zero_start() -> None:
    torch.manual_seed(0)
    beta = histogram("norm.bias", nn.BatchNorm2d(64).bias.detach().numpy())  # β = 0: a start, not a fault
    assert beta.zeros_fraction == 1.0 and weight_plots.flags(beta) == []
    pruned = torch.randn(64, 32)
    pruned[torch.rand(64, 32) < 0.6] = 0.0  # 60% of a trained weight gone to zero: dead or pruned
    assert weight_plots.flags(histogram("fc.weight", pruned.numpy())) == ["zeros"]
    few = torch.randn(64, 32)
    few[:10] = 0.0  # 31% zeros: under the flag
    assert weight_plots.flags(histogram("fc.weight", few.numpy())) == []


def test_numbered_groups_read_level_with_their_name_once() -> None:
    layer = layer_histograms(72)  # denselayer1 … denselayer24, three tensors each
    figure = weight_plots.weight_summary_figure(layer)
    bottom = figure.axes[-1]
    names = [t for t in bottom.texts if t.get_text().isdigit()]
    assert [t.get_text() for t in names] == [str(i) for i in range(1, 25)]
    assert all(t.get_rotation() == 0 for t in names)
    assert [t.get_text() for t in bottom.texts if "denselayer" in t.get_text()] == ["denselayer (number)"]
    check(figure)


# ----------------------------------------------------------------- FLOPs
def costs(model: nn.Module, example: Any, tmp_path: Path, depth: int = 1) -> tuple[dict[str, dict], dict[str, Any]]:
    wm = Master_analyzer(model, tmp_path, depth=depth, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = {row["name"]: row for row in wm.layer_costs(example, repeats=1, warmup=0)}
    counter = FlopCounterMode(display=False)
    model.eval()
    with counter:
        out = model(example)
        forward = counter.get_total_flops()
        torch.autograd.grad(out.float().sum(), [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    model.train()
    return rows, {"forward": forward, "backward": counter.get_total_flops() - forward}


def test_backward_flops_go_to_the_layer_whose_forward_made_the_work(tmp_path: Path) -> None:
    rows, totals = costs(DropoutHeadNet(), torch.randn(2, 3, 8, 8), tmp_path)
    for name in ("avgpool", "dropout"):  # parameter-free, no forward FLOPs: no backward FLOPs
        assert rows[name]["forward_flops"] == 0 and rows[name]["backward_flops"] == 0, rows[name]
    assert rows["fc"]["backward_flops"] == 2 * rows["fc"]["forward_flops"]  # input and weight gradients
    assert rows["conv"]["backward_flops"] == rows["conv"]["forward_flops"]  # weight only: the batch needs none
    assert sum(row["backward_flops"] for row in rows.values()) == totals["backward"]
    assert sum(row["forward_flops"] for row in rows.values()) == totals["forward"]


def test_no_parameter_free_layer_gets_backward_flops_on_a_resnet(tmp_path: Path) -> None:
    rows, totals = costs(ResNet50Like(width=4), torch.randn(1, 3, 32, 32), tmp_path)
    for row in rows.values():
        if row["params"] == 0:
            assert row["forward_flops"] == 0 and row["backward_flops"] == 0, row
    assert sum(row["backward_flops"] for row in rows.values()) == totals["backward"]


def test_a_container_that_never_runs_reports_its_children(tmp_path: Path) -> None:
    model = TinyGPT()
    rows, totals = costs(model, torch.randint(0, 50, (2, 8)), tmp_path, depth=3)
    blocks = [rows[f"transformer.h.{i}"] for i in range(3)]
    assert rows["transformer.h"]["forward_flops"] == sum(b["forward_flops"] for b in blocks) > 0
    assert rows["transformer.h"]["backward_flops"] == sum(b["backward_flops"] for b in blocks) > 0
    # and its time and output bytes are those of its blocks' calls (one timed pass: the sum is exact)
    assert rows["transformer.h"]["forward_ms"] == pytest.approx(sum(b["forward_ms"] for b in blocks))
    assert 0 < rows["transformer.h"]["forward_ms"] <= rows["transformer"]["forward_ms"]
    assert rows["transformer.h"]["activation_bytes"] == sum(b["activation_bytes"] for b in blocks) > 0
    shallow, _ = costs(model, torch.randint(0, 50, (2, 8)), tmp_path / "depth2", depth=2)  # blocks not numbered
    assert shallow["transformer.h"]["forward_ms"] > 0
    assert shallow["transformer.h"]["activation_bytes"] == rows["transformer.h"]["activation_bytes"]
    top = [rows["transformer"], rows["lm_head"]]  # depth-1 layers add up to the model
    assert sum(r["forward_flops"] for r in top) == totals["forward"]
    assert sum(r["backward_flops"] for r in top) == totals["backward"]
    assert rows["transformer.drop"]["backward_flops"] == 0 and rows["transformer.wte"]["backward_flops"] == 0


def test_tied_names_with_spaces_round_trip_and_containers_say_so(tmp_path: Path) -> None:
    params = [histogram(f"unit{i}.weight", np.linspace(-1, 1, 32)) for i in range(20)]
    params[0].tied = ("d.my emb.weight", "head\nx.weight")  # ModuleDict keys may hold spaces and newlines
    layer = LayerHistograms(3, "block", "Sequential", 1, params)
    np.savez(tmp_path / "h.npz", **histogram_arrays(layer))
    assert load_histograms(tmp_path / "h.npz").params[0].tied == ("d.my emb.weight", "head\nx.weight")
    figure = weight_plots.weight_summary_figure(layer)  # 20 tensors: the container summary
    assert any(t.get_text().startswith("tied: unit0.weight = d.my emb.weight") for t in figure.texts)
    assert "nothing flagged" in " ".join(t.get_text() for t in figure.texts)
    check(figure)


def test_a_module_shared_by_two_containers_counts_once(tmp_path: Path) -> None:
    """A never-called ModuleDict holding one Linear twice: its FLOPs, bytes and time are that Linear's, once."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            linear = nn.Linear(32, 32)
            self.c = nn.ModuleDict({"x": nn.ModuleList([linear]), "y": nn.ModuleList([linear])})

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c["x"][0](x)

    rows, totals = costs(Shared(), torch.randn(4, 32), tmp_path)
    assert rows["c"]["forward_flops"] == totals["forward"] == 2 * 4 * 32 * 32
    assert rows["c"]["backward_flops"] == totals["backward"]
    assert rows["c"]["activation_bytes"] == 4 * 32 * 4
