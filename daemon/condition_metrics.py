"""Gauges that hold a run's conditions open for Prometheus alerting rules (deploy/prometheus).

A counter says that something happened; an alert that must fire *and later resolve* needs
a series that is 1 while the condition lasts. These follow alerts/rules.py's latches:
``milepost_collective_hang_open{attempt,op,group}`` from a diagnosed hang until the next
attempt (or the run's success or stop), ``milepost_attempt_failed{attempt}`` from an attempt
that ended with an error until the next attempt, ``milepost_resume_mismatch{attempt}`` from a
failed resume verification until a commit or the next attempt. ``run_dir_disk`` adds the
run dir's filesystem (free and total bytes) for DiskLow. Labels are bounded: at most
``MAX_HANGS`` hang series (closed ones leave first), one series for each of the others.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from typing import Any

from milepost.engine.contract.enums import Severity
from milepost.engine.contract.events import EventKind
from prometheus_client.core import GaugeMetricFamily, Metric

from .causes import HANG_KINDS, snake

MAX_HANGS = 16


class OpenConditions:
    """Fed the run's events; ``collect`` yields the gauges at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempt = 0
        self._hangs: dict[tuple[str, str, str], float] = {}  # (attempt, op, group) -> 1 open, 0 closed
        self._failed: int | None = None  # the attempt that ended with an error
        self._resume: int | None = None  # the attempt whose resume verification failed

    def new_attempt(self, attempt: int) -> None:
        """A new attempt launched: whatever the last one left open is closed."""
        with self._lock:
            self._attempt = max(self._attempt, attempt)
            self._hangs = dict.fromkeys(self._hangs, 0.0)
            self._failed = self._resume = None

    def on_event(self, kind: str, ev: dict[str, Any]) -> None:
        data = ev.get("data") or {}
        attempt = self._attempt if ev.get("attempt") is None else int(ev["attempt"])
        with self._lock:
            if kind == EventKind.CHECKPOINT_COMMITTED:
                self._resume = None
            elif kind == EventKind.RESUME_VERIFICATION_FAILED:
                self._resume = attempt
            elif kind == EventKind.ATTEMPT_ENDED and ev.get("severity") in (
                Severity.ERROR,
                Severity.CRITICAL,
            ):
                self._failed = attempt
            elif kind in (EventKind.RUN_SUCCEEDED, EventKind.RUN_STOPPED):
                self._hangs = dict.fromkeys(self._hangs, 0.0)
            elif snake(kind) in HANG_KINDS:
                # The diagnosis' own op and group: the daemon's CollectiveHang alert has the same labels.
                key = (str(attempt), str(data.get("op") or "")[:64], str(data.get("group") or "")[:64])
                self._hangs.pop(key, None)
                while len(self._hangs) >= MAX_HANGS:
                    # The oldest closed hang leaves first; the oldest open one only when all are open.
                    old = next((k for k, v in self._hangs.items() if v == 0.0), next(iter(self._hangs)))
                    del self._hangs[old]
                self._hangs[key] = 1.0

    def collect(self) -> Iterator[Metric]:
        hang = GaugeMetricFamily(
            "milepost_collective_hang_open",
            "1 while a diagnosed hung collective is unresolved (until the next attempt); 0 once it is",
            labels=["attempt", "op", "group"],
        )
        failed = GaugeMetricFamily(
            "milepost_attempt_failed",
            "1 when the attempt ended with an error, until the next attempt launches",
            labels=["attempt"],
        )
        resume = GaugeMetricFamily(
            "milepost_resume_mismatch",
            "1 when the attempt's resumed state failed verification, until a commit or the next attempt",
            labels=["attempt"],
        )
        with self._lock:
            for (attempt, op, group), value in self._hangs.items():
                hang.add_metric([attempt, op, group], value)
            for fam, held in ((failed, self._failed), (resume, self._resume)):
                fam.add_metric([str(self._attempt if held is None else held)], 0.0 if held is None else 1.0)
        yield from (hang, failed, resume)


def run_dir_disk(run_dir: str | None) -> Iterator[Metric]:
    """Free and total bytes of the run dir's filesystem; no series when it cannot be read."""
    avail = GaugeMetricFamily(
        "milepost_run_dir_filesystem_avail_bytes", "Bytes free to the daemon on the run dir's filesystem"
    )
    size = GaugeMetricFamily("milepost_run_dir_filesystem_size_bytes", "Size of the run dir's filesystem")
    if run_dir:
        try:
            usage = shutil.disk_usage(run_dir)
        except OSError:  # the run dir is gone or unreadable: no disk series, not a failed scrape
            pass
        else:
            avail.add_metric([], float(usage.free))
            size.add_metric([], float(usage.total))
    yield from (avail, size)
