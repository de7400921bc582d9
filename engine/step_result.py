"""What one engine step and one attempt yield: the figures the driver logs to steps.jsonl and returns."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .contract.wire import StepFigures


class StepResult(StepFigures):
    """One step's figures as the driver returns them (built with ``model_construct``: no validation cost)."""

    def record(self, attempt: int) -> dict[str, Any]:
        """This step's line of steps.jsonl: the contract's StepRecord, the figures as they were given."""
        return {"attempt": attempt, "ts": time.time(), **dict(self)}


@dataclass
class RunResult:
    start_step: int
    final_step: int
    world_size: int
    resumed_from: int | None
    loaded_checksum: str | None
    final_checksum: str
    steps: list[StepResult]
