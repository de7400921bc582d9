"""Bounded growth of the store: which rows a run of weeks keeps, and the totals that outlive the rest.

Three tables grow with run length: ``events``, ``steps`` and ``reports_seen`` (one row per
rank and attempt). ``prune`` keeps, in one transaction:

- events: the newest ``events`` rows, and the milestone events (attempt launched, ended,
  resumed, a hang...) of the newest ``attempts`` attempts, which the incident timeline needs;
- steps: the newest ``steps`` rows, and the first and last step of every attempt;
- reports_seen: the rows of the newest ``attempts`` attempts; the reports the older ones
  lost are added to the total ``reports_lost_pruned``.

``Retainer`` applies them from the supervisor's tick, every ``prune_interval_s``, together
with the bounds on ``diagnostics/`` (the newest ``diagnoses`` diagnosis directories and the
newest ``flight_recorder_dumps`` flight-recorder dumps).

What counts and goodput need is kept apart, updated in the same transaction as each row
(``Store.add_event``, ``Store.add_step``): ``event_counts`` per kind, ``totals`` (steps
recorded, their step and checkpoint-stall seconds, the newest step and its time) and
``attempt_spans`` (the start of each attempt's first step and the end of its last).
"""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from milepost.engine.contract.config.ops import RetentionConfig
from milepost.engine.contract.events import EventKind
from milepost.engine.contract.layout import RunDir, diagnosis_dir_name, flight_recorder_prefix

log = logging.getLogger(__name__)

# A schema step of ``store.MIGRATIONS``: the totals tables, filled from the rows already there.
MIGRATION: tuple[str, ...] = (
    "CREATE TABLE IF NOT EXISTS event_counts (kind TEXT PRIMARY KEY, n INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS totals (name TEXT PRIMARY KEY, value REAL NOT NULL)",
    """CREATE TABLE IF NOT EXISTS attempt_spans (
    attempt INTEGER PRIMARY KEY, first_start REAL NOT NULL, last_end REAL NOT NULL
)""",
    "INSERT OR REPLACE INTO event_counts SELECT kind, COUNT(*) FROM events GROUP BY kind",
    """INSERT OR REPLACE INTO totals SELECT 'steps', COUNT(*) FROM steps
    UNION ALL SELECT 'step_s', COALESCE(SUM(json_extract(record, '$.step_s')), 0) FROM steps
    UNION ALL SELECT 'stall_s', COALESCE(SUM(json_extract(record, '$.phases.checkpoint')), 0) FROM steps
    UNION ALL SELECT 'max_step', COALESCE(MAX(step), 0) FROM steps
    UNION ALL SELECT 'last_ts', COALESCE((SELECT ts FROM steps ORDER BY step DESC LIMIT 1), 0)""",
    """INSERT OR REPLACE INTO attempt_spans
    SELECT COALESCE(attempt, 0), MIN(ts - COALESCE(json_extract(record, '$.step_s'), 0)), MAX(ts)
    FROM steps GROUP BY COALESCE(attempt, 0)""",
    "CREATE INDEX IF NOT EXISTS events_attempt ON events(attempt)",
    "CREATE INDEX IF NOT EXISTS steps_attempt ON steps(attempt)",
)

# Kept for the newest attempts whatever their age: the incident timeline is made of them.
MILESTONES: frozenset[str] = frozenset(
    {
        EventKind.ATTEMPT_LAUNCHED,
        EventKind.ATTEMPT_STARTED,
        EventKind.ATTEMPT_FINISHED,
        EventKind.ATTEMPT_FAILED,
        EventKind.ATTEMPT_ENDED,
        EventKind.ATTEMPT_KILLED,
        EventKind.ATTEMPT_LOST,
        EventKind.RESTART_SCHEDULED,
        EventKind.RESUME_VERIFIED,
        EventKind.RESUME_VERIFICATION_FAILED,
        EventKind.FAULT_INJECTED,
        EventKind.COLLECTIVE_HANG,
        EventKind.HEARTBEAT_LOST,
        EventKind.PROGRESS_STALLED,
        EventKind.RUN_SUCCEEDED,
        EventKind.RUN_FAILED,
        EventKind.RUN_STOPPED,
    }
)


@dataclass(frozen=True)
class Keep:
    """The bounds ``prune`` applies (``RetentionConfig`` of the job file gives them)."""

    events: int
    steps: int
    attempts: int

    def __post_init__(self) -> None:
        for name in ("events", "steps", "attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"retention.{name}={getattr(self, name)}: must be >= 1")


class Prunable(Protocol):
    def prune(self, keep: Keep) -> dict[str, int]: ...


class Retainer:
    """Applies ``cfg``'s bounds to the store and to ``diagnostics/`` at most every ``prune_interval_s``."""

    def __init__(
        self, store: Prunable, run_dir: Path, cfg: RetentionConfig, clock: Callable[[], float]
    ) -> None:
        self.store, self.run_dir, self.cfg, self.clock = store, run_dir, cfg, clock
        self.keep = Keep(events=cfg.events, steps=cfg.steps, attempts=cfg.attempts)
        self.last: float | None = None

    def maybe_prune(self) -> dict[str, int] | None:
        now = self.clock()
        if self.last is not None and now - self.last < self.cfg.prune_interval_s:
            return None
        self.last = now
        try:
            deleted = self.store.prune(self.keep)
            deleted.update(prune_diagnostics(RunDir(self.run_dir).diagnostics, self.cfg))
        except (sqlite3.Error, OSError):
            # A failed prune (disk full, a locked file) must not stop the tick's detection: next time.
            log.exception("retention: pruning failed")
            return None
        if any(deleted.values()):
            log.info("retention: deleted %s", ", ".join(f"{n} {k}" for k, n in deleted.items() if n))
        return deleted


_FR_GLOB = flight_recorder_prefix(0).replace("0", "*", 1) + "*.json"  # every attempt's dumps
_DIAGNOSIS = re.compile(re.escape(diagnosis_dir_name(0)).replace("0", r"(\d+)") + "$")


def prune_diagnostics(diagnostics: Path, cfg: RetentionConfig) -> dict[str, int]:
    """Keeps the newest ``cfg.diagnoses`` diagnosis dirs (by number) and ``cfg.flight_recorder_dumps`` dumps (by age)."""
    if not diagnostics.is_dir():
        return {"diagnosis_dirs": 0, "flight_recorder_dumps": 0}
    dirs = sorted(
        (int(m.group(1)), p) for p in diagnostics.iterdir() if (m := _DIAGNOSIS.match(p.name)) and p.is_dir()
    )
    for _, p in dirs[: max(0, len(dirs) - cfg.diagnoses)]:
        shutil.rmtree(p, ignore_errors=True)
    dumps = sorted(_aged(diagnostics.glob(_FR_GLOB)))
    for _, p in dumps[: max(0, len(dumps) - cfg.flight_recorder_dumps)]:
        p.unlink(missing_ok=True)
    return {
        "diagnosis_dirs": max(0, len(dirs) - cfg.diagnoses),
        "flight_recorder_dumps": max(0, len(dumps) - cfg.flight_recorder_dumps),
    }


def _aged(paths: Any) -> list[tuple[float, Path]]:
    out = []
    for p in paths:
        try:
            out.append((p.stat().st_mtime, p))
        except OSError:  # gone meanwhile: nothing to keep or delete
            continue
    return out


def prune(db: sqlite3.Connection, keep: Keep) -> dict[str, int]:
    """Deletes what ``keep`` does not hold; the caller owns the transaction. Returns rows deleted per table."""
    oldest_kept_attempt = _nth_newest(db, "SELECT number FROM attempts ORDER BY number DESC", keep.attempts)
    marks = ",".join("?" * len(MILESTONES))
    events = db.execute(
        f"DELETE FROM events WHERE id < ? AND NOT (kind IN ({marks}) AND COALESCE(attempt, 0) >= ?)",
        (
            _nth_newest(db, "SELECT id FROM events ORDER BY id DESC", keep.events),
            *sorted(MILESTONES),
            oldest_kept_attempt,
        ),
    ).rowcount
    steps = db.execute(
        "DELETE FROM steps WHERE step < ? AND step NOT IN"
        " (SELECT MIN(step) FROM steps GROUP BY attempt UNION SELECT MAX(step) FROM steps GROUP BY attempt)",
        (_nth_newest(db, "SELECT step FROM steps ORDER BY step DESC", keep.steps),),
    ).rowcount
    lost = db.execute(
        "SELECT COALESCE(SUM(MAX(seq - received, 0)), 0) FROM reports_seen WHERE attempt < ?",
        (oldest_kept_attempt,),
    ).fetchone()
    reports = db.execute("DELETE FROM reports_seen WHERE attempt < ?", (oldest_kept_attempt,)).rowcount
    if reports:
        add_total(db, "reports_lost_pruned", float(_first(lost)))
    return {"events": events, "steps": steps, "reports_seen": reports}


def add_total(db: sqlite3.Connection, name: str, delta: float) -> None:
    db.execute(
        "INSERT INTO totals (name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + ?",
        (name, delta, delta),
    )


def set_total(db: sqlite3.Connection, name: str, value: float) -> None:
    db.execute("INSERT OR REPLACE INTO totals (name, value) VALUES (?, ?)", (name, value))


def _nth_newest(db: sqlite3.Connection, sql: str, n: int) -> int:
    """The key of the ``n``-th newest row of ``sql`` (rows with a smaller key are beyond the bound); 0 if fewer."""
    row = db.execute(f"{sql} LIMIT 1 OFFSET ?", (n - 1,)).fetchone()
    return int(_first(row)) if row is not None else 0


def _first(row: object) -> Any:
    """The first column of a row, whatever the connection's row factory (tuple or dict)."""
    if isinstance(row, dict):
        return next(iter(row.values()))
    assert isinstance(row, tuple)
    return row[0]
