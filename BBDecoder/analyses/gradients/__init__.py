"""Per-layer gradient statistics: the façade's gradient methods (issue: gradient analysis).

``backward_propagation`` runs ``loss.backward()`` and then, like ``collect_grads`` after a
backward pass someone else ran, records for the parameter tensors of the selected layers
five numbers per tensor: mean |g|, max |g|, L1 and L2 norm, and the count of non-finite
entries. The numbers stay on the gradients' device (:mod:`.recorder`); nothing in the call
waits for the device. ``save_collected_grads`` moves an epoch's buffer to the host once
(:mod:`.epoch`), finds the alerts (:mod:`.alerts`), writes every file (:mod:`.save`), and
only then clears the buffer: a failed write keeps the epoch for another try.

Ownership with ``depth > 1``: a parameter belongs to several nested layers (``layer1``
and ``layer1.0``). It is recorded once, under the deepest *selected* layer that owns it,
with its name relative to that layer; selecting ``layer1`` alone records
``layer1``/``0.conv1.weight``, selecting both records ``layer1.0``/``conv1.weight``. A
tensor tied under two names (a language model's input and output embedding) is recorded
once and marked as tied.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...core import checks, distributed
from ...core.layers import ROOT_NAME, Selector, owned_parameters, tied_names
from ...errors import (
    BBDecoderTypeError,
    BBDecoderValueError,
    BBDecoderWarning,
    GradientAlertWarning,
    LayerSelectionError,
)
from ...kernels import gradstats
from ...output.schema import GRADIENT_CSV_HEADER, Alert, GradientRow
from .._base import AnalyzerBase, held_on_failure, warn_new_alerts
from . import save
from .alerts import TITLES, Thresholds, find_alerts, severity
from .epoch import EpochData, gradient_rows, layer_norms, tensor_summary
from .recorder import Plan, Recorder, scale_of, selection_key

CSV_HEADER = GRADIENT_CSV_HEADER
SECTION = save.SECTION
_BACKWARD_KEYWORDS = ("gradient", "retain_graph", "create_graph", "inputs")


@dataclass
class _GradientState:
    recorder: Recorder = field(default_factory=Recorder)
    plans: dict[Any, Plan] = field(default_factory=dict)
    calls: int = 0
    announced: bool = False
    alerts: list[Alert] = field(default_factory=list)
    warned: set[tuple[str, int, str]] = field(default_factory=set)
    first_nonfinite: dict[int, int] = field(default_factory=dict)
    history: list[save.LayerHistory] | None = None  # read from save_path on first save


# ----------------------------------------------------------------------------- mixin
class GradientMixin(AnalyzerBase):
    """``backward_propagation``, ``save_collected_grads`` and ``gradient_alerts``."""

    include_bias: bool
    vanish_threshold: float
    explode_threshold: float

    def _init_gradients(
        self,
        *,
        include_bias: bool = False,
        vanish_threshold: float = 1e-8,
        explode_threshold: float = 1e3,
    ) -> None:
        self.include_bias = _check_flag(include_bias, "include_bias")
        self.vanish_threshold = _check_threshold(vanish_threshold, "vanish_threshold")
        self.explode_threshold = _check_threshold(explode_threshold, "explode_threshold")
        if self.explode_threshold <= self.vanish_threshold:
            raise BBDecoderValueError(
                f"explode_threshold must be above vanish_threshold, got explode_threshold={explode_threshold!r} "
                f"and vanish_threshold={vanish_threshold!r}"
            )
        self._grads = _GradientState()

    # ------------------------------------------------------------- collecting
    def backward_propagation(
        self,
        loss: torch.Tensor,
        collect_grads: bool = False,
        layer_inds: Selector = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        collect_every: int = 1,
        include_bias: bool | None = None,
        **backward_kwargs: Any,
    ) -> None:
        """Run ``loss.backward(**backward_kwargs)``; optionally record gradient statistics.

        With ``collect_grads`` the statistics of every parameter tensor of the selected
        layers are appended to this epoch's buffer on the gradients' device: mean |g|,
        max |g|, L1, L2 and the number of non-finite entries. A tensor without a gradient
        (frozen, unused) is recorded as missing (NaN). Nothing here waits for the device.
        ``.grad`` holds the sum over every backward call since the last ``zero_grad``, so
        with gradient accumulation the numbers describe the accumulated gradient.

        Args:
            loss: the scalar to backpropagate.
            collect_grads: record statistics for this call.
            layer_inds: layer IDs, dotted names, or a list of them; ``None``: all layers.
            scaler: a ``torch.amp.GradScaler``: the loss is scaled for backward and the
                statistics are of the unscaled gradients; a step whose gradients hold
                inf/NaN (which the scaler will skip) is marked skipped.
            collect_every: record only every k-th call (calls ``0, k, 2k…``).
            include_bias: also record biases (default: the constructor's choice).
            **backward_kwargs: passed to ``loss.backward`` (``retain_graph``,
                ``create_graph``, ``inputs``, ``gradient``).

        Raises:
            BBDecoderTypeError: ``loss`` is not a tensor, a flag is not a bool, an unknown
                keyword, or ``scaler`` is not a ``GradScaler``.
            BBDecoderValueError: ``loss`` does not require grad, is not a scalar, or
                ``collect_every`` is below 1.
            LayerSelectionError: ``layer_inds`` selects no parameter tensor.
        """
        _check_loss(loss, backward_kwargs)
        collect = _check_flag(collect_grads, "collect_grads")
        every = _check_every(collect_every)
        bias = self.include_bias if include_bias is None else _check_flag(include_bias, "include_bias")
        _check_scaler(scaler)
        plan = self._gradient_plan(layer_inds, bias) if collect else None  # checked before the backward pass
        if scaler is not None:
            scaler.scale(loss).backward(**backward_kwargs)
        else:
            loss.backward(**backward_kwargs)
        if collect:
            self._collect(layer_inds, bias, scaler, every, plan)
        else:
            self._grads.calls += 1

    def collect_grads(
        self,
        layer_inds: Selector = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        collect_every: int = 1,
        include_bias: bool | None = None,
        iteration: int | None = None,
    ) -> None:
        """Record the statistics of the current ``.grad`` values, whoever ran backward.

        For training loops that do not call :meth:`backward_propagation`: after
        ``accelerator.backward(loss)``, inside a Lightning or Hugging Face callback, in an
        optimizer closure. It records exactly what ``backward_propagation(loss,
        collect_grads=True, ...)`` records after its backward pass: the same buffer, the same
        iteration counter (one per call), and nothing that waits for the device.

        Args:
            layer_inds: layer IDs, dotted names, or a list of them; ``None``: all layers,
                and the parameters the root module owns itself (a ViT's ``cls_token``).
            scaler: the ``torch.amp.GradScaler`` whose scaled gradients ``.grad`` holds
                (before ``scaler.unscale_``); the statistics are unscaled by its scale.
                Leave it ``None`` once the gradients are unscaled.
            collect_every: record only every k-th call (calls ``0, k, 2k…``).
            include_bias: also record biases (default: the constructor's choice).
            iteration: number this call ``iteration`` (an integration passes the optimizer
                step, so a run resumed into the same ``save_path`` continues its numbering);
                later calls count on from it. Default: one more than the last call.

        Raises:
            BBDecoderTypeError: a flag is not a bool, or ``scaler`` is not a ``GradScaler``.
            BBDecoderValueError: ``collect_every`` is below 1, or ``iteration`` negative.
            LayerSelectionError: ``layer_inds`` selects no parameter tensor.
        """
        every = _check_every(collect_every)
        bias = self.include_bias if include_bias is None else _check_flag(include_bias, "include_bias")
        _check_scaler(scaler)
        if iteration is not None:
            self._grads.calls = checks.integer(iteration, "iteration", low=0, high=2**62)
        self._collect(layer_inds, bias, scaler, every, None)

    @property
    def iteration(self) -> int:
        """The number the next ``backward_propagation``/``collect_grads`` call gets."""
        return self._grads.calls

    def _collect(
        self,
        layer_inds: Selector,
        bias: bool,
        scaler: torch.amp.GradScaler | None,
        every: int,
        plan: Plan | None,
    ) -> None:
        """Count one iteration and, on every ``every``-th, append the ``.grad`` statistics."""
        state = self._grads
        iteration = state.calls
        state.calls += 1
        if plan is None or plan.refresh:  # FSDP2: the sharded parameters are back in place after backward
            plan = self._gradient_plan(layer_inds, bias, after_backward=True)
        if iteration % every:
            return
        if not state.announced and gradstats.needs_compile(plan.params[0].device, plan.elements):
            state.announced = True
            self._say(
                "BBDecoder: compiling the gradient-statistics kernel with torch.compile (once per process; "
                "set BBDECODER_GRAD_BACKEND=eager to skip)"
            )
        with torch.no_grad():
            state.recorder.record(iteration, plan, scale_of(scaler))

    def _gradient_plan(self, layer_inds: Selector, bias: bool, *, after_backward: bool = False) -> Plan:
        """The parameters to read for ``layer_inds`` (checked, and cached per selection).

        Between forward and backward FSDP2 puts unsharded parameters in the modules (for
        the root, or any group not resharded after forward); their ``.grad`` stays
        ``None``. A plan made then is marked ``refresh`` and made again once after the
        backward pass, when the sharded parameters, which receive the gradients, are back.
        """
        state = self._grads
        key = selection_key(layer_inds, bias)
        plan = state.plans.get(key) if key is not None else None
        if plan is not None and not (after_backward and plan.refresh):
            return plan
        layers = self._select(layer_inds, "layer_inds", default_all=True)
        if layer_inds is None and self.layers.root_own is not None:
            layers.append(self.layers.root_own)  # parameters the root module owns itself (a ViT's cls_token)
        entries = owned_parameters(layers, bias)
        if not entries:
            names = ", ".join(f"{layer.id} {layer.name!r} ({layer.type})" for layer in layers[:6])
            raise LayerSelectionError(
                f"layer_inds={layer_inds!r} selects no parameter tensor to record "
                f"(include_bias={bias}); selected: {names}"
            )
        recorder = state.recorder
        tied = tied_names(self.inner)
        columns = []
        for layer, name, param in entries:
            full = name if layer.name == ROOT_NAME else f"{layer.name}.{name}"
            aliases = tuple(other for other in tied.get(id(param), ()) if other != full)
            columns.append(recorder.column(layer, name, param, aliases))
        params = [param for _, _, param in entries]
        plan = Plan(
            params,
            columns,
            recorder.layout(columns),
            sum(p.numel() for p in params),
            dtensors=any(distributed.is_dtensor(p) for p in params),
            refresh=not after_backward and distributed.uses_fsdp(self.inner),
        )
        if key is not None:
            if len(state.plans) > 64:
                state.plans.clear()
            state.plans[key] = plan
        return plan

    # ----------------------------------------------------------------- saving
    def save_collected_grads(self, ep: int, save_folder: str | os.PathLike[str] | None = None) -> list[Path]:
        """Write the epoch's gradient figures and numbers, then clear the epoch's buffer.

        Files (under ``save_path/gradients/`` unless ``save_folder``; names from
        :mod:`BBDecoder.output.layout`), each named ``epoch_<ep>_…``: ``flow.png`` (mean
        and max |g| per tensor, log axis), ``norms.png`` (L1/L2 per layer over the
        iterations; several pages for many layers), ``grads.csv`` (every number),
        ``layers.npz`` (this epoch's per-layer L2), ``heatmap.png`` (per-layer L2 over
        every epoch saved in ``save_path`` so far, earlier processes' included) and
        ``alerts.json`` (alerts, skipped steps and the per-tensor summary behind the flow
        chart). Earlier files are never replaced.

        Alerts (first NaN/Inf per tensor, mean |g| below ``vanish_threshold`` on average,
        or above ``explode_threshold``) are reported as one :class:`GradientAlertWarning`
        per save naming the counts and the worst few; each alert is warned once.

        Everything is written before anything is forgotten: if a write fails (disk full,
        permission denied), :class:`OutputWriteError` says what could not be written, the
        epoch's statistics stay in memory, and calling this again writes the whole epoch.

        Under ``torch.distributed`` only rank 0 writes, and every rank keeps the same
        numbers and alerts. With DDP the gradients are already whole on every rank, so
        calling this on rank 0 alone is fine. With FSDP2 (``fully_shard``) each rank holds
        statistics of its shards, reduced here across ranks (L1 and non-finite counts
        summed, L2 from the summed squares, max by maximum): every rank must call it.

        Args:
            ep: the epoch number, used in file names (an int from 0 to 10**9).
            save_folder: the folder for the files (default ``save_path/gradients``); a
                folder outside ``save_path`` is honoured and listed in its manifest.

        Returns:
            The paths written (empty when nothing was collected, with a warning, and on
            ranks other than 0).

        Raises:
            BBDecoderTypeError: ``ep`` is not an int or ``save_folder`` not a path.
            BBDecoderValueError: ``ep`` is out of range, or (FSDP2) the ranks recorded
                different steps.
            OutputWriteError: a file could not be written (the epoch is still held).
        """
        epoch = _check_epoch(ep)
        folder = self.store.subfolder(save_folder, "save_folder", default=SECTION)
        state = self._grads
        recorder = state.recorder
        self._reduce_gradient_shards(epoch)
        if not recorder.rows:
            if self._activations_pending() or self._updates_pending():  # issue 15: activations/updates only
                return self._save_activation_epoch(epoch, save_folder) + self._save_update_epoch(epoch, save_folder)
            if self.is_main_process:
                warnings.warn(
                    f"save_collected_grads(ep={epoch}): no gradient statistics were collected since the last save "
                    "(nor activation statistics or update ratios); "
                    "call backward_propagation(loss, collect_grads=True) or collect_grads() during the epoch. "
                    "Nothing was written.",
                    BBDecoderWarning,
                    stacklevel=2,
                )
            return []
        # Compute everything, write everything, and only then forget: every rank keeps the same
        # alerts and history (its numbers are the same), so gradient_alerts() agrees across ranks.
        data = self._gradient_epoch(epoch)
        thresholds = Thresholds(self.vanish_threshold, self.explode_threshold)
        alerts, fresh = find_alerts(data, thresholds, state.first_nonfinite)
        norms = layer_norms(data)
        history = [h for h in self._gradient_history() if h.epoch != epoch]
        history.append(save.history_entry(data, norms))
        rows = gradient_rows(data)
        paths: list[Path] = []
        if self.store.enabled:
            held = f"The epoch's statistics ({len(data.iterations)} iterations × {len(data.columns)} tensors) are"
            with held_on_failure(epoch, "its files", held):
                paths = save.write_epoch(
                    self.store,
                    folder,
                    data,
                    summary=tensor_summary(data),
                    rows=rows,
                    alerts=alerts,
                    norms=norms,
                    history=history,
                    thresholds=thresholds,
                )
        recorder.clear()
        state.history = history
        state.alerts.extend(alerts)
        state.first_nonfinite.update(fresh)
        if self.store.enabled:
            self._report_gradient_epoch(epoch, folder, data, alerts, rows)
        # after the gradients' own report: a failed write here leaves their warning and event done
        health = self._save_activation_epoch(epoch, save_folder) + self._save_update_epoch(epoch, save_folder)
        return paths + health if self.store.enabled else []

    def _report_gradient_epoch(
        self, epoch: int, folder: Any, data: EpochData, alerts: list[Alert], rows: list[GradientRow]
    ) -> None:
        """The saved epoch's warning (new alerts only), console line and ``gradients_saved`` event."""
        where = save.layout.relative_path(SECTION, "alerts", folder=folder, epoch=epoch)
        warn_new_alerts(
            alerts,
            self._grads.warned,
            subject="gradient",
            unit="tensor(s)",
            titles=TITLES,
            where=where,
            category=GradientAlertWarning,
            key=lambda alert: (alert.kind, alert.layer_id, alert.param),
            order=severity,
            stacklevel=4,
        )
        self._say(
            f"gradients: epoch {epoch}, {len(data.iterations)} iterations × {len(data.columns)} tensors, "
            f"{len(alerts)} alert(s), {int(data.skipped.sum())} skipped step(s) → {self.store.root / folder}"
        )
        self.events.emit("gradients_saved", epoch=epoch, rows=rows)

    def gradient_alerts(self) -> list[dict[str, Any]]:
        """Every alert reported by ``save_collected_grads`` so far, oldest first.

        Each is a dict: ``epoch, kind`` (``"nonfinite"``, ``"vanishing"``, ``"exploding"``),
        ``layer_id, layer_name, param, iteration, value, message``.
        """
        return [alert.to_json() for alert in self._grads.alerts]

    # ------------------------------------------------------------ internals
    def _gradient_epoch(self, epoch: int) -> EpochData:
        """The rows recorded since the last save, on the host (one copy from the device)."""
        return EpochData.from_recorder(self._grads.recorder, epoch)

    def _gradient_history(self) -> list[save.LayerHistory]:
        """Per-layer L2 of every epoch saved so far, read from ``save_path`` the first time."""
        state = self._grads
        if state.history is None:
            state.history = save.load_history(self.store) if self.store.enabled else []
        return state.history

    def _reduce_gradient_shards(self, epoch: int) -> None:
        """FSDP2: reduce the recorded per-shard statistics across ranks (no-op otherwise).

        Statistics of a gradient split across ranks are partial sums until this runs, once
        per save on every rank: a check that the ranks recorded the same steps (one small
        all-reduce), then one SUM and one MAX all-reduce over the epoch's buffer. DDP
        gradients are whole on every rank after its all-reduce, so nothing is exchanged.

        Raises:
            BBDecoderValueError: the ranks recorded different steps or tensors (raised on
                every rank, rather than a hang in the reduction).
        """
        if distributed.world_size() == 1 or not distributed.is_sharded(self.inner):
            return
        recorder = self._grads.recorder
        mine = recorder.signature()
        device = recorder.data.device if recorder.data is not None else self.device
        low, high = distributed.spread(mine, device)
        if low != high:
            raise BBDecoderValueError(
                f"save_collected_grads(ep={epoch}): the ranks recorded different gradient statistics "
                f"({low[0]} to {high[0]} rows since the last save; this rank: {mine[0]}). With a sharded (FSDP) "
                "model every rank must call backward_propagation with the same collect_grads, layer_inds and "
                "collect_every, and every rank must call save_collected_grads"
            )
        recorder.reduce_shards()


# --------------------------------------------------------------------------- checks
def _check_loss(loss: Any, backward_kwargs: dict[str, Any] | None = None) -> None:
    if not isinstance(loss, torch.Tensor):
        raise BBDecoderTypeError(f"loss must be a torch.Tensor, got {type(loss).__name__} {loss!r}")
    if not loss.requires_grad:
        raise BBDecoderValueError(
            "loss does not require grad: it was computed without a graph (under torch.no_grad(), "
            "from detached tensors, or from a model whose parameters are all frozen), so there is "
            f"nothing to backpropagate; got loss={loss!r}"
        )
    kwargs = backward_kwargs or {}
    unknown = sorted(set(kwargs) - set(_BACKWARD_KEYWORDS))
    if unknown:
        raise BBDecoderTypeError(
            f"backward_propagation got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"its own are collect_grads, layer_inds, scaler, collect_every, include_bias, and loss.backward "
            f"accepts {', '.join(_BACKWARD_KEYWORDS)}"
        )
    if loss.is_complex() or not loss.is_floating_point():
        raise BBDecoderTypeError(f"loss must be a real floating tensor, got dtype {loss.dtype}")
    gradient = kwargs.get("gradient")
    if loss.numel() != 1 and gradient is None:
        raise BBDecoderValueError(
            f"loss must be a scalar (one element) unless gradient= is given; got a tensor of shape {tuple(loss.shape)}"
        )
    if gradient is not None and (not isinstance(gradient, torch.Tensor) or gradient.shape != loss.shape):
        shape = tuple(gradient.shape) if isinstance(gradient, torch.Tensor) else type(gradient).__name__
        raise BBDecoderValueError(f"gradient must be a tensor of the loss's shape {tuple(loss.shape)}, got {shape}")
    inputs = kwargs.get("inputs")
    if inputs is not None:
        items = [inputs] if isinstance(inputs, torch.Tensor) else inputs
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, torch.Tensor) for i in items):
            raise BBDecoderTypeError(
                f"inputs must be a tensor or a list of tensors (or None for every leaf), got "
                f"{type(inputs).__name__} {inputs!r:.60}"
            )
        if not items:
            raise BBDecoderValueError("inputs=[] names no tensor to accumulate gradients into; leave it None for all")
        if not all(item.requires_grad for item in items):
            raise BBDecoderValueError("inputs must be tensors that require grad (the parameters to accumulate into)")


def _check_flag(value: Any, name: str) -> bool:
    return checks.flag(value, name)


def _check_every(value: Any) -> int:
    return checks.integer(value, "collect_every", low=1, meaning="1 records every call")


def _check_epoch(value: Any) -> int:
    return checks.integer(value, "ep", low=0, meaning="the epoch number")


def _check_threshold(value: Any, name: str) -> float:
    return checks.real(value, name, low=0.0)


def _check_scaler(scaler: Any) -> None:
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise BBDecoderTypeError(
            f"scaler must be a torch.amp.GradScaler (or None), got {type(scaler).__name__} {scaler!r:.80}"
        )
