"""The daemon's single source of truth: one SQLite database (WAL) per run directory.

Holds the run, its attempts, events, per-step records, checkpoints, the latest report
of every rank and the ingest offsets of the files it tails. Metrics, the API and the
dashboard are derived from it. Safe to use from several threads of one process.
``transaction()`` groups writes (a tailed batch and its offset commit together or not at
all); ``prune`` bounds the tables that grow with run length (``daemon.retention``), and the
totals it keeps apart make counts and goodput survive it.

The schema is versioned by SQLite's ``user_version``: ``MIGRATIONS`` lists the ordered
steps, and opening a database runs the steps it lacks (each in its own transaction).
Databases written before versions (user_version 0, version 1's tables) count as version 1;
one newer than this code refuses to open (``SchemaTooNew``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from milepost.engine.contract.enums import TERMINAL_RUN_STATES, Role
from milepost.engine.contract.layout import RunDir

from . import retention

# Version 1: the schema before versions (those databases have user_version 0 and these tables).
_V1 = (
    """CREATE TABLE IF NOT EXISTS run (
    id TEXT PRIMARY KEY, name TEXT, job TEXT, run_dir TEXT, state TEXT, reason TEXT,
    created_at REAL, updated_at REAL, target_steps INTEGER
)""",
    """CREATE TABLE IF NOT EXISTS attempts (
    number INTEGER PRIMARY KEY, pid INTEGER, state TEXT, world_size INTEGER,
    started_at REAL, ended_at REAL, exit_code INTEGER, reason TEXT,
    start_step INTEGER, resumed_from INTEGER, verified INTEGER, last_step INTEGER
)""",
    """CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL, kind TEXT, severity TEXT, message TEXT,
    attempt INTEGER, role TEXT, rank INTEGER, step INTEGER, data TEXT
)""",
    """CREATE INDEX IF NOT EXISTS events_kind ON events(kind)""",
    """CREATE TABLE IF NOT EXISTS steps (
    step INTEGER PRIMARY KEY, attempt INTEGER, ts REAL, record TEXT
)""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
    step INTEGER PRIMARY KEY, path TEXT, status TEXT, reason TEXT, world_size INTEGER,
    state_checksum TEXT, committed_at REAL, attempt INTEGER
)""",
    """CREATE TABLE IF NOT EXISTS ranks (
    role TEXT, rank INTEGER, attempt INTEGER, data TEXT, received_at REAL,
    PRIMARY KEY (role, rank)
)""",
    """CREATE TABLE IF NOT EXISTS diagnoses (
    id INTEGER PRIMARY KEY AUTOINCREMENT, attempt INTEGER, kind TEXT, culprit_ranks TEXT, "group" TEXT,
    seq INTEGER, op TEXT, onset_at REAL, detected_at REAL, action TEXT, message TEXT, phases TEXT,
    evidence TEXT
)""",
    """CREATE TABLE IF NOT EXISTS offsets (name TEXT PRIMARY KEY, value INTEGER)""",
    """CREATE TABLE IF NOT EXISTS reports_seen (
    attempt INTEGER, role TEXT, rank INTEGER, seq INTEGER, received INTEGER,
    PRIMARY KEY (attempt, role, rank)
)""",
)

_TERMINAL = ", ".join(f"'{s}'" for s in sorted(TERMINAL_RUN_STATES))  # an ended run stays ended

# Version 2: named JSON documents a part of the daemon keeps across restarts (the alert state).
_V2 = ("""CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL)""",)

# Ordered steps: step n takes a database from version n - 1 to n. Append; never edit one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1, _V2, retention.MIGRATION)
SCHEMA_VERSION = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    """The database was written by a newer milepost than this one."""


def _user_version(db: sqlite3.Connection) -> int:
    cur = db.cursor()
    cur.row_factory = None  # plain tuples, whatever the connection's row factory
    return int(cur.execute("PRAGMA user_version").fetchone()[0])


def _found_version(db: sqlite3.Connection) -> int:
    version = _user_version(db)
    if (
        version == 0
        and db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'run'").fetchone()
    ):
        return 1  # written before schema versions: its tables are version 1's
    return version


def migrate(db: sqlite3.Connection, path: Path, migrations: tuple[tuple[str, ...], ...] = MIGRATIONS) -> int:
    """Brings ``db`` (autocommit mode) to ``len(migrations)``, one transaction per step; returns that version."""
    target = len(migrations)
    if _user_version(db) == target:
        return target
    while True:
        db.execute("BEGIN IMMEDIATE")  # one migrator at a time: another process may open the same file
        try:
            version = _found_version(db)
            if version > target:
                raise SchemaTooNew(
                    f"{path}: schema version {version} is newer than this milepost knows ({target}); "
                    "open it with the milepost that wrote it, or a newer one"
                )
            if version == target:
                db.execute(f"PRAGMA user_version = {version}")
                db.execute("COMMIT")
                return target
            for statement in migrations[version]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


def _row(cur: sqlite3.Cursor, row: tuple[Any, ...]) -> dict[str, Any]:
    return {d[0]: v for d, v in zip(cur.description, row, strict=True)}


class Store:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = RunDir(run_dir).db
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = _row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            migrate(self._db, self.path)
        except SchemaTooNew:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Every write inside commits together, or none does (nested: joins the outer one)."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    def _one(self, sql: str, args: tuple[Any, ...] = ()) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return dict(row) if row else None

    # -- run ------------------------------------------------------------------
    def ensure_run(
        self, *, run_id: str, name: str, job: str, run_dir: str, target_steps: int
    ) -> dict[str, Any]:
        """The run's row, made with ``run_id`` unless there is one: a run dir holds one run, whatever its id."""
        now = time.time()
        self._exec(
            "INSERT INTO run (id, name, job, run_dir, state, reason, created_at, updated_at, target_steps)"
            " SELECT ?, ?, ?, ?, 'STARTING', '', ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM run)",
            (run_id, name, job, run_dir, now, now, target_steps),
        )
        run = self.run()
        assert run is not None
        return run

    def run(self) -> dict[str, Any] | None:
        return self._one("SELECT * FROM run LIMIT 1")

    def set_run_state(self, state: str, reason: str = "", *, only_from: Iterable[str] | None = None) -> bool:
        """Moves the run to ``state`` if it is in ``only_from`` (any state when None) and not ended.

        One conditional UPDATE, so a check and its write cannot be split by another thread: a stop
        never turns SUCCEEDED into STOPPING. Returns whether the run moved.
        """
        sql = f"UPDATE run SET state = ?, reason = ?, updated_at = ? WHERE state NOT IN ({_TERMINAL})"
        args: tuple[Any, ...] = (state, reason, time.time())
        if only_from is not None:
            allowed = tuple(only_from)
            sql += f" AND state IN ({', '.join('?' * len(allowed))})"
            args += allowed
        return self._exec(sql, args).rowcount > 0

    # -- attempts -------------------------------------------------------------
    def add_attempt(self, number: int, *, pid: int, world_size: int) -> None:
        self._exec(
            "INSERT OR REPLACE INTO attempts (number, pid, state, world_size, started_at) VALUES (?, ?, 'RUNNING', ?, ?)",
            (number, pid, world_size, time.time()),
        )

    def update_attempt(self, number: int, **fields: Any) -> None:
        if not fields:
            return
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE attempts SET {cols} WHERE number = ?", (*fields.values(), number))

    def attempts(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM attempts ORDER BY number")

    def attempt(self, number: int) -> dict[str, Any] | None:
        return self._one("SELECT * FROM attempts WHERE number = ?", (number,))

    def last_attempt(self) -> dict[str, Any] | None:
        return self._one("SELECT * FROM attempts ORDER BY number DESC LIMIT 1")

    # -- events ---------------------------------------------------------------
    def add_event(self, ev: dict[str, Any]) -> int:
        with self.transaction():
            self._exec(
                "INSERT INTO event_counts (kind, n) VALUES (?, 1) ON CONFLICT(kind) DO UPDATE SET n = n + 1",
                (ev["kind"],),
            )
            return self._insert_event(ev)

    def _insert_event(self, ev: dict[str, Any]) -> int:
        cur = self._exec(
            "INSERT INTO events (ts, kind, severity, message, attempt, role, rank, step, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ev.get("ts", time.time()),
                ev["kind"],
                ev.get("severity", "info"),
                ev.get("message", ""),
                ev.get("attempt"),
                ev.get("role", Role.DAEMON),
                ev.get("rank"),
                ev.get("step"),
                json.dumps(ev.get("data") or {}, default=str),
            ),
        )
        return int(cur.lastrowid or 0)

    def events(
        self,
        *,
        since_id: int = 0,
        limit: int = 1000,
        kind: str | None = None,
        attempt: int | None = None,
        newest_first: bool = False,
    ) -> list[dict[str, Any]]:
        sql = "SELECT * FROM events WHERE id > ?"
        args: list[Any] = [since_id]
        if kind:
            sql, args = sql + " AND kind = ?", [*args, kind]
        if attempt is not None:
            sql, args = sql + " AND attempt = ?", [*args, attempt]
        order = "DESC" if newest_first else "ASC"
        rows = self._all(sql + f" ORDER BY id {order} LIMIT ?", (*args, limit))
        for r in rows:
            r["data"] = json.loads(r["data"] or "{}")
        return rows

    def count_events(self, kind: str) -> int:
        """Events of ``kind`` ever stored, pruned ones included."""
        row = self._one("SELECT n FROM event_counts WHERE kind = ?", (kind,))
        return int(row["n"]) if row else 0

    # -- steps ----------------------------------------------------------------
    def add_step(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Stores ``record`` (replacing a redone step's) and updates the totals; returns the record it replaced."""
        ts = float(record.get("ts", time.time()))
        step_s, stall_s = _seconds(record)
        begin = ts - step_s
        with self.transaction():
            row = self._one("SELECT record FROM steps WHERE step = ?", (record["step"],))
            prev = json.loads(row["record"]) if row else None
            db = self._db
            if prev is None:
                retention.add_total(db, "steps", 1)
            else:
                prev_s, prev_stall = _seconds(prev)
                step_s, stall_s = step_s - prev_s, stall_s - prev_stall
            retention.add_total(db, "step_s", step_s)
            retention.add_total(db, "stall_s", stall_s)
            top = self._one("SELECT value FROM totals WHERE name = 'max_step'")
            if top is None or record["step"] >= top["value"]:
                retention.set_total(db, "max_step", record["step"])
                retention.set_total(db, "last_ts", ts)
            self._exec(
                "INSERT INTO attempt_spans VALUES (?, ?, ?) ON CONFLICT(attempt) DO UPDATE SET"
                " first_start = MIN(first_start, excluded.first_start), last_end = MAX(last_end, excluded.last_end)",
                (int(record.get("attempt") or 0), begin, ts),
            )
            self._exec(
                "INSERT OR REPLACE INTO steps (step, attempt, ts, record) VALUES (?, ?, ?, ?)",
                (record["step"], record.get("attempt"), ts, json.dumps(record)),
            )
        return prev

    def step_totals(self) -> dict[str, Any]:
        """Steps ever recorded and their seconds, the newest step and its time, each attempt's span."""
        totals = {r["name"]: r["value"] for r in self._all("SELECT name, value FROM totals")}
        spans = self._all("SELECT attempt, first_start, last_end FROM attempt_spans")
        return {
            "steps": int(totals.get("steps", 0)),
            "step_s": float(totals.get("step_s", 0.0)),
            "stall_s": float(totals.get("stall_s", 0.0)),
            "max_step": int(totals.get("max_step", 0)),
            "last_ts": float(totals.get("last_ts", 0.0)),
            "spans": {int(r["attempt"]): (float(r["first_start"]), float(r["last_end"])) for r in spans},
        }

    def prune(self, keep: retention.Keep) -> dict[str, int]:
        """Applies the retention bounds (``daemon.retention``); returns the rows deleted per table."""
        with self.transaction():
            return retention.prune(self._db, keep)

    def steps(self, *, since: int = 0, limit: int = 10000) -> list[dict[str, Any]]:
        rows = self._all("SELECT record FROM steps WHERE step > ? ORDER BY step LIMIT ?", (since, limit))
        return [json.loads(r["record"]) for r in rows]

    def iter_steps(self, batch: int = 5000) -> Iterator[dict[str, Any]]:
        """Every step record in step order, read in batches (no limit: runs of millions of steps)."""
        since = 0
        while rows := self.steps(since=since, limit=batch):
            yield from rows
            since = rows[-1]["step"]

    def recent_steps(self, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` step records, oldest first (cheap on long runs: no full scan)."""
        rows = self._all("SELECT record FROM steps ORDER BY step DESC LIMIT ?", (n,))
        return [json.loads(r["record"]) for r in reversed(rows)]

    def last_step(self) -> dict[str, Any] | None:
        row = self._one("SELECT record FROM steps ORDER BY step DESC LIMIT 1")
        return json.loads(row["record"]) if row else None

    # -- checkpoints ----------------------------------------------------------
    def upsert_checkpoint(self, step: int, **fields: Any) -> None:
        self._exec("INSERT OR IGNORE INTO checkpoints (step) VALUES (?)", (step,))
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE checkpoints SET {cols} WHERE step = ?", (*fields.values(), step))

    def checkpoints(self, status: str | None = None) -> list[dict[str, Any]]:
        """Newest first; ``status``: only those (the committed ones are few, all rows grow with the run)."""
        if status is not None:
            return self._all("SELECT * FROM checkpoints WHERE status = ? ORDER BY step DESC", (status,))
        return self._all("SELECT * FROM checkpoints ORDER BY step DESC")

    # -- ranks ----------------------------------------------------------------
    def upsert_rank(self, role: str, rank: int, attempt: int, data: dict[str, Any]) -> None:
        self._exec(
            "INSERT OR REPLACE INTO ranks (role, rank, attempt, data, received_at) VALUES (?, ?, ?, ?, ?)",
            (role, rank, attempt, json.dumps(data, default=str), time.time()),
        )

    def touch_rank(self, role: str, rank: int, attempt: int) -> None:
        """A heartbeat without a usable report: the rank's row keeps its data, its receive time moves."""
        self._exec(
            "UPDATE ranks SET received_at = ? WHERE role = ? AND rank = ? AND attempt = ?",
            (time.time(), role, rank, attempt),
        )

    def ranks(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM ranks ORDER BY role, rank")
        for r in rows:
            r["data"] = json.loads(r["data"])
        return rows

    def clear_ranks(self) -> None:
        self._exec("DELETE FROM ranks")

    def seen_seq(self, attempt: int, role: str, rank: int) -> tuple[int, int]:
        """(highest report seq, reports received) of one rank in one attempt."""
        row = self._one(
            "SELECT seq, received FROM reports_seen WHERE attempt = ? AND role = ? AND rank = ?",
            (attempt, role, rank),
        )
        return (int(row["seq"]), int(row["received"])) if row else (0, 0)

    def set_seen_seq(self, attempt: int, role: str, rank: int, seq: int, received: int) -> None:
        self._exec(
            "INSERT OR REPLACE INTO reports_seen VALUES (?, ?, ?, ?, ?)", (attempt, role, rank, seq, received)
        )

    def report_gaps(self) -> list[dict[str, Any]]:
        """Per rank and attempt: reports sent (highest seq) versus received; a gap is a lost report.

        Attempts pruned by retention are one row, attempt -1 (role "pruned"), holding their lost total.
        """
        rows = self._all(
            "SELECT attempt, role, rank, seq, received, seq - received AS lost FROM reports_seen"
        )
        pruned = self._one("SELECT value FROM totals WHERE name = 'reports_lost_pruned'")
        if pruned is not None and pruned["value"] > 0:
            lost = int(pruned["value"])
            rows.append(
                {"attempt": -1, "role": "pruned", "rank": -1, "seq": lost, "received": 0, "lost": lost}
            )
        return rows

    # -- diagnoses ------------------------------------------------------------
    def add_diagnosis(self, d: dict[str, Any]) -> int:
        cur = self._exec(
            'INSERT INTO diagnoses (attempt, kind, culprit_ranks, "group", seq, op, onset_at, detected_at, action,'
            " message, phases, evidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                d.get("attempt"),
                d["kind"],
                json.dumps(d.get("culprit_ranks", [])),
                d.get("group", ""),
                d.get("seq", 0),
                d.get("op", ""),
                d.get("onset_at"),
                d.get("detected_at"),
                d.get("action", ""),
                d.get("message", ""),
                json.dumps(d.get("phases", {})),
                json.dumps(d.get("evidence", {})),
            ),
        )
        return int(cur.lastrowid or 0)

    def update_diagnosis(self, diag_id: int, **fields: Any) -> None:
        for k in ("evidence", "phases", "culprit_ranks"):
            if k in fields:
                fields[k] = json.dumps(fields[k])
        cols = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE diagnoses SET {cols} WHERE id = ?", (*fields.values(), diag_id))

    def diagnoses(self, *, limit: int = 200) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM diagnoses ORDER BY id DESC LIMIT ?", (limit,))
        for r in rows:
            for k in ("culprit_ranks", "phases", "evidence"):
                r[k] = json.loads(r[k] or "null")
        return rows

    # -- state documents --------------------------------------------------------
    def get_state(self, name: str) -> dict[str, Any] | None:
        """The JSON document ``name`` last saved with ``put_state``, or None."""
        row = self._one("SELECT value FROM state WHERE name = ?", (name,))
        return dict(json.loads(row["value"])) if row else None

    def put_state(self, name: str, value: str) -> None:
        """Saves ``value`` (JSON text) as document ``name``, replacing the previous one."""
        self._exec(
            "INSERT OR REPLACE INTO state (name, value, updated_at) VALUES (?, ?, ?)",
            (name, value, time.time()),
        )

    # -- offsets of tailed files ----------------------------------------------
    def offset(self, name: str) -> int:
        row = self._one("SELECT value FROM offsets WHERE name = ?", (name,))
        return int(row["value"]) if row else 0

    def set_offset(self, name: str, value: int) -> None:
        self._exec("INSERT OR REPLACE INTO offsets (name, value) VALUES (?, ?)", (name, value))


def _seconds(record: dict[str, Any]) -> tuple[float, float]:
    """(step seconds, checkpoint-stall seconds) of a step record."""
    return float(record.get("step_s", 0.0)), float((record.get("phases") or {}).get("checkpoint", 0.0))
