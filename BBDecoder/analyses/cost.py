"""Per-layer cost: parameters, forward and backward FLOPs, forward time, activation memory.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts
as 2 FLOPs; only the ops in its registry — matmuls, convolutions, attention — are
counted). It attributes every counted op to the modules running at that moment, so a
parent's count includes its children's, and at depth 1 the layers' forward FLOPs add up to
the model's total whenever all counted ops run inside a top-level child.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core import checks
from ..core.forward import hooked_forward
from ..core.layers import Layer
from ..core.model import input_spec, validate_input_size
from ..core.tree import as_call, shape_of, tensors, to_device
from ..errors import BBDecoderTypeError, BBDecoderValueError
from ..output import layout
from ._base import AnalyzerBase

COST_KEYS = ("id", "name", "params", "forward_flops", "backward_flops", "forward_ms", "activation_bytes")
CSV_COLUMNS = (
    "id",
    "name",
    "type",
    "params",
    "forward_flops",
    "backward_flops",
    "forward_ms",
    "forward_ms_p25",
    "forward_ms_p75",
    "activation_bytes",
)
SECTION = "costs"


class CostMixin(AnalyzerBase):
    """``layer_costs``: what each layer costs in parameters, FLOPs, time and memory."""

    _last_costs: list[dict[str, Any]] | None = None  # the rows of the latest measurement, for summary(costs=True)

    def layer_costs(
        self,
        input_size_or_example: Any,
        *,
        repeats: int = 7,
        warmup: int = 1,
    ) -> list[dict[str, Any]]:
        """Measure each layer at the current depth on one input batch.

        The model runs in eval mode (BatchNorm statistics and dropout untouched) and is
        left exactly as it was: modes, hooks and every parameter's ``.grad``.

        * ``params``: parameters of the layer (including its children's).
        * ``forward_flops``: FLOPs of the forward pass on this batch.
        * ``backward_flops``: FLOPs of the backward pass a training step would run, i.e.
          the gradients of every trainable parameter of the sum of the model's outputs
          (computed with ``torch.autograd.grad``, so ``.grad`` is never written).
        * ``forward_ms``: median over ``repeats`` timed forward passes (under
          ``torch.no_grad``, after ``warmup`` untimed ones); on CUDA the device is
          synchronised at every layer boundary.
        * ``activation_bytes``: bytes of the tensors the layer returns, summed over its
          calls in one forward pass.

        A layer that is never called itself but holds modules that are (GPT-2's
        ``transformer.h``, a ``ModuleList``) reports the sum of theirs, FLOPs, time and
        activation bytes alike; one with nothing called inside gets zeros. Writes ``costs/call001_layer_costs.csv`` and
        bar charts ``costs/call001_flops.png`` and ``costs/call001_time.png`` (each call the next number).

        Args:
            input_size_or_example: an input shape such as ``[8, 3, 32, 32]`` (zeros of that
                shape are used), a list of shapes for several inputs, or the model's input
                as it takes it: a tensor, a tuple of positional inputs, a dict of keyword
                inputs, a list (one positional input, such as a detector's images).
            repeats: timed forward passes (at least 1).
            warmup: untimed forward passes before them (at least 0).

        Returns:
            One dict per layer with the keys ``id, name, params, forward_flops,
            backward_flops, forward_ms, activation_bytes``.

        Raises:
            BBDecoderTypeError, BBDecoderValueError: a bad argument.
            ModelForwardError: the model raised on the input.
        """
        inputs = self._cost_input(input_size_or_example)
        for argument, value, least in (("repeats", repeats, 1), ("warmup", warmup, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BBDecoderValueError(f"{argument} must be an int >= {least}, got {argument}={value!r}")
            checks.integer(value, argument, low=least)  # and not so many passes that it would not finish
        return self._measure_costs(inputs, repeats=repeats, warmup=warmup)

    def _measure_costs(
        self, inputs: tuple[tuple[Any, ...], dict[str, Any]], *, repeats: int = 7, warmup: int = 1
    ) -> list[dict[str, Any]]:
        """:meth:`layer_costs` on the model's ``(args, kwargs)``."""
        layers = list(self.layers)
        forward, backward, totals, ran = self._count_flops(layers, inputs)
        # a layer never called itself (a ModuleList) is timed as the calls of the modules inside it
        stand_ins = {layer.id: _stand_ins(layer.module, ran) for layer in layers if layer.module not in ran}
        timed = {layer.module: layer for layer in layers if layer.module in ran}
        names = {module: name for name, module in self.inner.named_modules()}
        for modules in stand_ins.values():
            for module in modules:
                if module not in timed:  # not a numbered layer at this depth: timed under its own name
                    timed[module] = Layer(-2 - len(timed), names.get(module, "?"), module, -1)
        samples, activation, total_ms = self._time_layers(list(timed.values()), inputs, repeats=repeats, warmup=warmup)
        for layer in layers:
            if layer.id in stand_ins:
                parts = [timed[module].id for module in stand_ins[layer.id]]
                samples[layer.id] = [sum(run) for run in zip(*(samples[i] for i in parts), strict=True)] or [
                    0.0
                ] * repeats
                activation[layer.id] = sum(activation[i] for i in parts)
        rows: list[dict[str, Any]] = []
        extra: list[dict[str, Any]] = []
        for layer in layers:
            times = samples[layer.id]
            rows.append(
                {
                    "id": layer.id,
                    "name": layer.name,
                    "params": layer.parameter_count(),
                    "forward_flops": forward[layer.id],
                    "backward_flops": backward[layer.id],
                    "forward_ms": float(statistics.median(times)),
                    "activation_bytes": activation[layer.id],
                }
            )
            low, high = _quartiles(times)
            extra.append({"type": layer.type, "forward_ms_p25": low, "forward_ms_p75": high})
        totals["forward_ms"] = total_ms
        args, kwargs = inputs
        shape = shape_of(args[0]) if len(args) == 1 and not kwargs else shape_of([*args, *kwargs.values()])
        self._save_costs(rows, extra, totals, repeats=repeats, input_shape=shape)
        self._last_costs = rows
        return rows

    # ------------------------------------------------------------- inputs
    def _cost_input(self, spec: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``input_size_or_example`` as the model's ``(args, kwargs)``.

        A shape (or a list of shapes) becomes float zeros; anything holding tensors is taken
        as the model takes it (see :func:`~BBDecoder.core.tree.as_call`).
        """
        argument = "input_size_or_example"
        if next(tensors(spec), None) is not None:
            return as_call(spec)
        if isinstance(spec, (list, tuple, torch.Size)):
            try:
                size = validate_input_size(list(spec))
            except BBDecoderValueError as error:
                raise BBDecoderValueError(
                    f"{argument} must be an input shape such as [1, 3, 32, 32], a list of shapes, or the model's "
                    f"input (a tensor, a tuple of positional inputs, a dict of keyword inputs); got {spec!r:.120}"
                ) from error
            return input_spec(size or []).materialize(self.device)
        raise BBDecoderTypeError(
            f"{argument} must be an input shape (list of ints), a list of shapes, or the model's input (a tensor, "
            f"a tuple or list of tensors, a dict of tensors); got {type(spec).__name__} {spec!r:.80}"
        )

    # -------------------------------------------------------------- FLOPs
    def _count_flops(
        self, layers: list[Layer], inputs: tuple[tuple[Any, ...], dict[str, Any]]
    ) -> tuple[dict[int, int], dict[int, int], dict[str, Any], set[nn.Module]]:
        """Forward and backward FLOPs per layer, the model's totals, and the modules that ran.

        ``FlopCounterMode`` counts the ops; who gets them is decided here (its own module
        tracker credits backward ops to whichever module its hooks left "active", e.g. a
        final parameter-free dropout). See :class:`_FlopLedger`: a module's forward FLOPs
        are what the counter gained during its calls; its backward FLOPs are what the
        counter gained while the autograd nodes its forward created were running. A layer
        gets its module's numbers plus those of every module inside it, so a container
        that is never called itself (a ``ModuleList``) reports the sum of its children.
        """
        trainable = [p for p in self.inner.parameters() if p.requires_grad]
        with FlopCounterMode(display=False) as counter, self.hooks.session() as hooks:
            ledger = _FlopLedger(self.inner, counter, hooks)
            output, _ = self._capture(inputs, [], "layer_costs", grad=True, keep_graph=True)
            model_forward = counter.get_total_flops()
            loss = _output_sum(output)
            hooks.remove()  # module hooks off before the backward pass; node hooks follow
            if loss is not None and trainable:
                with ledger.backward_hooks():
                    # autograd.grad, not backward(): the user's .grad stay exactly as they were
                    torch.autograd.grad(loss, trainable, allow_unused=True)
            model_backward = counter.get_total_flops() - model_forward
        del output, loss
        forward = {layer.id: ledger.forward_of(layer.module) for layer in layers}
        backward = {layer.id: ledger.backward_of(layer.module) for layer in layers}
        totals = {"forward_flops": int(model_forward), "backward_flops": int(model_backward)}
        return forward, backward, totals, ledger.ran

    # --------------------------------------------------------------- time
    def _time_layers(
        self, layers: list[Layer], inputs: tuple[tuple[Any, ...], dict[str, Any]], *, repeats: int, warmup: int
    ) -> tuple[dict[int, list[float]], dict[int, int], float]:
        """Per-layer forward times (ms, one per repeat), output bytes, and the whole pass's median ms."""
        device = self.device
        synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        starts: dict[int, list[float]] = defaultdict(list)
        elapsed: dict[int, float] = defaultdict(float)
        activation: dict[int, int] = defaultdict(int)
        state = {"first": True}

        def enter(layer: Layer) -> None:
            synchronize()
            starts[layer.id].append(time.perf_counter())

        def leave(layer: Layer, output: Any) -> None:
            synchronize()
            if starts[layer.id]:
                elapsed[layer.id] += time.perf_counter() - starts[layer.id].pop()
            if state["first"]:
                activation[layer.id] += sum(t.numel() * t.element_size() for t in tensors(output))

        samples: dict[int, list[float]] = {layer.id: [] for layer in layers}
        whole: list[float] = []
        args, kwargs = to_device(inputs, device)  # once, outside the timed passes
        with (
            hooked_forward(
                self.inner, layers, self.hooks, "layer_costs", device=device, before=enter, after=leave
            ) as run,
            torch.no_grad(),
        ):
            for repeat in range(warmup + repeats):
                starts.clear()
                elapsed.clear()
                state["first"] = repeat == 0
                synchronize()
                began = time.perf_counter()
                run(args, kwargs)
                synchronize()
                if repeat >= warmup:
                    whole.append(1000.0 * (time.perf_counter() - began))
                    for layer in layers:
                        samples[layer.id].append(1000.0 * elapsed.get(layer.id, 0.0))
        return samples, {layer.id: activation.get(layer.id, 0) for layer in layers}, float(statistics.median(whole))

    # -------------------------------------------------------------- output
    def _save_costs(
        self,
        rows: list[dict[str, Any]],
        extra: list[dict[str, Any]],
        totals: dict[str, Any],
        *,
        repeats: int,
        input_shape: list[Any],
    ) -> None:
        from ..plots.cost import flops_figure, time_figure

        call = layout.next_number(self.store, SECTION)

        def where(kind: str) -> str:
            return layout.relative_path(SECTION, kind, call=call)

        meta = {
            "call": call,
            **{f"total_{k}": v for k, v in totals.items()},
            "repeats": repeats,
            "input_shape": input_shape,
            "device": self.device.type,
        }
        table = [{**row, **more} for row, more in zip(rows, extra, strict=True)]
        csv_path = self.store.write_csv(
            where("csv"),
            CSV_COLUMNS,
            ([row[c] for c in CSV_COLUMNS] for row in table),
            section=SECTION,
            meta={"kind": "csv", **meta},
        )
        if self.is_main_process:
            labels = [f"{row['id']} {row['name']}" for row in rows]
            model = type(self.inner).__name__
            figure = flops_figure(
                labels,
                [row["forward_flops"] for row in rows],
                [row["backward_flops"] for row in rows],
                total_forward=totals["forward_flops"],
                total_backward=totals["backward_flops"],
                title=f"{model}: FLOPs per layer at depth {self.layers.depth}, input {input_shape}",
            )
            self.store.save_figure(figure, where("flops"), section=SECTION, meta={"kind": "flops", **meta})
            figure = time_figure(
                labels,
                [row["forward_ms"] for row in rows],
                [row["forward_ms_p25"] for row in table],
                [row["forward_ms_p75"] for row in table],
                whole_ms=totals["forward_ms"],
                title=f"{model}: forward time per layer on {self.device.type}, input {input_shape} "
                f"(median of {repeats}; whole forward {totals['forward_ms']:.3g} ms)",
            )
            self.store.save_figure(figure, where("time"), section=SECTION, meta={"kind": "time", **meta})
        where = f" → {self.store.relative(csv_path)}" if csv_path is not None else ""
        self._say(
            f"layer_costs: {len(rows)} layers, forward {totals['forward_flops']:,} FLOPs, backward "
            f"{totals['backward_flops']:,} FLOPs, forward {totals['forward_ms']:.3g} ms{where}"
        )


def _stand_ins(module: nn.Module, ran: set[nn.Module]) -> list[nn.Module]:
    """The outermost modules inside ``module`` that were called (each once), in registration order."""
    found: list[nn.Module] = []
    for child in dict.fromkeys(module.children()):
        found += [child] if child in ran else _stand_ins(child, ran)
    return list(dict.fromkeys(found))


def _output_sum(output: Any) -> torch.Tensor | None:
    """The sum of every floating output that carries a graph (the backward pass's seed)."""
    parts = [t.sum() for t in tensors(output) if t.is_floating_point() and t.requires_grad]
    if not parts:
        return None
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


def _quartiles(values: list[float]) -> tuple[float, float]:
    """The 25th and 75th percentiles (linear interpolation; both equal the value for one sample)."""
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return float(q1), float(q3)


class _FlopLedger:
    """Credits the FLOPs a :class:`FlopCounterMode` counts to the module whose forward caused them.

    Forward: every module of the model gets a pre- and a post-forward hook (for this one
    pass, through the analyzer's hook session); a module's forward FLOPs are the counter's
    growth between the two, summed over its calls (so a parent includes its children).

    Backward: the post-forward hook also *claims* for its module every autograd node the
    call created: the graph behind its outputs, back to nodes already claimed. Children
    finish first, so a parent claims only what its own code created (``out + identity``).
    Nodes that already existed when a module started (behind its inputs) are first
    claimed for the module then running (its caller). During the backward pass each
    claimed node gets a pre- and a post-hook; the counter's growth in between, less that of
    nodes run inside it (reentrant checkpointing), is credited to the node's module. Every
    counted backward op runs inside some node, so the credits add up to the counter's
    total (nodes created outside every module, as the loss's own sum, hold no counted op).
    """

    def __init__(self, root: nn.Module, counter: FlopCounterMode, hooks: Any) -> None:
        self.counter = counter
        self.forward_flops: dict[nn.Module, int] = defaultdict(int)
        self.backward_flops: dict[nn.Module, int] = defaultdict(int)
        self.ran: set[nn.Module] = set()
        self.owner: dict[Any, nn.Module] = {}  # autograd node -> module that created it
        self._running: list[tuple[nn.Module, int]] = []
        for module in dict.fromkeys(root.modules()):
            hooks.forward_pre(module, self._enter, with_kwargs=True)
            hooks.forward(module, self._leave)

    # ------------------------------------------------------------ forward
    def _enter(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if self._running:  # nodes behind the inputs not yet claimed: the caller's own work
            self._claim(self._running[-1][0], (args, kwargs))
        self._running.append((module, self.counter.get_total_flops()))

    def _leave(self, module: nn.Module, _args: Any, output: Any) -> None:
        if not self._running or self._running[-1][0] is not module:
            return  # a hook of a call that raised or was entered before this pass
        _, start = self._running.pop()
        self.forward_flops[module] += self.counter.get_total_flops() - start
        self.ran.add(module)
        self._claim(module, output)

    def _claim(self, module: nn.Module, data: Any) -> None:
        stack = [t.grad_fn for t in tensors(data) if t.grad_fn is not None]
        owner = self.owner
        while stack:
            node = stack.pop()
            if node in owner:
                continue
            owner[node] = module
            stack.extend(following for following, _ in node.next_functions if following is not None)

    # ----------------------------------------------------------- backward
    @contextlib.contextmanager
    def backward_hooks(self) -> Iterator[None]:
        """Hooks on every claimed node for one backward pass; removed on exit.

        The autograd engine runs a device's nodes one at a time on that device's thread, so
        each thread keeps its own stack of running nodes.
        """
        local = threading.local()
        handles = []

        def running() -> list[list[int]]:  # [counter at start, FLOPs of nodes nested inside]
            if not hasattr(local, "nodes"):
                local.nodes = []
            return local.nodes

        def before(_grad_outputs: Any) -> None:
            running().append([self.counter.get_total_flops(), 0])

        def after_for(module: nn.Module) -> Any:
            def after(_grad_inputs: Any, _grad_outputs: Any) -> None:
                open_nodes = running()
                if not open_nodes:
                    return
                start, nested = open_nodes.pop()
                spent = self.counter.get_total_flops() - start
                self.backward_flops[module] += spent - nested
                if open_nodes:
                    open_nodes[-1][1] += spent

            return after

        after_of = {module: after_for(module) for module in set(self.owner.values())}
        try:
            for node, module in self.owner.items():
                if type(node).__name__ == "AccumulateGrad":  # writes .grad; torch.autograd.grad never runs it
                    continue
                handles.append(node.register_prehook(before))
                handles.append(node.register_hook(after_of[module]))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self.owner.clear()  # drops the graph

    # ------------------------------------------------------------ results
    def forward_of(self, module: nn.Module) -> int:
        """Forward FLOPs of ``module``'s calls; for a module never called, those of its stand-ins (each once)."""
        if module in self.ran:
            return int(self.forward_flops[module])
        return int(sum(self.forward_flops[inner] for inner in _stand_ins(module, self.ran)))

    def backward_of(self, module: nn.Module) -> int:
        """Backward FLOPs of the nodes created by ``module`` or any module inside it."""
        credits: Mapping[nn.Module, int] = self.backward_flops
        return int(sum(credits.get(inner, 0) for inner in dict.fromkeys(module.modules())))
