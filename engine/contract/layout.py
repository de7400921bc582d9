"""The run directory's layout: every file and folder name the ranks and the daemon share.

    <run_dir>/
      events.jsonl            events of every process (engine.events: one O_APPEND write per line)
      steps.jsonl             one StepRecord per line, written by the engine driver
      daemon.json             the live daemon's url, port, pid (tools find the API through it)
      daemon.lock             held (flock) by the one daemon of this run dir for its lifetime
      token                   the API's bearer token (0600), unless $MILEPOST_TOKEN is set
      milepost.db             the daemon's SQLite store (WAL)
      alerts_outbox.db        alert notifications waiting for (or sent to) their receivers
      daemon.log, daemon.out  the daemon's log; its stdout/stderr when detached
      dashboard.log           the dashboard's output when the daemon started it (run --dashboard)
      attempts/attempt_N.log  attempt N's stdout/stderr
      attempts/attempt_N.proc.json  attempt N's process record (identity.ProcessRecord), written
                              before its spawn (intent) and completed with its pid and start time
      attempts/standby_N/     a warm standby for attempt N: it writes ``ready``, waits for ``go``
      diagnostics/            flight-recorder dumps fr_attempt{N}_{role}{rank}_{group}_{seq}.json
      diagnostics/diagnosis_N/  evidence of diagnosis N: stack_{role}{rank}.txt per rank; the
                              daemon's stacks_request.json, answered by the attempt's per-node
                              stack helpers (engine.stack_helper) with stacks_done.json
      diagnostics/stack_helpers_N.json  attempt N's driver serves stack requests (per-node helpers up)
      checkpoints/            the default checkpoint root (checkpoint.dir overrides it)

Use :class:`RunDir` for paths; the bare names are here for code that needs only a name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
STEPS_FILE = "steps.jsonl"
DAEMON_FILE = "daemon.json"
TOKEN_FILE = "token"
DB_FILE = "milepost.db"
ALERTS_OUTBOX_FILE = "alerts_outbox.db"  # notifications waiting for their receivers
DAEMON_LOCK = "daemon.lock"
DAEMON_LOG = "daemon.log"
DAEMON_OUT = "daemon.out"
DASHBOARD_LOG = "dashboard.log"
ATTEMPTS_DIR = "attempts"
DIAGNOSTICS_DIR = "diagnostics"
CHECKPOINTS_DIR = "checkpoints"
STACKS_REQUEST = "stacks_request.json"
STACKS_DONE = "stacks_done.json"
STANDBY_READY = "ready"
STANDBY_GO = "go"


def attempt_log_name(attempt: int) -> str:
    return f"attempt_{attempt}.log"


def attempt_record_name(attempt: int) -> str:
    return f"attempt_{attempt}.proc.json"


def standby_dir_name(attempt: int) -> str:
    return f"standby_{attempt}"


def diagnosis_dir_name(diagnosis_id: int) -> str:
    return f"diagnosis_{diagnosis_id}"


def stack_file_name(role: str, rank: int) -> str:
    """A rank's py-spy stacks inside a diagnosis folder."""
    return f"stack_{role}{rank}.txt"


def stack_helpers_name(attempt: int) -> str:
    """Written by attempt ``attempt``'s driver once its per-node stack helpers answer requests."""
    return f"stack_helpers_{attempt}.json"


def flight_recorder_prefix(attempt: int) -> str:
    """The name prefix of every flight-recorder dump of ``attempt`` (for a glob)."""
    return f"fr_attempt{attempt}_"


def flight_recorder_name(attempt: int, role: str, rank: int, group: str, seq: int) -> str:
    return f"{flight_recorder_prefix(attempt)}{role}{rank}_{group}_{seq}.json"


class _Under:
    """A read-only attribute: the path of a fixed name under the object's ``path``."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: Any = None) -> Path:
        return Path(obj.path) / self.name


class StandbyDir:
    """A warm standby's hand-shake folder: the standby writes ``ready`` (its pid), the daemon touches ``go``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    ready = _Under(STANDBY_READY)
    go = _Under(STANDBY_GO)


class RunDir:
    """Paths inside one run directory; nothing is created until a caller writes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    events = _Under(EVENTS_FILE)
    steps = _Under(STEPS_FILE)
    daemon_file = _Under(DAEMON_FILE)
    token = _Under(TOKEN_FILE)
    db = _Under(DB_FILE)
    alerts_outbox = _Under(ALERTS_OUTBOX_FILE)
    daemon_lock = _Under(DAEMON_LOCK)
    daemon_log = _Under(DAEMON_LOG)
    daemon_out = _Under(DAEMON_OUT)
    dashboard_log = _Under(DASHBOARD_LOG)
    attempts = _Under(ATTEMPTS_DIR)
    diagnostics = _Under(DIAGNOSTICS_DIR)
    checkpoints = _Under(CHECKPOINTS_DIR)

    def run_id(self) -> str:
        """The run's id: the folder's name and a digest of its real path, the same in every process."""
        real = os.path.realpath(self.path)
        # sha256, not hash(): str hashes are salted per process, and the id must survive restarts.
        return f"{Path(real).name}-{hashlib.sha256(real.encode()).hexdigest()[:8]}"

    def attempt_log(self, attempt: int) -> Path:
        return self.attempts / attempt_log_name(attempt)

    def attempt_record(self, attempt: int) -> Path:
        return self.attempts / attempt_record_name(attempt)

    def attempt_records(self) -> dict[int, Path]:
        """Every attempt's process record, by attempt number."""
        found = {}
        for p in self.attempts.glob(attempt_record_name(0).replace("0", "*", 1)):
            num = p.name.split("_", 1)[1].split(".", 1)[0]
            if num.isdigit():
                found[int(num)] = p
        return found

    def standby(self, attempt: int) -> StandbyDir:
        return StandbyDir(self.attempts / standby_dir_name(attempt))

    def diagnosis(self, diagnosis_id: int) -> Path:
        return self.diagnostics / diagnosis_dir_name(diagnosis_id)

    def stack_helpers(self, attempt: int) -> Path:
        return self.diagnostics / stack_helpers_name(attempt)

    def flight_recorder_dump(self, attempt: int, role: str, rank: int, group: str, seq: int) -> Path:
        return self.diagnostics / flight_recorder_name(attempt, role, rank, group, seq)

    def flight_recorder_dumps(self, attempt: int) -> list[Path]:
        """Every flight-recorder dump of ``attempt``, sorted by name."""
        return sorted(self.diagnostics.glob(flight_recorder_prefix(attempt) + "*.json"))
