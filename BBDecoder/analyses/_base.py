"""What every analysis mixin may rely on from the analyzer that hosts it."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core import distributed
from ..core.events import Events
from ..core.forward import After, hooked_forward
from ..core.hooks import HookRegistry
from ..core.layers import Layer, LayerTable, Selector
from ..core.model import model_device
from ..errors import BBDecoderError, OutputWriteError
from ..output.store import Store
from ..summary import printable

logger = logging.getLogger("BBDecoder")

WORST_SHOWN = 5
"""Alerts quoted in a save's warning; the full list is in its alerts file."""


@contextlib.contextmanager
def held_on_failure(epoch: int, files: str, held: str) -> Iterator[None]:
    """Turn a failed epoch write into one :class:`OutputWriteError` saying the data is still held.

    Args:
        epoch: the epoch being saved.
        files: what was being written (``"its files"``, ``"the activation files"``).
        held: what is kept for the retry (``"The epoch's update norms are"``).
    """
    try:
        yield
    except (OSError, BBDecoderError) as error:
        raise OutputWriteError(
            f"save_collected_grads(ep={epoch}) could not write {files}: {error}. {held} still held; call "
            f"save_collected_grads({epoch}) again once the cause is fixed"
        ) from error


def warn_new_alerts(
    alerts: Iterable[Any],
    warned: set[Hashable],
    *,
    subject: str,
    unit: str,
    titles: Mapping[str, str],
    where: str,
    category: type[Warning],
    key: Callable[[Any], Hashable] = lambda a: (a.kind, a.layer_id),
    order: Callable[[Any], Any] | None = None,
    stacklevel: int = 4,
) -> None:
    """One warning per save for the alerts not warned before: counts by kind, then the worst few.

    Args:
        alerts: this save's alerts (``kind``, ``epoch``, ``message`` each).
        warned: keys already warned (updated in place).
        subject: ``"gradient"``, ``"activation"``…, the message's first word.
        unit: what is counted (``"tensor(s)"``, ``"layer(s)"``).
        titles: ``{kind: word}`` in the order the counts are given; other kinds count under the last.
        where: the file holding the full list, named in the message.
        category: the warning class.
        key: what makes an alert the same as one warned before.
        order: sort key putting the worst first (default: as given).
        stacklevel: passed to ``warnings.warn``.
    """
    new = [a for a in alerts if key(a) not in warned]
    if not new:
        return
    warned.update(key(a) for a in new)
    last = list(titles)[-1]
    counts = dict.fromkeys(titles, 0)
    for alert in new:
        counts[alert.kind if alert.kind in titles else last] += 1
    summary = ", ".join(f"{n} {titles[kind]}" for kind, n in counts.items() if n)
    epochs = ", ".join(str(e) for e in sorted({a.epoch for a in new}))
    worst = sorted(new, key=order) if order is not None else new
    lines = [f"{subject} alerts, epoch {epochs}: {summary} {unit}; full list in {where}"]
    lines += [f"  {printable(a.message)}" for a in worst[:WORST_SHOWN]]
    if len(new) > WORST_SHOWN:
        lines.append(f"  … and {len(new) - WORST_SHOWN} more")
    warnings.warn("\n".join(lines), category, stacklevel=stacklevel)


class AnalyzerBase:
    """State and helpers shared by the analysis mixins.

    Attributes:
        model: the object the user passed (possibly DDP- or compile-wrapped).
        inner: the user's own module inside any wrapper; layers and hooks live here.
        layers: the numbered layer table of ``inner``.
        hooks: the registry that owns every hook handle.
        store: the output folder; the only writer of files.
        events: the registry exporters subscribe to (TensorBoard).
        verbose: whether to print tables and progress.
    """

    model: nn.Module
    inner: nn.Module
    layers: LayerTable
    hooks: HookRegistry
    store: Store
    events: Events
    verbose: bool

    # ------------------------------------------------------------ selectors
    def _select(self, selector: Selector, argument: str = "layer_inds", *, default_all: bool = False) -> list[Layer]:
        return self.layers.resolve(selector, argument, default_all=default_all)

    def _layer(self, selector: int | str, argument: str = "layer") -> Layer:
        if isinstance(selector, (list, tuple)):
            if len(selector) != 1:
                return self.layers.one(selector, argument)  # raises the type error
            selector = selector[0]
        return self.layers.one(selector, argument)

    @property
    def device(self) -> torch.device:
        return model_device(self.inner)

    @property
    def is_main_process(self) -> bool:
        return distributed.is_main_process()

    def _say(self, text: str) -> None:
        """Print ``text`` when verbose, on rank 0 only, control characters escaped (a layer name cannot
        recolour or rewrite the terminal)."""
        if self.verbose and self.is_main_process:
            print("\n".join(printable(line) for line in text.split("\n")))  # no raw control characters

    # -------------------------------------------------------------- forward
    def _capture(
        self,
        inputs: tuple[tuple[Any, ...], dict[str, Any]],
        layers: Sequence[Layer],
        call: str,
        *,
        grad: bool = False,
        keep_graph: bool = False,
        after: After | None = None,
    ) -> tuple[Any, dict[int, Any]]:
        """Run the model once on ``inputs = (args, kwargs)`` in eval mode; capture ``layers``' outputs.

        Hooks exist only during the call (see :func:`~BBDecoder.core.forward.hooked_forward`).
        With ``grad`` the pass records a graph (Grad-CAM, costs); otherwise it runs under
        ``torch.no_grad()``. Outputs are detached unless ``keep_graph``.

        Returns:
            ``(model_output, {layer_id: layer_output})``.

        Raises:
            ModelForwardError: the model raised; says which call and layer were running.
        """
        args, kwargs = inputs
        with (
            hooked_forward(
                self.inner,
                self.layers,
                self.hooks,
                call,
                device=self.device,
                capture=layers,
                keep_graph=keep_graph,
                after=after,
            ) as run,
            torch.set_grad_enabled(grad),
        ):
            output = run(args, kwargs)
        return output, dict(run.captured)
