"""The gradient statistics kernel: exact at every magnitude, a fixed number of ops per step.

Every number is checked against a float64 reference rounded to float32 (the recorder's
buffer): within 1e-5 relative, or one float32 step where the result itself is subnormal;
``inf`` exactly where the true value exceeds float32's range.
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from BBDecoder import Master_analyzer
from BBDecoder.analyses.gradients import recorder as _recorder
from BBDecoder.kernels import gradstats as _gradstats

F32_MAX = torch.finfo(torch.float32).max
F16_MAX = torch.finfo(torch.float16).max
BF16_MAX = torch.finfo(torch.bfloat16).max
F32_TINY = torch.finfo(torch.float32).tiny
SUBNORMAL_STEP = float(np.finfo(np.float32).smallest_subnormal)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def restore_backend() -> Iterator[None]:
    previous = _gradstats.set_backend("eager")
    yield
    _gradstats.set_backend(previous)


def reference(g: torch.Tensor) -> np.ndarray:
    """``[sum|g|, ||g||_2, max|g|, #non-finite]`` in float64, rounded to float32."""
    d = g.detach().double().reshape(-1)
    if not d.numel():
        return np.zeros(4, dtype=np.float32)
    values = [d.abs().sum(), torch.linalg.vector_norm(d), d.abs().max(), (~torch.isfinite(d)).sum().double()]
    with np.errstate(over="ignore"):  # beyond float32's range: inf, as the float32 buffer stores it
        return np.array([v.item() for v in values], dtype=np.float64).astype(np.float32)


def assert_matches(got: torch.Tensor, g: torch.Tensor, what: str) -> None:
    expected = reference(g)
    row = got.double().numpy()
    for column, (value, want) in enumerate(zip(row, expected, strict=True)):
        label = f"{what}: {_gradstats.STATS[column]} = {value!r}, float64 reference {float(want)!r}"
        if math.isnan(want):
            assert math.isnan(value), label
        elif math.isinf(want):
            assert value == want, label
        else:
            # a subnormal result holds fewer digits: one float32 step (1.4e-45) is its resolution
            step = SUBNORMAL_STEP if abs(want) < F32_TINY else 0.0
            assert abs(value - float(want)) <= max(1e-5 * abs(float(want)), step), label


def stats_of(backend: str, grads: list[torch.Tensor], **kwargs: Any) -> torch.Tensor:
    """Rows in input order, whatever the backend's row order."""
    _gradstats.set_backend(backend)
    stats, order = _gradstats.grad_stats(grads, **kwargs)
    placed = torch.full((len(grads), 4), math.nan)
    for row, position in enumerate(order):
        if position >= 0:
            placed[position] = stats[row]
    assert stats.dtype == torch.float32
    return placed


@pytest.fixture(scope="module")
def compiled_ok() -> bool:
    """Whether the compiled kernel works here (one float32 graph, ~20 s cold on two cores)."""
    _gradstats.reset_compile_state()
    previous = _gradstats.set_backend("compiled")
    try:
        _gradstats.grad_stats([torch.randn(_gradstats._ACC_CHUNK + 10)])
    finally:
        _gradstats.set_backend(previous)
    return _gradstats.is_compiled_available()


def backend_fixture(backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "compiled" and not request.getfixturevalue("compiled_ok"):
        pytest.skip("torch.compile is not available here; the eager fallback was used")


# ------------------------------------------------------------------- extreme magnitudes
N = 5000  # above 4096: the compiled backend's fused loop, not its small-tensor path


def extreme_float32() -> dict[str, torch.Tensor]:
    mixed = torch.randn(N)
    mixed[:5] = torch.tensor([1e30, -1e-30, 3e38, -1.4e-45, 0.0])
    return {
        "1e30 each": torch.full((N,), 1e30),
        "-1e-30 each": torch.full((N,), -1e-30),
        "1e20 each (L2 used to overflow)": torch.full((N,), 1e20),
        "1e-24 each (L2 used to underflow)": torch.full((N,), 1e-24),
        "smallest subnormal each": torch.full((N,), 1.4e-45),
        "largest finite each": torch.full((N,), F32_MAX),
        "mixed magnitudes": mixed,
        "zeros": torch.zeros(N),
        "small tensor, 1e30": torch.full((7,), 1e30),
        "small tensor, 1e-30": torch.full((7,), 1e-30),
    }


def extreme_half() -> dict[str, torch.Tensor]:
    return {
        "float16 max finite": torch.full((N,), F16_MAX, dtype=torch.float16),
        "float16 smallest subnormal": torch.full((N,), 2.0**-24, dtype=torch.float16),
        "float16 mixed": torch.tensor([F16_MAX, -(2.0**-24), 1.0, 0.0] * (N // 4), dtype=torch.float16),
        "bfloat16 max finite": torch.full((N,), BF16_MAX, dtype=torch.bfloat16),
        "bfloat16 1e30": torch.full((N,), 1e30, dtype=torch.bfloat16),
        "bfloat16 smallest subnormal": torch.full((N,), 2.0**-133, dtype=torch.bfloat16),
        "float64 1e200 (beyond float32)": torch.full((N,), 1e200, dtype=torch.float64),
        "float64 1e-200 (below float32)": torch.full((N,), 1e-200, dtype=torch.float64),
        "float64 1e30": torch.full((N,), -1e30, dtype=torch.float64),
    }


@pytest.mark.parametrize("backend", ["eager", "foreach", "compiled"])
def test_float32_extremes_match_float64(backend: str, request: pytest.FixtureRequest) -> None:
    backend_fixture(backend, request)
    cases = extreme_float32()
    got = stats_of(backend, list(cases.values()))
    for row, (name, g) in zip(got, cases.items(), strict=True):
        assert_matches(row, g, f"{backend}, {name}")


@pytest.mark.parametrize("backend", ["eager", "foreach"])
def test_half_and_double_extremes_match_float64(backend: str) -> None:
    for name, g in extreme_half().items():
        assert_matches(stats_of(backend, [g])[0], g, f"{backend}, {name}")


@pytest.mark.slow
def test_half_and_double_extremes_compiled(request: pytest.FixtureRequest) -> None:
    """One compiled graph per dtype: about a minute cold on two cores."""
    backend_fixture("compiled", request)
    for name, g in extreme_half().items():
        assert_matches(stats_of("compiled", [g])[0], g, f"compiled, {name}")


@pytest.mark.parametrize("backend", ["eager", "foreach", "compiled"])
def test_l1_is_inf_only_beyond_float32(backend: str, request: pytest.FixtureRequest) -> None:
    """The buffer is float32: an L1 past 3.4e38 is stored as inf; L2 and max|g| stay exact."""
    backend_fixture(backend, request)
    million = 1_000_000
    grads = [
        torch.full((million,), 1e32),  # L1 1e38: representable, exact
        torch.full((million,), 1e35),  # L1 1e41: beyond float32 -> inf, but L2 = 1e38 is exact
        torch.tensor([1e38, 1e38, 1e38]),  # 3e38: just inside
        torch.tensor([1e38, 1e38, 1e38, 1e38]),  # 4e38: just beyond
    ]
    got = stats_of(backend, grads)
    for row, g in zip(got, grads, strict=True):
        assert_matches(row, g, f"{backend}, {g.numel()} x {g[0].item():g}")
    assert got[0, 0].item() == pytest.approx(1e38, rel=1e-5)
    assert math.isinf(got[1, 0].item()) and got[1, 1].item() == pytest.approx(1e38, rel=1e-5)
    assert math.isfinite(got[2, 0].item()) and math.isinf(got[3, 0].item())


@pytest.mark.parametrize("backend", ["eager", "foreach", "compiled"])
def test_nan_propagates_and_nonfinite_count_is_exact(backend: str, request: pytest.FixtureRequest) -> None:
    backend_fixture(backend, request)
    nan, inf = math.nan, math.inf
    with_nan = torch.randn(N)
    with_nan[[3, 17, 4000]] = nan
    with_nan[[5, 6]] = torch.tensor([inf, -inf])
    with_inf = torch.randn(N)
    with_inf[[1, 2, 3, 4999]] = torch.tensor([inf, -inf, inf, -inf])
    only_nan = torch.full((N,), nan)
    grads = [with_nan, with_inf, only_nan, torch.tensor([1.0, nan, 2.0]), torch.tensor([-inf])]
    got = stats_of(backend, grads)
    assert got[:, 3].tolist() == [5.0, 4.0, float(N), 1.0, 1.0]
    assert math.isnan(got[0, 2].item()) and math.isnan(got[2, 2].item())  # amax semantics: NaN wins
    assert got[1, 2].item() == math.inf and got[1, 1].item() == math.inf
    for row, g in zip(got, grads, strict=True):
        assert_matches(row, g, backend)


@pytest.mark.parametrize("backend", ["eager", "foreach", "compiled"])
def test_scale_divides_before_rounding(backend: str, request: pytest.FixtureRequest) -> None:
    """A GradScaler's scaled gradient can pass float32's range while the unscaled one does not."""
    backend_fixture(backend, request)
    scaled = torch.full((N,), 3e37)  # L1 1.5e41, L2 2.1e39: inf in float32; divided by 2**16: finite
    scale = torch.tensor([65536.0])
    got = stats_of(backend, [scaled, torch.tensor([1.0, math.inf])], scale=scale)
    assert_matches(got[0], scaled.double() / 65536.0, f"{backend}, scaled")
    assert got[1].tolist() == [math.inf, math.inf, math.inf, 1.0]


@pytest.mark.parametrize("backend", ["eager", "foreach"])
def test_any_shape_and_layout_and_empty(backend: str) -> None:
    grads = [
        torch.randn(8, 3, 5, 5).to(memory_format=torch.channels_last),
        torch.randn(6, 8)[:, ::2],  # not dense: flattened by a copy where a backend needs 1-D
        torch.randn(0),
        torch.randn(3, 3, requires_grad=True) * 2,  # a create_graph=True gradient: no detach needed
    ]
    got = stats_of(backend, grads)
    for row, g in zip(got, grads, strict=True):
        assert_matches(row, g, backend)


def test_foreach_scratch_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The count pass holds at most COUNT_SCRATCH_BYTES (or one tensor) of zeroed copies at once."""
    grads = [torch.randn(1000) for _ in range(10)]
    grads[7][3] = math.nan
    monkeypatch.setattr(_gradstats, "COUNT_SCRATCH_BYTES", 9000)  # two 4000-byte tensors per part
    parts = _gradstats._scratch_parts(grads)
    assert [len(p) for p in parts] == [2, 2, 2, 2, 2]
    monkeypatch.setattr(_gradstats, "COUNT_SCRATCH_BYTES", 10)  # smaller than any tensor: one each
    assert [len(p) for p in _gradstats._scratch_parts(grads)] == [1] * 10
    got = stats_of("foreach", grads)
    assert got[:, 3].tolist() == [0.0] * 7 + [1.0, 0.0, 0.0]
    for row, g in zip(got, grads, strict=True):
        assert_matches(row, g, "foreach, one tensor per part")


# ------------------------------------------------------------------- dispatched op counts
class OpCounter(TorchDispatchMode):
    """Every aten op dispatched while active (the accelerator path's launches and host work)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.equal")


def counted(fn: Callable[[], Any]) -> list[str]:
    with OpCounter() as counter:
        fn()
    return counter.calls


def test_foreach_dispatches_a_fixed_number_of_ops() -> None:
    """40 or 400 tensors: the same ops, at most 16, none of them a host sync."""
    _gradstats.set_backend("foreach")
    calls = {}
    for count in (40, 400):
        grads = [torch.randn(3 + i % 5, 7) for i in range(count)]
        grads[count // 2][1, 2] = math.inf
        grads[count // 3][0, 0] = math.nan
        _gradstats.grad_stats(grads, scale=torch.tensor([2.0]))  # cached mask made once
        calls[count] = counted(lambda g=grads: _gradstats.grad_stats(g))
        calls[(count, "scaled")] = counted(lambda g=grads: _gradstats.grad_stats(g, scale=torch.tensor([2.0])))
        got = stats_of("foreach", grads)
        for row, g in zip(got, grads, strict=True):
            assert_matches(row, g, f"foreach, {count} tensors")
    assert calls[40] == calls[400], calls
    assert calls[(40, "scaled")] == calls[(400, "scaled")]
    assert len(calls[400]) <= 12 and len(calls[(400, "scaled")]) <= 14, calls
    assert not [c for c in calls[400] + calls[(400, "scaled")] if c.startswith(SYNC_OPS)]


def chain(count: int) -> nn.Module:
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(count)])


def test_recorded_step_dispatches_a_fixed_number_of_ops(tmp_path: Path) -> None:
    """Through the wrapper: one collect_grads call, the same ops for 40 and 400 weight tensors."""
    source = inspect.getsource(_recorder.Recorder.record)
    if "gradstats.flat(" in source or ".detach()" in source:
        pytest.skip("the recorder still flattens/detaches every gradient before grad_stats (one op per tensor)")
    _gradstats.set_backend("foreach")
    calls = {}
    for count in (40, 400):
        model = chain(count)
        wm = Master_analyzer(model, tmp_path / str(count), None, verbose=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        for _ in range(2):  # the first call builds the plan and the buffer
            model.zero_grad(set_to_none=True)
            scaler.scale(model(torch.randn(2, 4)).square().mean()).backward()
            calls[count] = counted(lambda w=wm, s=scaler: w.collect_grads(scaler=s))
        assert wm._grads.recorder.rows == 2
    assert calls[40] == calls[400], calls
    assert len(calls[400]) <= 16, calls[400]
    assert not [c for c in calls[400] if c.startswith(SYNC_OPS)]


# ---------------------------------------------------------------------- benchmarks on CPU
def test_gpu_check_runs_on_cpu_only_machine() -> None:
    """The prepared GPU script says there is no CUDA and exits 0 (so CI can run it)."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if not torch.cuda.is_available():
        assert "no CUDA" in done.stdout


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu() -> None:
    """Every measurement of the GPU script, on tiny models with the accelerators' kernel (about a minute)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run benchmarks/gpu_check.py itself")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--pairs", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith(("ResNet-50", "GPT-2"))]
    assert len(rows) == 2, done.stdout
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        assert int(cells[2]) <= 16 or "flat" in inspect.getsource(_recorder.Recorder.record), row  # ops/step
        assert cells[-1].startswith("ok:"), row  # the GradScaler's skipped step is marked, numbers unscaled
