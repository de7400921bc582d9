"""Pydantic models of the daemon's HTTP API: the rank-report ingest body and every response.

Response models allow extra keys, so the controller and the store can add fields without
an API change; the fields named here are the documented contract (see /openapi.json).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# SQLite integers are signed 64-bit: anything wider would fail in the store, not in validation.
I64_MAX = 2**63 - 1
NonNegI64 = Annotated[int, Field(ge=0, le=I64_MAX)]
I64 = Annotated[int, Field(ge=-I64_MAX - 1, le=I64_MAX)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(max_length=256)]

MAX_REPORTS = 5000
MAX_ITEMS = 1024


class ControlAction(StrEnum):
    pause = "pause"
    resume = "resume"
    stop = "stop"
    checkpoint = "checkpoint"


# -- ingest (rank -> daemon) --------------------------------------------------
class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class OpenCollective(_Wire):
    op: Name
    group: Name
    seq: NonNegI64
    nbytes: NonNegI64 = 0
    dtype: Name = ""
    enter_ts: FiniteFloat


class CollectiveSummary(_Wire):
    count: NonNegI64 = 0
    seconds: FiniteFloat = 0.0
    bytes: NonNegI64 = 0
    world: NonNegI64 = 0
    p99_s: FiniteFloat = 0.0


class GpuDevice(_Wire):
    """One GPU as the rank's NVML collector saw it (milepost.engine.gpu)."""

    index: Annotated[int, Field(ge=0, le=1023)]
    uuid: Name = ""
    name: Name = ""
    utilization: FiniteFloat | None = None
    memory_used_bytes: NonNegI64 | None = None
    memory_total_bytes: NonNegI64 | None = None
    power_watts: FiniteFloat | None = None
    temperature_celsius: FiniteFloat | None = None
    ecc_errors: dict[Name, NonNegI64] = Field(default_factory=dict, max_length=8)
    xid_errors: dict[Name, NonNegI64] = Field(default_factory=dict, max_length=256)
    nvlink_tx_bytes: NonNegI64 | None = None
    nvlink_rx_bytes: NonNegI64 | None = None


class GpuSnapshot(_Wire):
    up: Annotated[int, Field(ge=0, le=1)]
    reason: Name
    node: Name = ""
    devices: list[GpuDevice] = Field(default_factory=list, max_length=64)


class Report(_Wire):
    """One rank's periodic report: liveness, progress and every collective it is inside."""

    v: I64
    attempt: NonNegI64
    role: Literal["driver", "trainer", "rollout"]
    rank: NonNegI64
    seq: NonNegI64
    ts: FiniteFloat
    pid: I64
    host: Name
    step: NonNegI64
    phase: Name
    state: Name
    open_collectives: list[OpenCollective] = Field(default_factory=list, max_length=MAX_ITEMS)
    # NaN is a legitimate metric value (a diverged loss); the daemon must see it, not reject it.
    timings: dict[str, float] = Field(default_factory=dict, max_length=MAX_ITEMS)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=MAX_ITEMS)
    counters: dict[str, I64] = Field(default_factory=dict, max_length=MAX_ITEMS)
    gpus: GpuSnapshot | None = None  # the rank's node, when the rank runs an NVML collector
    coll_entered: dict[str, NonNegI64] = Field(default_factory=dict, max_length=MAX_ITEMS)
    coll_completed: dict[str, NonNegI64] = Field(default_factory=dict, max_length=MAX_ITEMS)
    collectives: dict[str, CollectiveSummary] = Field(default_factory=dict, max_length=MAX_ITEMS)
    # [group, seq, op, enter_ts, duration_s] of recently closed collectives
    recent_collectives: list[tuple[Name, NonNegI64, Name, FiniteFloat, FiniteFloat]] = Field(
        default_factory=list, max_length=MAX_ITEMS
    )
    compute: dict[str, FiniteFloat] = Field(default_factory=dict, max_length=MAX_ITEMS)
    compute_hist: list[tuple[NonNegI64, FiniteFloat]] = Field(default_factory=list, max_length=MAX_ITEMS)


class IngestBatch(_Wire):
    reports: list[Report] = Field(max_length=MAX_REPORTS)


# -- responses ----------------------------------------------------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Health(BaseModel):
    ok: bool


class Status(_Open):
    run_id: str | None
    name: str | None
    state: str
    reason: str | None
    step: int | None
    target_steps: int | None
    attempt: int | None
    world_size: int | None
    goodput: float | None
    restarts: int
    started_at: float | None
    updated_at: float | None


class Badput(_Open):
    startup_s: float
    recovery_s: float
    lost_progress_s: float
    checkpoint_stall_s: float
    other_s: float


class Goodput(_Open):
    goodput: float | None
    wall_s: float
    productive_s: float
    badput: Badput


class RankView(_Open):
    role: str
    rank: int
    attempt: int | None = None
    host: str | None = None
    pid: int | None = None
    step: int | None = None
    phase: str | None = None
    state: str | None = None
    heartbeat_age_seconds: float | None = None


class Ranks(BaseModel):
    ranks: list[RankView]


class AttemptView(_Open):
    number: int
    pid: int | None = None
    state: str | None = None
    world_size: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    reason: str | None = None
    start_step: int | None = None
    resumed_from: int | None = None
    verified: int | None = None
    last_step: int | None = None


class Attempts(BaseModel):
    attempts: list[AttemptView]


class EventView(_Open):
    id: int
    ts: float | None
    kind: str
    severity: str | None
    message: str | None
    attempt: int | None = None
    role: str | None = None
    rank: int | None = None
    step: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class Events(BaseModel):
    events: list[EventView]
    last_id: int = Field(
        description="id of the last event returned, else since_id: poll again with since_id=last_id"
    )


class StepRecord(_Open):
    step: int


class Steps(BaseModel):
    steps: list[StepRecord]


class CheckpointView(_Open):
    step: int
    path: str | None = None
    status: str | None = None
    reason: str | None = None
    world_size: int | None = None
    state_checksum: str | None = None
    committed_at: float | None = None
    attempt: int | None = None


class Checkpoints(BaseModel):
    checkpoints: list[CheckpointView]


class DiagnosisView(_Open):
    id: int
    kind: str
    culprit_ranks: list[Any]
    group: str | None
    seq: int | None
    op: str | None
    onset_at: float | None
    detected_at: float | None
    action: str | None


class Diagnoses(BaseModel):
    diagnoses: list[DiagnosisView]


FaultKind = Literal[
    "kill",
    "exit",
    "exception",
    "hang",
    "stall",
    "skip-collective",
    "slow",
    "nan",
    "rollout-crash",
    "corrupt-checkpoint",
]


class FaultRequest(_Wire):
    """A fault for one rank of the running attempt; it fires at its next step boundary at or after ``step``."""

    kind: FaultKind
    role: Literal["driver", "trainer", "rollout"] = "trainer"
    rank: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    step: Annotated[int, Field(ge=0, le=I64_MAX)] = 0
    factor: Annotated[float, Field(ge=1.0, le=1000.0)] = 1.5


class FaultResult(_Open):
    accepted: bool
    id: int


class ControlResult(_Open):
    action: str
    accepted: bool
    state: str


class IngestResult(_Open):
    accepted: int
    control: list[Any] = Field(default_factory=list)
    faults: list[Any] = Field(default_factory=list)


class ErrorBody(BaseModel):
    detail: Any
