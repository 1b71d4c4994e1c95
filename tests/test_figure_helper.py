"""The figure helper: a batch of figures drawn by this process and a helper interpreter together."""

from __future__ import annotations

import threading

import pytest
from test_readability import layer_histograms

from BBDecoder.analyses.histograms import LayerHistograms
from BBDecoder.plots import helper
from BBDecoder.plots import weights as weight_plots


def layer(count: int, call: int) -> LayerHistograms:
    """A layer's call of ``count`` tensors (test_readability's), drifting from call to call."""
    return layer_histograms(count, call=call, drift=0.1 * call)


def jobs(count: int = 10) -> list[helper.Job]:
    batch: list[helper.Job] = []
    for k in range(count // 2):
        first, second = layer(3 + k, 1), layer(3 + k, 2)
        batch += [
            (weight_plots.weight_histogram_figure, (second,)),
            (weight_plots.weight_evolution_figure, ([first, second],)),
        ]
    return batch


@pytest.fixture
def started() -> helper._Helper:
    instance = helper._Helper()
    assert not any(name == "torch" or name.startswith("torch.") for name in instance.modules())  # booted, no torch
    yield instance
    instance.stop()


def test_a_shared_batch_gives_the_pngs_drawn_here(started: helper._Helper) -> None:
    batch = jobs()
    alone = [helper.png_bytes(*job) for job in batch]
    shared = started.share(batch)
    assert shared == alone  # byte for byte, in order, whoever drew each
    assert 1 <= started.drawn < len(batch)  # both took part
    modules = started.modules()
    assert "__mp_main__" not in modules and "BBDecoder.analyzer" not in modules  # nothing of the script or the analyzer


def test_a_failing_figure_raises_here_and_an_unpicklable_one_is_drawn_here(started: helper._Helper) -> None:
    batch = jobs(6)
    figure = weight_plots.weight_histogram_figure
    batch[1] = (weight_plots.weight_evolution_figure, ([],))  # no history: IndexError in either process
    batch[-1] = (lambda: figure(layer(2, 1)), ())  # a lambda cannot be sent: drawn here
    shared = started.share(batch)
    assert isinstance(shared[1], IndexError)
    assert all(isinstance(png, bytes) and png.startswith(b"\x89PNG") for i, png in enumerate(shared) if i != 1)
    assert shared[-1] == helper.png_bytes(*batch[-1])
    assert started.alive


def test_a_helper_that_dies_mid_batch_leaves_its_jobs_to_this_process(started: helper._Helper) -> None:
    batch = jobs(20)  # some two seconds of figures
    alone = [helper.png_bytes(*job) for job in batch]
    killer = threading.Timer(0.3, started.process.kill)
    killer.start()
    shared = started.share(batch)
    killer.join()
    assert shared == alone  # the job it was drawing was drawn here
    assert started.share(batch[:4]) is None and not started.alive  # a dead helper takes no more batches


def test_the_switch_turns_the_helper_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(helper.SWITCH, "0")
    assert helper._shared_helper() is None
    batch = jobs(4)
    assert helper.draw_pngs(batch) == [helper.png_bytes(*job) for job in batch]


def test_the_helper_draws_with_this_process_settings(started: helper._Helper) -> None:
    import matplotlib as mpl

    batch = jobs(4)
    plain = started.share(batch)
    with mpl.rc_context({"axes.facecolor": "#ffeecc", "font.family": "monospace"}):
        alone = [helper.png_bytes(*job) for job in batch]
        shared = started.share(batch)
    assert shared == alone and shared != plain  # the settings reached the helper, and changed the pictures
    assert started.share(batch) == plain  # and left with the context


@pytest.mark.parametrize("tensors", [3, 20])  # ridges, and a container's drift figure
def test_what_is_sent_stays_bounded_and_draws_the_same_figure(tensors: int) -> None:
    history = [layer(tensors, call) for call in range(1, 51)]
    sent = weight_plots.evolution_calls(history)
    assert len(sent) == weight_plots.MAX_RIDGES and sent[0] is history[0] and sent[-1] is history[-1]
    whole = helper.png_bytes(weight_plots.weight_evolution_figure, (history,))
    assert helper.png_bytes(weight_plots.weight_evolution_figure, (sent, len(history))) == whole
    title = weight_plots.weight_evolution_figure(sent, len(history)).get_label()
    assert "50 call(s)" in title and "40 drawn" in title
