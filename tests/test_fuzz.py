"""Property test: every public method, given arbitrary arguments, succeeds or raises a BBDecoder error.

Never an obscure exception from deep inside (numpy's OverflowError, torch's "Boolean value of
Tensor is ambiguous"), never a hang (each call has a deadline). The number of examples is
bounded so the suite stays fast; ``BBDECODER_FUZZ_EXAMPLES`` raises it for a longer battery.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from BBDecoder import BBDecoderError, Master_analyzer  # noqa: E402

EXAMPLES = int(os.environ.get("BBDECODER_FUZZ_EXAMPLES", "8"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=20_000,  # ms: a call that would hang (bins=10**7, repeats=10**9) must be refused instead
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)


def tensors() -> st.SearchStrategy[torch.Tensor]:
    shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4)
    dtypes = st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.complex64, torch.float16])
    return st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype), shapes, dtypes)


NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.sampled_from([0, 1, -1, 2, 5, 10**7, 10**9, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["", "abc", "conv", "fc", "/etc/passwd", "..", "\x1b[31m", "a,b\n"]),
    st.lists(st.integers(-3, 6), max_size=4),
    st.complex_numbers(max_magnitude=10, allow_nan=False),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    tensors(),
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


def outcome(call: Callable[[], Any]) -> str:
    """``"ok"`` or ``"clear"`` (a BBDecoder error); anything else fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except BBDecoderError:
            return "clear"
    return "ok"


def analyzer(folder: str) -> tuple[Master_analyzer, Net]:
    torch.manual_seed(0)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wm = Master_analyzer(model, folder, verbose=False)
        out = wm(torch.randn(2, 3, 8, 8))
        wm.backward_propagation(out.sum(), collect_grads=True)
    return wm, model


X = torch.randn(2, 3, 8, 8)


@SETTINGS
@given(st.tuples(NASTY, NASTY, NASTY, NASTY))
def test_constructor(values: tuple[Any, ...]) -> None:
    input_size, depth, verbose, extra = values
    with tempfile.TemporaryDirectory() as folder:
        for kwargs in (
            {"input_size": input_size},
            {"depth": depth},
            {"verbose": verbose},
            {"include_bias": extra},
            {"vanish_threshold": depth, "explode_threshold": extra},
            {"example_input": input_size},
            {"tensorboard_dir": extra if isinstance(extra, str) and not extra.strip() else None},
        ):
            outcome(lambda kwargs=kwargs: Master_analyzer(Net(), folder, **{"verbose": False, **kwargs}).close())
        outcome(lambda: Master_analyzer(Net(), input_size if not isinstance(input_size, str) else "", verbose=False))


@SETTINGS
@given(st.tuples(NASTY, NASTY, NASTY, NASTY))
def test_analyses(values: tuple[Any, ...]) -> None:
    a, b, c, d = values
    with tempfile.TemporaryDirectory() as folder:
        wm, _ = analyzer(folder)
        calls: list[Callable[[], Any]] = [
            lambda: wm.get_sim(X, a, b),
            lambda: wm.get_sim(X, 0, 1, sim_method=c),
            lambda: wm.get_sim(a, 0, 1),
            lambda: wm.get_inter_features(X, a, post_proc=None, dim=b),
            lambda: wm.get_inter_features(X, 0, tag=c, all_samples=d),
            lambda: wm.get_inter_features(a, 0),
            lambda: wm.grad_cam(a, X),
            lambda: wm.grad_cam(0, X, target_class=b),
            lambda: wm.grad_cam(0, a),
            lambda: wm.visualize_weight_hist(a, bins=8),
            lambda: wm.visualize_weight_hist(0, bins=b),
            lambda: wm.layer_costs(a, repeats=1, warmup=0),
            lambda: wm.layer_costs([1, 3, 8, 8], repeats=b, warmup=c),
            lambda: wm.summary(costs=a),
            lambda: wm.compile_feature_evolution(a, fps=b),
        ]
        for call in calls:
            outcome(call)


@SETTINGS
@given(st.tuples(NASTY, NASTY, NASTY, NASTY))
def test_gradients(values: tuple[Any, ...]) -> None:
    a, b, c, d = values
    with tempfile.TemporaryDirectory() as folder:
        wm, model = analyzer(folder)

        def backward(**kwargs: Any) -> None:
            model.zero_grad()
            wm.backward_propagation(model(X).sum(), **kwargs)

        calls: list[Callable[[], Any]] = [
            lambda: backward(collect_grads=a),
            lambda: backward(collect_grads=True, layer_inds=b),
            lambda: backward(collect_grads=True, collect_every=c),
            lambda: backward(collect_grads=True, include_bias=d),
            lambda: backward(collect_grads=True, scaler=a),
            lambda: wm.backward_propagation(a),
            lambda: wm.backward_propagation(model(X) * 1, gradient=b),
            lambda: wm.backward_propagation(model(X).sum(), inputs=[] if a is None else a),
            lambda: wm.collect_grads(a),
            lambda: wm.collect_grads(collect_every=b, iteration=c),
            lambda: wm.save_collected_grads(a),
            lambda: wm.save_collected_grads(0, save_folder=b if not isinstance(b, str) else None),
        ]
        for call in calls:
            outcome(call)
        assert Path(folder).is_dir()


def test_cached_selection_is_checked_again(tmp_path: Path) -> None:
    """``5`` then ``5.0``, ``True`` after ``1``, ``[False]`` after ``[0]``: equal hashes, still refused."""
    wm, model = analyzer(str(tmp_path))
    for good, bad in ((4, 4.0), (1 + 3, True), ([0], [False]), (4, 4 + 0j)):
        model.zero_grad()
        wm.backward_propagation(model(X).sum(), collect_grads=True, layer_inds=good)
        model.zero_grad()
        with pytest.raises(BBDecoderError):
            wm.backward_propagation(model(X).sum(), collect_grads=True, layer_inds=bad)
