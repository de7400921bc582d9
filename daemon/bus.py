"""The daemon's event bus: every run event, step record and accepted rank report, fanned out.

The supervisor publishes the ranks' tailed events and its own (``event``), the step records
it tails (``step``) and the reports it accepts (``report``); subscribers (the metrics, the
recovery tracer; alerts later) register with ``subscribe`` and get whichever of
``on_event(ev, restart_reason)``, ``on_step(rec)``, ``on_report(rep)`` they define.
``restart_reason`` is the reason of the newest restart (``daemon.causes``), folded once here
so that every subscriber sees the same verdict. A subscriber's exception is logged and
never reaches the publisher: a subscriber's bug must not cost the supervisor its tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from .causes import Causes, classify

log = logging.getLogger(__name__)


class EventSubscriber(Protocol):
    def on_event(self, ev: dict[str, Any], restart_reason: str) -> None: ...


class StepSubscriber(Protocol):
    def on_step(self, rec: dict[str, Any]) -> None: ...


class ReportSubscriber(Protocol):
    def on_report(self, rep: dict[str, Any]) -> None: ...


class EventBus:
    def __init__(self) -> None:
        self._events: list[Callable[[dict[str, Any], str], None]] = []
        self._steps: list[Callable[[dict[str, Any]], None]] = []
        self._reports: list[Callable[[dict[str, Any]], None]] = []
        self._lock = threading.Lock()  # events come from the supervisor's thread and the API's
        self._causes = Causes()
        self.last_restart_reason = ""

    def subscribe(self, subscriber: object) -> None:
        """Registers whichever of ``on_event``, ``on_step``, ``on_report`` the subscriber has."""
        if (on_event := getattr(subscriber, "on_event", None)) is not None:
            self._events.append(on_event)
        if (on_step := getattr(subscriber, "on_step", None)) is not None:
            self._steps.append(on_step)
        if (on_report := getattr(subscriber, "on_report", None)) is not None:
            self._reports.append(on_report)

    def event(self, ev: dict[str, Any]) -> None:
        """A run event: from the ranks (tailed), the supervisor itself, or the detector."""
        with self._lock:
            self._causes, reason = classify(self._causes, ev)
            if reason is not None:
                self.last_restart_reason = reason
            restart_reason = self.last_restart_reason
        _deliver(self._events, (ev, restart_reason), f"event {ev.get('kind')}")

    def step(self, rec: dict[str, Any]) -> None:
        """A step record tailed from steps.jsonl."""
        _deliver(self._steps, (rec,), f"step {rec.get('step')}")

    def report(self, rep: dict[str, Any]) -> None:
        """A rank report the supervisor accepted (not a replay)."""
        _deliver(self._reports, (rep,), f"a report of {rep.get('role')} {rep.get('rank')}")


def _deliver(subscribers: list[Callable[..., None]], args: tuple[Any, ...], what: str) -> None:
    """Calls each subscriber; one that raises is logged, and the rest still get ``args``."""
    for on in subscribers:
        try:
            on(*args)
        except Exception:
            log.exception("bus subscriber failed on %s", what)
