"""Process identity: a pid that names one process only, across pid reuse and reboots.

The kernel reuses pids, and a host that rebooted hands them out again from the start: a
recorded pid alone may name any process later (killing its group would kill a stranger's).
``ProcessIdentity`` adds the process's start time (clock ticks since boot, field 22 of
``/proc/PID/stat``: exact, no float rounding) and the boot id (``/proc/sys/kernel/random/boot_id``),
so that a recorded identity matches its own process and nothing else. ``ProcessRecord`` adds
what the process was started for (run dir, attempt, kind), written to a file when it was
started; re-attach and kill decisions act only on an exact match.

Stdlib only: the daemon, the engine and the SGLang server launcher all use it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """This host's boot id ("" where the kernel does not expose one)."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from its state on (field 3), or None when there is no such process."""
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and parentheses.
    return stat[stat.rfind(")") + 2 :].split()


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_ticks: int  # clock ticks after boot when the process started
    boot_id: str  # a start time is only comparable within one boot

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of a live (non-zombie) process, None when there is none under ``pid``."""
        fields = _stat_fields(pid)
        if not fields or fields[0] in ("Z", "X", "x"):
            return None
        return cls(pid, int(fields[19]), boot_id())  # field 22 of the stat line

    def is_running(self) -> bool:
        """True while the very process this identity names lives (not a reuse of its pid)."""
        return ProcessIdentity.of(self.pid) == self


@dataclass(frozen=True)
class ProcessRecord:
    """A process as its starter recorded it: identity, and what it was started for."""

    kind: str  # "attempt", "standby" (an attempt started ahead), "sglang"
    run_dir: str  # resolved
    attempt: int
    pid: int = 0  # 0: recorded before the spawn (intent), no process yet
    start_ticks: int = 0
    boot_id: str = ""

    @property
    def identity(self) -> ProcessIdentity | None:
        return ProcessIdentity(self.pid, self.start_ticks, self.boot_id) if self.pid > 0 else None

    def with_process(self, pid: int) -> ProcessRecord:
        """This record completed with the live process ``pid`` (its start time and boot id read now)."""
        ident = ProcessIdentity.of(pid)
        return ProcessRecord(
            self.kind,
            self.run_dir,
            self.attempt,
            pid,
            ident.start_ticks if ident else 0,
            ident.boot_id if ident else boot_id(),
        )

    def is_running(self) -> bool:
        """True while the recorded process itself lives."""
        ident = self.identity
        return ident is not None and ident.is_running()

    def names(self, pid: int, *, run_dir: str | os.PathLike[str], attempt: int) -> bool:
        """True when this record is of ``pid`` for this run dir and attempt, and that process lives."""
        return (
            self.pid == pid
            and self.attempt == attempt
            and self.run_dir == str(Path(run_dir).resolve())
            and self.is_running()
        )

    def write(self, path: Path) -> None:
        """Atomically (a reader sees the old record or the new one, never half of one)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(asdict(self)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def read(cls, path: Path) -> ProcessRecord | None:
        """The record in ``path``; None when it is missing or unreadable."""
        try:
            doc: dict[str, Any] = json.loads(path.read_text())
            return cls(
                kind=str(doc["kind"]),
                run_dir=str(doc["run_dir"]),
                attempt=int(doc["attempt"]),
                pid=int(doc.get("pid", 0)),
                start_ticks=int(doc.get("start_ticks", 0)),
                boot_id=str(doc.get("boot_id", "")),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
