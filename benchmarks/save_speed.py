"""How long the figure-writing calls take on big models (issue 13's budget: well under 3 s each).

Two measurements, on the CPU, each the median of ``--repeats`` runs in fresh folders:

* ``save_collected_grads``: one epoch of ``--iterations`` recorded steps of a
  DenseNet-121-shaped model (242 weight tensors, every layer recorded) at depth 2; the call
  writes the flow chart, the norm curves, the CSV of every number, the heatmap and the
  alerts. The model is DenseNet-121's module tree at a narrow width (the tensor count, not
  the width, decides the cost of the figures), so the recorded steps stay quick.
* ``visualize_weight_hist``: every layer of a full-size DenseNet-121 (8.0 M parameters,
  364 parameter tensors; at depth 2 that is 12 layers with parameters, ``denseblock3``
  alone holding 144 tensors), first and second call (the second also redraws the
  evolution figures with two calls).

The weight figures are drawn by this process and the figure helper together
(:mod:`BBDecoder.plots.helper`); ``--no-helper`` draws them here alone. The CPU times are
this process's only; the helper's are not in them. The helper starts at the first call of
the first repeat (in a fresh process: the first of the listed times) and serves the later
repeats warm.

The models are the fixtures of ``tests/models.py`` (``DenseNet121Like``). Run:
``python benchmarks/save_speed.py [--iterations 200] [--repeats 3] [--depth 2] [--no-helper]``;
``--rounds N`` instead runs the two weight calls in ``2N`` fresh processes, helper off and on
in turn (interleaved, so the machine's drift falls on both), and gives medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from models import DenseNet121Like  # noqa: E402

from BBDecoder import Master_analyzer  # noqa: E402
from BBDecoder.plots import helper  # noqa: E402


def time_save_grads(iterations: int, depth: int, folder: Path) -> tuple[float, float, int]:
    torch.manual_seed(0)
    model = DenseNet121Like(growth=4, init=8, bn_size=2, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    wm = Master_analyzer(model, folder, depth=depth, verbose=False)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    for _ in range(iterations):
        loss = F.cross_entropy(wm.forward_propagation(x), y)
        optimizer.zero_grad()
        wm.backward_propagation(loss, collect_grads=True)
        optimizer.step()
    tensors = sum(1 for name, _ in model.named_parameters() if not name.endswith("bias"))  # weights: the default
    began, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wm.save_collected_grads(0)
    return time.perf_counter() - began, time.process_time() - cpu, tensors


def time_weight_hist(depth: int, folder: Path) -> tuple[list[float], list[float], int]:
    torch.manual_seed(0)
    model = DenseNet121Like()
    wm = Master_analyzer(model, folder, depth=depth, verbose=False)
    layers = [layer.id for layer in wm.layers]
    times, cpus = [], []
    for _ in range(2):
        began, cpu = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the parameter-free layers are skipped with a warning
            wm.visualize_weight_hist(layers)
        times.append(time.perf_counter() - began)
        cpus.append(time.process_time() - cpu)
        with torch.no_grad():  # a little training-like drift between the calls
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p) * p.std().nan_to_num(0.01))
    return times, cpus, len(list(model.parameters()))


def compare_helper(rounds: int, depth: int) -> None:
    """Weight calls in fresh processes (the helper's start included), helper off and on in turn; medians and ratios."""
    runs: dict[str, list[list[float]]] = {"off": [], "on": []}
    for _ in range(rounds):
        for state in runs:
            command = [sys.executable, __file__, "--one-weight-run", "--depth", str(depth)]
            command += ["--no-helper"] if state == "off" else []
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[state].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for index, name in enumerate(("first", "second")):
        off, on = ([run[index] for run in runs[state]] for state in ("off", "on"))
        ratio = statistics.median(b / a for a, b in zip(off, on, strict=True))
        print(
            f"visualize_weight_hist, {name} call, {rounds} rounds: helper off {statistics.median(off):.2f} s, "
            f"on {statistics.median(on):.2f} s (on/off {ratio:.2f}; on ranged {min(on):.2f}–{max(on):.2f} s)"
        )
    print(f"load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--no-helper", action="store_true", help="draw every figure in this process")
    parser.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="instead: this many rounds of the weight calls in fresh processes, helper off and on in turn",
    )
    parser.add_argument("--one-weight-run", action="store_true", help=argparse.SUPPRESS)  # a round's process
    args = parser.parse_args()
    if args.no_helper:
        os.environ[helper.SWITCH] = "0"
    torch.set_num_threads(1)
    if args.one_weight_run:
        with tempfile.TemporaryDirectory() as scratch:
            times, _, _ = time_weight_hist(args.depth, Path(scratch))
        print(json.dumps(times))
        return
    if args.rounds:
        compare_helper(args.rounds, args.depth)
        return
    grads, grads_cpu, calls, calls_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            seconds, cpu, tensors = time_save_grads(args.iterations, args.depth, Path(scratch) / f"g{repeat}")
            grads.append(seconds)
            grads_cpu.append(cpu)
            times, cpus, params = time_weight_hist(args.depth, Path(scratch) / f"w{repeat}")
            calls.append(times)
            calls_cpu.append(cpus)
    median = statistics.median
    print(
        f"save_collected_grads ({tensors} tensors × {args.iterations} iterations, depth {args.depth}): "
        f"{median(grads):.2f} s wall, {median(grads_cpu):.2f} s CPU (median of {args.repeats}; wall: "
        + ", ".join(f"{t:.2f}" for t in grads)
        + ")"
    )
    for index, name in enumerate(("first", "second")):
        print(
            f"visualize_weight_hist, every layer of DenseNet-121 ({params} tensors, depth {args.depth}), {name} call: "
            f"{median(c[index] for c in calls):.2f} s wall, {median(c[index] for c in calls_cpu):.2f} s CPU "
            f"(median of {args.repeats}; wall: " + ", ".join(f"{c[index]:.2f}" for c in calls) + ")"
        )
    shared = helper._helper
    state = "off" if args.no_helper or shared is None else f"on: it drew {shared.drawn} of the figures"
    print(f"figure helper {state}")
    print(f"load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
