"""What one engine step and one attempt yield: the figures the driver logs to steps.jsonl and returns."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StepResult:
    step: int
    reward_mean: float
    reward_std: float
    loss: float
    grad_norm: float
    kl: float
    clip_frac: float
    lr: float
    weight_version: int
    rollout_tokens: int
    train_tokens: float
    step_s: float
    phases: dict[str, float] = field(default_factory=dict)
    rollout_samples: int = 0
    prompt_tokens: int = 0
    trace_id: str = ""  # the step's OpenTelemetry trace: an exemplar on the daemon's step histograms

    def record(self, attempt: int) -> dict[str, Any]:
        """This step's line of steps.jsonl: the contract's StepRecord."""
        return {"attempt": attempt, "ts": time.time(), **asdict(self)}


@dataclass
class RunResult:
    start_step: int
    final_step: int
    world_size: int
    resumed_from: int | None
    loaded_checksum: str | None
    final_checksum: str
    steps: list[StepResult]
