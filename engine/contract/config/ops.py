"""The sections the daemon supervises a job by: [run] [trainer] [rollout] [supervisor] [detection], and [[faults]]."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import Field, model_validator

from ..enums import FaultKind, Role
from .base import FieldError, Section

TrainBackend = Literal["fsdp2", "megatron"]
RolloutBackend = Literal["torch", "sglang"]
FaultRole = Literal[Role.DRIVER, Role.TRAINER, Role.ROLLOUT]


class RunConfig(Section):
    section = "run"

    name: str = "milepost"
    seed: int = 0
    steps: Annotated[int, Field(ge=1)] = 100
    run_dir: str = ""  # default: runs/<name>

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.name or "/" in self.name:
            raise FieldError("name", self.name, "must be non-empty and contain no '/'")
        return self


class TrainerConfig(Section):
    section = "trainer"

    backend: TrainBackend = "fsdp2"
    world_size: Annotated[int, Field(ge=1)] = 2
    min_world_size: int = 1  # elastic floor: with fewer free trainer slots the attempt cannot start
    max_world_size: int = 0  # elastic ceiling; 0 means world_size (filled in on validation)
    collective_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    threads_per_rank: Annotated[int, Field(ge=1)] = 1
    gpus_per_rank: Annotated[int, Field(ge=0, le=1)] = (
        0  # 0: CPU ranks over gloo; 1: one GPU per rank, NCCL (Ray places them)
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_max_world_size(cls, data: Any) -> Any:
        # A frozen model cannot fill it in after validation, so it is filled in before.
        if isinstance(data, dict) and type(data.get("max_world_size", 0)) is int:  # not a bool
            ws = data.get("world_size", 2)
            if data.get("max_world_size", 0) == 0 and type(ws) is int:
                return {**data, "max_world_size": ws}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not 1 <= self.min_world_size <= self.world_size:
            raise FieldError(
                "min_world_size", self.min_world_size, f"must be in [1, world_size={self.world_size}]"
            )
        if self.max_world_size < self.world_size:
            raise FieldError(
                "max_world_size", self.max_world_size, f"must be >= world_size={self.world_size}"
            )
        return self


class RolloutConfig(Section):
    section = "rollout"

    backend: RolloutBackend = "torch"
    workers: Annotated[int, Field(ge=1)] = 1
    threads_per_worker: Annotated[int, Field(ge=1)] = 1
    allow_stale_weights: bool = False  # True: generate on old weights with a warning event instead of failing


class SupervisorConfig(Section):
    section = "supervisor"

    max_restarts: Annotated[int, Field(ge=0)] = 20  # restarts of the run in total before it is FAILED
    no_progress_restarts: Annotated[int, Field(ge=0)] = (
        3  # consecutive restarts without a new step before it is FAILED
    )
    backoff_initial_s: Annotated[float, Field(gt=0)] = 0.5
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    startup_grace_s: Annotated[float, Field(gt=0)] = 180.0  # attempt start -> first step: Ray, actors, resume
    heartbeat_timeout_trainer_s: Annotated[float, Field(gt=0)] = 20.0
    heartbeat_timeout_rollout_s: Annotated[float, Field(gt=0)] = 30.0
    heartbeat_timeout_driver_s: Annotated[float, Field(gt=0)] = 30.0
    progress_floor_s: Annotated[float, Field(gt=0)] = 60.0  # a step may take this long whatever its history
    progress_factor: Annotated[float, Field(gt=0)] = 8.0  # ... or this many times the recent median step time
    report_interval_s: Annotated[float, Field(gt=0)] = 1.0
    standby: bool = True  # keep a warm standby attempt (imports done, Ray up) to cut restart time
    api_host: str = "127.0.0.1"
    api_port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0: any free port (kept across daemon restarts)
    # Niceness of the telemetry threads -- the daemon's API (report ingest, OTLP receiver,
    # /metrics), its supervisor ticks and each rank's reporter thread: on a node whose CPUs
    # training saturates, telemetry yields to it instead of preempting a rank in the middle of a
    # collective (its peers then wait too). Attempts are still started at full priority. 0: off.
    telemetry_nice: Annotated[int, Field(ge=0, le=19)] = 19
    # Fault injection (the API's faults endpoint, `milepost inject`, [[faults]]) is opt-in per run:
    # for tests, benchmarks and demos; a production job leaves it off, so no one can kill its ranks.
    allow_faults: bool = False

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.backoff_max_s < self.backoff_initial_s:
            raise FieldError("backoff_max_s", self.backoff_max_s, "must be >= backoff_initial_s")
        return self


class DetectionConfig(Section):
    """Hang and straggler detection in the daemon (the ``[detection]`` section)."""

    section = "detection"

    enabled: bool = True
    hang_floor_s: Annotated[float, Field(gt=0)] = 4.0  # a collective may always take this long
    hang_factor: Annotated[float, Field(gt=0)] = 10.0  # ... or this many times its op's recent p99
    warmup_steps: Annotated[int, Field(ge=0)] = 2  # first steps of an attempt: compile, warm-up
    warmup_floor_s: Annotated[float, Field(gt=0)] = 30.0
    # collectives of checkpoint saves (group "checkpoint" or phase checkpoint)
    checkpoint_floor_s: Annotated[float, Field(gt=0)] = 120.0
    stale_heartbeat_s: Annotated[float, Field(gt=0)] = 4.0  # no report this long: the whole process is frozen
    action: Literal["restart", "report"] = (
        "restart"  # "restart": end the attempt and resume; "report": diagnose only
    )
    stacks: bool = True  # py-spy dump of every rank on a hang
    straggler_threshold: Annotated[float, Field(gt=1)] = 1.12  # compute time relative to the median rank
    straggler_window_steps: Annotated[int, Field(ge=1)] = 5
    straggler_windows: Annotated[int, Field(ge=1)] = (
        3  # consecutive windows over the threshold before a rank is flagged
    )


class FaultSpec(Section):
    """A fault injected at a chosen step, for tests and demos (``[[faults]]`` in the job file)."""

    section = "faults"

    kind: FaultKind = Field(strict=False)  # lax: the wire spelling ("skip-collective") names the member
    role: FaultRole = Role.TRAINER
    rank: Annotated[int, Field(ge=0)] = 0
    step: Annotated[int, Field(ge=0)] = (
        0  # fires at the first step boundary at or after this step (0: the next one)
    )
    attempts: Literal["first", "all"] = "first"  # "first": only in attempt 0; "all": in every attempt
    factor: Annotated[float, Field(ge=1)] = 1.5  # for kind "slow"
    # for kind "slow": how many steps it lasts (0: for the rest of the attempt)
    duration_steps: Annotated[int, Field(ge=0)] = 0


class RetentionConfig(Section):
    """What a run of weeks keeps (the ``[retention]`` section): rows, evidence files, logs, histories.

    Counts and goodput stay right past every bound: the store keeps totals of what it drops.
    """

    section = "retention"

    events: Annotated[int, Field(ge=100)] = 200_000  # newest event rows kept (plus milestones, below)
    # newest step rows kept (plus each attempt's first and last); more than a checkpoint interval
    steps: Annotated[int, Field(ge=100)] = 100_000
    # attempts whose milestone events (launched, ended, resumed, hang...) and report counters are kept
    attempts: Annotated[int, Field(ge=1)] = 100
    prune_interval_s: Annotated[float, Field(gt=0)] = 60.0  # how often the daemon applies the bounds
    diagnoses: Annotated[int, Field(ge=1)] = 50  # newest diagnostics/diagnosis_N directories kept
    flight_recorder_dumps: Annotated[int, Field(ge=1)] = 200  # newest diagnostics/fr_*.json kept
    log_max_mb: Annotated[float, Field(gt=0)] = 50.0  # daemon.log rotates at this size
    log_backups: Annotated[int, Field(ge=1)] = 3  # rotated daemon.log.N files kept (0 would never truncate)
    driver_results: Annotated[int, Field(ge=1)] = 1000  # step results an attempt's driver keeps in memory
    sglang_history: Annotated[int, Field(ge=1)] = 100  # state changes kept per SGLang server
