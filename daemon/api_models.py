"""Pydantic models of the daemon's HTTP API responses.

The request bodies (rank reports, faults) and the control action are the contract's
(milepost.engine.contract.wire, milepost.engine.contract.enums).

Response models allow extra keys, so the controller and the store can add fields without
an API change; the fields named here are the documented contract (see /openapi.json).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


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
    size_bytes: int | None = Field(default=None, description="bytes on disk of the checkpoint's directory")


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
    rejected: int = Field(0, description="reports of the batch refused as invalid (the others were kept)")
    errors: list[Any] = Field(default_factory=list, description="why, for the first few refused reports")


class ErrorBody(BaseModel):
    detail: Any


# -- alerts and silences ------------------------------------------------------
class AlertView(_Open):
    fingerprint: str
    labels: dict[str, str]
    annotations: dict[str, str] = Field(description="summary, description, evidence, action, dashboard")
    status: str = Field(description="pending | firing | resolved")
    for_s: float
    active_since: float
    fired_at: float | None = None
    resolved_at: float | None = None
    last_seen: float
    generator_url: str
    silenced_by: list[str] = Field(description="ids of the active silences that mute it")
    inhibited_by: list[str] = Field(description="fingerprints of the firing alerts that inhibit it")


class NotificationView(_Open):
    key: str
    receiver: str
    status: str = Field(description="firing | resolved: the notification's")
    alerts: list[str] = Field(description="alertnames in it")
    state: str = Field(description="pending | sent | failed | expired: its delivery's")
    attempts: int
    reason: str
    created_at: float


class Delivery(BaseModel):
    pending: dict[str, int] = Field(description="receiver -> notifications waiting")
    held: dict[str, str] = Field(description="receiver -> why it cannot send (an unset secret variable)")
    history: list[NotificationView] = Field(description="the newest notifications, newest first")


class Alerts(BaseModel):
    alerts: list[AlertView] = Field(
        description="firing, pending and resolved (kept resolved_keep_s), newest first"
    )
    delivery: Delivery


class SilenceRequest(BaseModel):
    """``POST /api/v1/silences``: mute alerts whose labels match every matcher, from now for ``duration_s``."""

    model_config = ConfigDict(extra="forbid")
    matchers: list[str] = Field(
        min_length=1, max_length=32, examples=[["alertname=CollectiveHang", "rank=1"]]
    )
    duration_s: float = Field(gt=0, le=366 * 86400, allow_inf_nan=False)
    created_by: str = Field("", max_length=200)
    comment: str = Field("", max_length=2000)


class MatcherView(BaseModel):
    name: str
    op: str
    value: str


class SilenceView(_Open):
    id: str
    matchers: list[MatcherView]
    starts_at: float
    ends_at: float
    created_by: str
    comment: str
    active: bool


class Silences(BaseModel):
    silences: list[SilenceView]


class AlertTestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receiver: str = Field(min_length=1, max_length=64)


class AlertTestResult(BaseModel):
    receiver: str
    status: str = Field(description="ok | retry | fail")
    answer: str = Field(description="what the receiver answered (secrets scrubbed)")
    reason: str


# -- the dashboard's views (daemon/api_views.py) ---------------------------------
class RankMatrix(_Open):
    role: str
    metric: str = Field(description="compute_s: seconds of compute per step")
    steps: list[int] = Field(description="the columns: the newest steps any rank reported")
    total_ranks: int
    offset: int
    sort: str
    ranks: list[int] = Field(description="the rows: this page of ranks, in the requested order")
    values: list[list[float | None]] = Field(description="values[i][j]: rank ranks[i] at step steps[j]")
    scores: list[float | None] = Field(description="straggler score: median ratio to the step's median rank")
    last: list[float | None]
    aggregate: dict[str, list[float | None]] = Field(
        description="min, p50, p90, max, mean per step, all ranks"
    )


class InFlightCollective(_Open):
    role: str
    rank: int
    op: str
    group: str
    seq: int
    age_s: float


class CollectiveBucket(_Open):
    t: float = Field(description="bucket start (unix seconds)")
    op: str
    group: str
    count: int
    mean_s: float | None
    max_s: float
    busbw_bytes_per_second: float


class CollectivesView(BaseModel):
    now: float
    in_flight: list[InFlightCollective]
    series: list[CollectiveBucket]


class EvidenceView(_Open):
    id: int
    phases: dict[str, Any]
    stacks: dict[str, str] = Field(description="py-spy (or faulthandler) stack text per rank, capped")
    flight_recorder: list[dict[str, Any]]


class TimelinePoint(_Open):
    stage: str = Field(description="fault, detected, attempt ended, restarted, resume verified, first step")
    ts: float
    detail: str | None = None


class RecoveryTimeline(BaseModel):
    id: int
    points: list[TimelinePoint]
