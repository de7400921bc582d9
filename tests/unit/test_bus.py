"""The event bus: every subscriber gets what it subscribed to, and one's failure harms no other."""

from __future__ import annotations

from typing import Any

from milepost.daemon.bus import EventBus


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.steps: list[int] = []
        self.reports: list[int] = []

    def on_event(self, ev: dict[str, Any], restart_reason: str) -> None:
        self.events.append((ev["kind"], restart_reason))

    def on_step(self, rec: dict[str, Any]) -> None:
        self.steps.append(rec["step"])

    def on_report(self, rep: dict[str, Any]) -> None:
        self.reports.append(rep["rank"])


class Broken:
    def on_event(self, ev: dict[str, Any], restart_reason: str) -> None:
        raise RuntimeError("a subscriber's bug")

    def on_step(self, rec: dict[str, Any]) -> None:
        raise RuntimeError("a subscriber's bug")


class StepsOnly:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step(self, rec: dict[str, Any]) -> None:
        self.steps.append(rec["step"])


def test_fan_out_with_the_restart_reason() -> None:
    bus, rec, steps = EventBus(), Recorder(), StepsOnly()
    for sub in (Broken(), rec, steps):
        bus.subscribe(sub)
    bus.event({"kind": "attempt_failed", "data": {"cause": "actor_died"}})
    bus.event({"kind": "restart_scheduled"})
    bus.event({"kind": "attempt_launched", "attempt": 1})
    bus.step({"step": 7})
    bus.report({"role": "trainer", "rank": 3})
    assert rec.events == [
        ("attempt_failed", ""),
        ("restart_scheduled", "actor_died"),
        ("attempt_launched", "actor_died"),  # the newest restart's reason, as listeners always got
    ]
    assert rec.steps == [7] and steps.steps == [7] and rec.reports == [3]
    assert bus.last_restart_reason == "actor_died"
