"""Names that cross the process boundary, as ``StrEnum``s: the value is the wire spelling."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """Who a report, an event or a fault belongs to."""

    DRIVER = "driver"
    TRAINER = "trainer"
    ROLLOUT = "rollout"
    DAEMON = "daemon"


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


class RunState(StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    RECOVERING = "RECOVERING"
    PAUSED = "PAUSED"
    STOPPING = "STOPPING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_RUN_STATES


TERMINAL_RUN_STATES = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.STOPPED})


class AttemptState(StrEnum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"
    LOST = "LOST"  # it ended while no daemon watched


class FaultKind(StrEnum):
    """Faults ``milepost inject`` and ``[[faults]]`` can fire (tests, demos, benchmarks)."""

    KILL = "kill"  # SIGKILL the rank's process
    EXIT = "exit"  # the process exits with code 17
    EXCEPTION = "exception"  # raise in the step
    HANG = "hang"  # SIGSTOP the rank's process: frozen, heartbeat included
    STALL = "stall"  # the training thread sleeps in compute before its next collective (heartbeat goes on)
    SKIP_COLLECTIVE = "skip-collective"  # the rank skips its next all_reduce: a desync
    SLOW = "slow"  # compute stretched by `factor` (slow:1.5 on the command line)
    NAN = "nan"  # the loss of the step becomes NaN
    ROLLOUT_CRASH = "rollout-crash"  # a rollout worker's process dies (role rollout, SIGKILL)
    CORRUPT_CHECKPOINT = "corrupt-checkpoint"  # truncate a file of the newest committed checkpoint


# The roles that run in an attempt and report (the daemon emits events, never reports).
RANK_ROLES = (Role.DRIVER, Role.TRAINER, Role.ROLLOUT)


class RankStatus(StrEnum):
    """A report's ``state``: the reporter says ``exited`` once, when its process shuts down."""

    RUNNING = "running"
    EXITED = "exited"


class ControlAction(StrEnum):
    """What ``POST /api/v1/control/{action}`` asks; the driver reads it from its ingest responses."""

    PAUSE = "pause"
    RESUME = "resume"
    STOP = "stop"
    CHECKPOINT = "checkpoint"
