"""Run events: one JSON object per line in ``<run_dir>/events.jsonl``.

Torch-free on purpose: the daemon imports this module to read what ranks wrote.
Every process of an attempt (driver, trainer ranks, rollout workers) appends to the
same file; each event is one ``write`` of one line on an ``O_APPEND`` descriptor, so
lines from different processes never interleave.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .contract.enums import Role, Severity
from .contract.layout import EVENTS_FILE, RunDir

__all__ = ["EVENTS_FILE", "Event", "EventSink", "read_events"]


@dataclass(kw_only=True)
class Event:
    kind: str
    message: str
    severity: str = Severity.INFO
    ts: float = field(default_factory=time.time)
    attempt: int = 0
    role: str = Role.DRIVER
    rank: int | None = None
    step: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.severity not in tuple(Severity):
            raise ValueError(
                f"event.severity={self.severity!r}: must be one of {tuple(s.value for s in Severity)}"
            )


class EventSink:
    """Appends events of one process to the run's event log (thread-safe)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, attempt: int, role: str, rank: int | None) -> None:
        self.path = RunDir(run_dir).events
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.attempt, self.role, self.rank = attempt, role, rank
        self._lock = threading.Lock()

    def emit(
        self,
        kind: str,
        message: str,
        *,
        severity: str = Severity.INFO,
        step: int | None = None,
        **data: Any,
    ) -> Event:
        event = Event(
            kind=kind,
            message=message,
            severity=severity,
            attempt=self.attempt,
            role=self.role,
            rank=self.rank,
            step=step,
            data=data,
        )
        line = json.dumps(asdict(event), default=str, separators=(",", ":")) + "\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
        return event


def read_events(run_dir: str | os.PathLike[str]) -> Iterator[Event]:
    """Yields the events of a run in file order; a torn last line is skipped."""
    path = RunDir(run_dir).events
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            try:
                yield Event(**json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError):
                continue
