"""Wire models: what crosses HTTP and the run dir's JSON lines between the ranks and the daemon.

- :class:`Report`: a rank's periodic snapshot, POSTed as an :class:`IngestBatch` to
  ``/api/v1/ingest`` (the rank builds it as a plain dict, milepost.engine.wire.make_report:
  reporting never pays for validation on the training side; the daemon validates).
- :class:`StepRecord`: one line of ``steps.jsonl``, written by the engine driver per step.
- :class:`FaultRequest`: the body of ``POST /api/v1/faults``.
- :class:`GpuSnapshot`: a node's GPUs as an NVML collector saw them, inside a report.

Bounds are the store's: SQLite integers are signed 64-bit, and names and lists are capped so
one bad report cannot grow the daemon's memory.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from .enums import FaultKind, Role

WIRE_VERSION = 1

# SQLite integers are signed 64-bit: anything wider would fail in the store, not in validation.
I64_MAX = 2**63 - 1
NonNegI64 = Annotated[int, Field(ge=0, le=I64_MAX)]
I64 = Annotated[int, Field(ge=-I64_MAX - 1, le=I64_MAX)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(max_length=256)]

MAX_REPORTS = 5000
MAX_ITEMS = 1024

# The roles that report; the daemon's own role never comes over the wire.
RankRole = Literal[Role.DRIVER, Role.TRAINER, Role.ROLLOUT]


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
    role: RankRole
    rank: NonNegI64
    seq: NonNegI64
    ts: FiniteFloat
    pid: I64
    host: Name
    step: NonNegI64
    phase: Name
    state: Name  # a RankStatus: "running", then "exited" once
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


class StepFigures(BaseModel):
    """The driver's figures of one step (a NaN loss stays NaN): a StepRecord less attempt and ts."""

    step: NonNegI64
    reward_mean: float
    reward_std: float
    loss: float
    grad_norm: float
    kl: float
    clip_frac: float
    lr: float
    weight_version: NonNegI64
    rollout_tokens: NonNegI64
    train_tokens: float
    step_s: float
    phases: dict[str, float] = Field(default_factory=dict)
    rollout_samples: NonNegI64 = 0
    prompt_tokens: NonNegI64 = 0
    trace_id: str = ""  # the step's OpenTelemetry trace: an exemplar on the daemon's step histograms


class StepRecord(StepFigures):
    """One line of ``steps.jsonl``: the attempt, the time and the driver's figures of one step."""

    model_config = ConfigDict(extra="allow")

    attempt: NonNegI64
    ts: float


class FaultRequest(_Wire):
    """A fault for one rank of the running attempt; it fires at its next step boundary at or after ``step``."""

    kind: FaultKind
    role: RankRole = Role.TRAINER
    rank: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    step: Annotated[int, Field(ge=0, le=I64_MAX)] = 0
    factor: Annotated[float, Field(ge=1.0, le=1000.0)] = 1.5
