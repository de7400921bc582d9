"""The running attempt as the supervisor tracks it, shared with the API's controller."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from typing import Any

from milepost.engine.contract.identity import ProcessRecord


@dataclass
class RunningAttempt:
    number: int = -1  # -1: none launched yet
    pid: int | None = None  # None: no attempt running
    proc: subprocess.Popen[bytes] | None = None  # None for an attempt re-attached after a daemon restart
    record: ProcessRecord | None = None  # its identity: kills and liveness of a re-attached attempt
    started: float = 0.0
    last_step_ts: float = 0.0  # newest step of this attempt (0: none yet)
    start_step: int = 0  # the newest step when it was launched
    # What it said of its end: its finished / failed / resume_mismatch events.
    outcome: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.pid is not None
