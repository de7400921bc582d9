"""The torch-free sections of a job file: what the daemon needs to supervise a job.

The daemon reads [run], [trainer], [rollout], [supervisor] and [[faults]] through this
module without importing torch; the engine validates the whole file (engine.config).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .configio import ConfigError, build

TRAIN_BACKENDS = ("fsdp2", "megatron")
ROLLOUT_BACKENDS = ("torch", "sglang")
FAULT_KINDS = (
    "kill",  # SIGKILL the rank's process
    "exit",  # the process exits with code 17
    "exception",  # raise in the step
    "hang",  # SIGSTOP the rank's process: frozen, heartbeat included
    "stall",  # the training thread sleeps in compute before its next collective (heartbeat goes on)
    "skip-collective",  # the rank skips its next all_reduce: a desync
    "slow",  # compute stretched by `factor` (slow:1.5 on the command line)
    "nan",  # the loss of the step becomes NaN
    "rollout-crash",  # a rollout worker's process dies (role rollout, SIGKILL)
    "corrupt-checkpoint",  # truncate a file of the newest committed checkpoint
)
FAULT_ROLES = ("driver", "trainer", "rollout")


@dataclass(kw_only=True)
class RunConfig:
    name: str = "milepost"
    seed: int = 0
    steps: int = 100
    run_dir: str = ""  # default: runs/<name>

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be >= 1")
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r}: must be non-empty and contain no '/'")


@dataclass(kw_only=True)
class TrainerConfig:
    backend: str = "fsdp2"
    world_size: int = 2
    min_world_size: int = 1  # elastic floor: with fewer free trainer slots the attempt cannot start
    max_world_size: int = 0  # elastic ceiling; 0 means world_size
    collective_timeout_s: float = 120.0
    threads_per_rank: int = 1
    gpus_per_rank: int = 0  # 0: CPU ranks over gloo; 1: one GPU per rank, NCCL (Ray places them)

    def __post_init__(self) -> None:
        if self.backend not in TRAIN_BACKENDS:
            raise ValueError(f"backend={self.backend!r}: must be one of {list(TRAIN_BACKENDS)}")
        if self.world_size < 1:
            raise ValueError(f"world_size={self.world_size}: must be >= 1")
        if self.max_world_size == 0:
            self.max_world_size = self.world_size
        if not 1 <= self.min_world_size <= self.world_size:
            raise ValueError(
                f"min_world_size={self.min_world_size}: must be in [1, world_size={self.world_size}]"
            )
        if self.max_world_size < self.world_size:
            raise ValueError(f"max_world_size={self.max_world_size}: must be >= world_size={self.world_size}")
        if self.collective_timeout_s <= 0:
            raise ValueError(f"collective_timeout_s={self.collective_timeout_s}: must be > 0")
        if self.threads_per_rank < 1:
            raise ValueError(f"threads_per_rank={self.threads_per_rank}: must be >= 1")
        if self.gpus_per_rank not in (0, 1):
            raise ValueError(f"gpus_per_rank={self.gpus_per_rank}: must be 0 or 1")


@dataclass(kw_only=True)
class RolloutConfig:
    backend: str = "torch"
    workers: int = 1
    threads_per_worker: int = 1
    allow_stale_weights: bool = False  # True: generate on old weights with a warning event instead of failing

    def __post_init__(self) -> None:
        if self.backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"backend={self.backend!r}: must be one of {list(ROLLOUT_BACKENDS)}")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers}: must be >= 1")
        if self.threads_per_worker < 1:
            raise ValueError(f"threads_per_worker={self.threads_per_worker}: must be >= 1")


@dataclass(kw_only=True)
class SupervisorConfig:
    max_restarts: int = 20  # restarts of the run in total before it is FAILED
    no_progress_restarts: int = 3  # consecutive restarts without a new step before it is FAILED
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 60.0
    startup_grace_s: float = 180.0  # attempt start -> first step: Ray, actors, resume
    heartbeat_timeout_trainer_s: float = 20.0
    heartbeat_timeout_rollout_s: float = 30.0
    heartbeat_timeout_driver_s: float = 30.0
    progress_floor_s: float = 60.0  # a step may take this long whatever its history
    progress_factor: float = 8.0  # ... or this many times the recent median step time
    report_interval_s: float = 1.0
    standby: bool = True  # keep a warm standby attempt (imports done, Ray up) to cut restart time
    api_host: str = "127.0.0.1"
    api_port: int = 0  # 0: any free port (kept across daemon restarts)
    # Niceness of the telemetry threads -- the daemon's API (report ingest, OTLP receiver,
    # /metrics), its supervisor ticks and each rank's reporter thread: on a node whose CPUs
    # training saturates, telemetry yields to it instead of preempting a rank in the middle of a
    # collective (its peers then wait too). Attempts are still started at full priority. 0: off.
    telemetry_nice: int = 19

    def __post_init__(self) -> None:
        for name in ("max_restarts", "no_progress_restarts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        for name in (
            "backoff_initial_s",
            "backoff_max_s",
            "startup_grace_s",
            "heartbeat_timeout_trainer_s",
            "heartbeat_timeout_rollout_s",
            "heartbeat_timeout_driver_s",
            "progress_floor_s",
            "progress_factor",
            "report_interval_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s={self.backoff_max_s}: must be >= backoff_initial_s")
        if not 0 <= self.telemetry_nice <= 19:
            raise ValueError(f"telemetry_nice={self.telemetry_nice}: must be in [0, 19]")
        if not 0 <= self.api_port <= 65535:
            raise ValueError(f"api_port={self.api_port}: must be in [0, 65535]")


@dataclass(kw_only=True)
class DetectionConfig:
    """Hang and straggler detection in the daemon (the ``[detection]`` section)."""

    enabled: bool = True
    hang_floor_s: float = 4.0  # a collective may always take this long
    hang_factor: float = 10.0  # ... or this many times its op's recent p99
    warmup_steps: int = 2  # first steps of an attempt: compile, warm-up
    warmup_floor_s: float = 30.0
    checkpoint_floor_s: float = (
        120.0  # collectives of checkpoint saves (group "checkpoint" or phase checkpoint)
    )
    stale_heartbeat_s: float = 4.0  # no report this long: the whole process is frozen
    action: str = "restart"  # "restart": end the attempt and resume; "report": diagnose only
    stacks: bool = True  # py-spy dump of every rank on a hang
    straggler_threshold: float = 1.12  # compute time relative to the median rank
    straggler_window_steps: int = 5
    straggler_windows: int = 3  # consecutive windows over the threshold before a rank is flagged

    def __post_init__(self) -> None:
        for name in (
            "hang_floor_s",
            "hang_factor",
            "warmup_floor_s",
            "checkpoint_floor_s",
            "stale_heartbeat_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.action not in ("restart", "report"):
            raise ValueError(f"action={self.action!r}: must be 'restart' or 'report'")
        if self.straggler_threshold <= 1.0:
            raise ValueError(f"straggler_threshold={self.straggler_threshold}: must be > 1")
        for name in ("warmup_steps", "straggler_window_steps", "straggler_windows"):
            if getattr(self, name) < (0 if name == "warmup_steps" else 1):
                raise ValueError(f"{name}={getattr(self, name)}: out of range")


@dataclass(kw_only=True)
class FaultSpec:
    """A fault injected at a chosen step, for tests and demos (``[[faults]]`` in the job file)."""

    kind: str
    role: str = "trainer"
    rank: int = 0
    step: int = 0  # fires at the first step boundary at or after this step (0: the next one)
    attempts: str = "first"  # "first": only in attempt 0; "all": in every attempt
    factor: float = 1.5  # for kind "slow"
    duration_steps: int = 0  # for kind "slow": how many steps it lasts (0: for the rest of the attempt)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"kind={self.kind!r}: must be one of {list(FAULT_KINDS)}")
        if self.role not in FAULT_ROLES:
            raise ValueError(f"role={self.role!r}: must be one of {list(FAULT_ROLES)}")
        if self.rank < 0:
            raise ValueError(f"rank={self.rank}: must be >= 0")
        if self.step < 0:
            raise ValueError(f"step={self.step}: must be >= 0")
        if self.attempts not in ("first", "all"):
            raise ValueError(f"attempts={self.attempts!r}: must be 'first' or 'all'")
        if self.duration_steps < 0:
            raise ValueError(f"duration_steps={self.duration_steps}: must be >= 0")
        if self.factor < 1.0:
            raise ValueError(f"factor={self.factor}: must be >= 1")


def build_faults(value: Any) -> list[FaultSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"faults={value!r}: must be an array of tables ([[faults]])")
    return [build(FaultSpec, item, f"faults[{i}]") for i, item in enumerate(value)]


@dataclass(kw_only=True)
class OpsView:
    """What the daemon reads of a job file."""

    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)


def load_ops_view(path: str | Path) -> OpsView:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: {e}") from e
    return OpsView(
        run=build(RunConfig, doc.get("run"), "run"),
        trainer=build(TrainerConfig, doc.get("trainer"), "trainer"),
        rollout=build(RolloutConfig, doc.get("rollout"), "rollout"),
        supervisor=build(SupervisorConfig, doc.get("supervisor"), "supervisor"),
        detection=build(DetectionConfig, doc.get("detection"), "detection"),
    )
