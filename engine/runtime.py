"""What every process of an attempt carries: events, the instrument, faults, the reporter."""

from __future__ import annotations

import os
from typing import Any

from .events import EventSink
from .faults import FaultInjector
from .instrument import RankInstrument
from .jobspec import FaultSpec
from .reporter import Reporter

TOKEN_ENV = "MILEPOST_TOKEN"


class RankRuntime:
    def __init__(
        self,
        *,
        role: str,
        rank: int,
        run_dir: str,
        attempt: int,
        faults: list[FaultSpec],
        daemon_url: str | None,
        token: str | None = None,
        report_interval_s: float = 1.0,
        on_response: Any = None,
    ) -> None:
        self.events = EventSink(run_dir, attempt=attempt, role=role, rank=None if role == "driver" else rank)
        self.inst = RankInstrument(role, rank)
        self.faults = FaultInjector(faults, role=role, rank=rank, attempt=attempt, events=self.events)
        self.reporter: Reporter | None = None
        if daemon_url:
            self.reporter = Reporter(
                daemon_url,
                token or os.environ.get(TOKEN_ENV, ""),
                self.inst,
                attempt=attempt,
                interval_s=report_interval_s,
                on_response=on_response,
            ).start()

    def publish(
        self, *, timings: dict[str, float] | None = None, metrics: dict[str, float] | None = None
    ) -> None:
        """Records the last step's figures and queues a report now (never blocks)."""
        if self.reporter is None:
            return
        if timings is not None:
            self.reporter.timings = timings
        if metrics is not None:
            self.reporter.metrics = metrics
        self.reporter.report_now()

    def close(self) -> None:
        if self.reporter is not None:
            self.reporter.status = "exited"
            self.reporter.stop()
