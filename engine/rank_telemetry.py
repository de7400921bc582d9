"""A rank process's telemetry: its tracer and, opt-in, an NVML collector whose samples ride its reports.

``MILEPOST_RANK_GPU=1`` makes every rank process sample its node's GPUs (every
``MILEPOST_RANK_GPU_INTERVAL_S`` seconds, default 5) into ``report["gpus"]``; the daemon
keeps one source per node. Off by default: the daemon's own collector covers its node.
"""

from __future__ import annotations

import os
from typing import Any

from . import step_tracing as tracing
from .contract.process import RANK_GPU_ENV, RANK_GPU_INTERVAL_ENV
from .gpu import GpuCollector


class RankTelemetry:
    def __init__(
        self,
        *,
        role: str,
        rank: int,
        attempt: int,
        daemon_url: str | None,
        token: str | None,
        reporter: Any = None,
    ) -> None:
        self.tracing = tracing.setup(
            role=role, rank=rank, attempt=attempt, daemon_url=daemon_url, token=token
        )
        self.gpu: GpuCollector | None = None
        if reporter is not None and os.environ.get(RANK_GPU_ENV, "") == "1":
            try:
                interval = max(0.5, float(os.environ.get(RANK_GPU_INTERVAL_ENV, "5")))
            except ValueError:
                interval = 5.0
            self.gpu = GpuCollector().start().sample_every(interval)
            reporter.gpus = self.gpu.latest

    def close(self) -> None:
        self.tracing.shutdown()
        if self.gpu is not None:
            self.gpu.close()
