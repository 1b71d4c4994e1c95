"""Named events between analyses and exporters, through one explicit registry.

An analysis emits an event with a typed, plain payload (results, never live tensors or
modules); exporters subscribe by name. Analyses never import exporters or each other.
Every event BBDecoder emits is listed in :data:`EVENTS` with its payload's fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

EVENTS: dict[str, str] = {
    "gradients_saved": "epoch: int, rows: list[GradientRow] — every recorded row of the saved epoch",
    "weights_histogram": "call: int, weights: list[LayerHistograms], grads: list[LayerHistograms] (when wanted)",
    "activations_saved": "epoch: int, rows: list of activation-statistics rows of the saved epoch",
    "updates_saved": "epoch: int, rows: list of update-to-weight rows of the saved epoch",
}
"""Every event, with what its payload holds."""

Subscriber = Callable[..., None]


class Subscription:
    """One subscriber to one event; ``remove()`` (or leaving a ``with`` block) unsubscribes."""

    def __init__(self, events: Events, event: str, subscriber: Subscriber) -> None:
        self._events, self.event, self.subscriber = events, event, subscriber

    def remove(self) -> None:
        """Unsubscribe (idempotent)."""
        listeners = self._events._subscribers[self.event]
        if self.subscriber in listeners:
            listeners.remove(self.subscriber)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


class Events:
    """The registry of one analyzer: who listens to which event."""

    def __init__(self) -> None:
        self._subscribers: dict[str, list[Subscriber]] = {name: [] for name in EVENTS}

    def subscribe(self, event: str, subscriber: Subscriber) -> Subscription:
        """Call ``subscriber(**payload)`` each time ``event`` is emitted (several per event allowed).

        Raises:
            ValueError: ``event`` is not one of :data:`EVENTS`.
        """
        if event not in self._subscribers:
            raise ValueError(f"unknown event {event!r}; events are {', '.join(EVENTS)}")
        self._subscribers[event].append(subscriber)
        return Subscription(self, event, subscriber)

    def wanted(self, event: str) -> bool:
        """Whether anyone listens to ``event`` (so an analysis can skip building its payload)."""
        return bool(self._subscribers.get(event))

    def emit(self, event: str, **payload: Any) -> None:
        """Deliver ``payload`` to every subscriber of ``event``, in subscription order."""
        for subscriber in list(self._subscribers[event]):
            subscriber(**payload)
