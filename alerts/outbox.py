"""The persisted outbox and the dispatcher that drains it.

Delivery is at-least-once. A notification is written (SQLite, synchronous=FULL) before
anything is sent, under a unique idempotency key, so a re-enqueue after a crash is a
no-op. Each receiver has its own FIFO: only its oldest pending row is ever tried, so a
receiver that is down for minutes gets every alert and every resolve, in order, once it
is back. A retryable answer backs the row off exponentially (capped); a permanent one
marks it failed and lets the next one go; a row older than `max_age_s` is dropped as
expired. Reopening the file after a crash finds the pending rows and delivers them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milepost.alerts.model import Notification
from milepost.alerts.receivers import Outcome, Receiver

log = logging.getLogger("milepost.alerts")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    receiver TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    reason TEXT NOT NULL DEFAULT '',
    done_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (receiver, state, id);
"""


@dataclass(frozen=True)
class Row:
    id: int
    key: str
    receiver: str
    notification: Notification
    created_at: float
    next_at: float
    attempts: int
    state: str
    reason: str


class Outbox:
    """Notifications waiting for their receivers, in one SQLite file the daemon names."""

    def __init__(self, path: str | Path, timeout_s: float = 10.0) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        # One connection shared by the bus thread (enqueue) and the dispatcher, under a lock.
        self._db = sqlite3.connect(
            self.path, timeout=timeout_s, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def enqueue(self, n: Notification) -> bool:
        """Store one notification; False when its key is already there (a replay after a crash)."""
        with self._lock:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO outbox (key, receiver, body, created_at, next_at) VALUES (?, ?, ?, ?, ?)",
                (n.key, n.receiver, n.model_dump_json(), n.created_at, n.created_at),
            )
            return cur.rowcount == 1

    def _row(self, r: tuple[Any, ...]) -> Row:
        return Row(r[0], r[1], r[2], Notification.model_validate_json(r[3]), r[4], r[5], r[6], r[7], r[8])

    _COLS = "id, key, receiver, body, created_at, next_at, attempts, state, reason"

    def heads(self) -> list[Row]:
        """The oldest pending row of every receiver (due or not)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._COLS} FROM outbox WHERE id IN "
                "(SELECT MIN(id) FROM outbox WHERE state = 'pending' GROUP BY receiver) ORDER BY id"
            ).fetchall()
        return [self._row(r) for r in rows]

    def rows(self, receiver: str | None = None, state: str | None = None, limit: int = 1000) -> list[Row]:
        sql, args = f"SELECT {self._COLS} FROM outbox WHERE 1=1", list[Any]()
        if receiver is not None:
            sql, args = sql + " AND receiver = ?", [*args, receiver]
        if state is not None:
            sql, args = sql + " AND state = ?", [*args, state]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [self._row(r) for r in rows]

    def pending(self) -> dict[str, int]:
        with self._lock:
            got = self._db.execute(
                "SELECT receiver, COUNT(*) FROM outbox WHERE state = 'pending' GROUP BY receiver"
            )
            return dict(got.fetchall())

    def _finish(self, row_id: int, state: str, reason: str, now: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET state = ?, reason = ?, done_at = ?, attempts = attempts + 1 WHERE id = ?",
                (state, reason, now, row_id),
            )

    def mark_sent(self, row_id: int, now: float, answer: str = "") -> None:
        self._finish(row_id, "sent", answer, now)

    def mark_failed(self, row_id: int, now: float, reason: str) -> None:
        self._finish(row_id, "failed", reason, now)

    def mark_expired(self, row_id: int, now: float, reason: str) -> None:
        self._finish(row_id, "expired", reason, now)

    def mark_retry(self, row_id: int, next_at: float, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET next_at = ?, reason = ?, attempts = attempts + 1 WHERE id = ?",
                (next_at, reason, row_id),
            )

    def purge(self, before: float) -> int:
        """Forget finished rows done before `before` (the history the API shows is bounded)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM outbox WHERE state != 'pending' AND done_at < ?", (before,))
            return cur.rowcount


def backoff_s(attempts: int, base_s: float, max_s: float) -> float:
    """base, 2 base, 4 base, ... capped at max_s (attempts counts the tries already made)."""
    return min(max_s, base_s * 2 ** min(attempts, 30))


class Dispatcher:
    """Drains the outbox: each receiver's oldest due row, one call at a time, each call bounded."""

    def __init__(
        self,
        outbox: Outbox,
        receivers: Mapping[str, Receiver],
        *,
        timeout_s: float = 10.0,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        max_age_s: float = 7 * 24 * 3600.0,
        poll_s: float = 1.0,
        max_sends: int = 100,
        clock: Callable[[], float] = time.time,
        on_outcome: Callable[[str, str], None] | None = None,
        timeouts: Mapping[str, float] | None = None,
    ) -> None:
        self.outbox, self.receivers, self.clock = outbox, dict(receivers), clock
        self.timeout_s, self.poll_s, self.max_sends = timeout_s, poll_s, max_sends
        self.backoff_base_s, self.backoff_max_s, self.max_age_s = backoff_base_s, backoff_max_s, max_age_s
        self.on_outcome = on_outcome
        self.timeouts = dict(timeouts or {})  # per receiver; timeout_s for the rest
        self.outcomes: dict[tuple[str, str], int] = {}  # (receiver, ok|retry|fail|expired) for the metrics
        self.held: set[str] = set()  # receivers that cannot send now (an unset secret): their rows wait
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def _count(self, receiver: str, outcome: str) -> None:
        self.outcomes[(receiver, outcome)] = self.outcomes.get((receiver, outcome), 0) + 1
        if self.on_outcome is not None:
            self.on_outcome(receiver, outcome)

    def _send(self, receiver: Receiver, row: Row) -> Outcome:
        try:
            return receiver.send(row.notification, self.timeouts.get(row.receiver, self.timeout_s))
        except Exception as e:  # a receiver that breaks its no-raise contract must not kill the thread
            return Outcome("retry", f"receiver raised {type(e).__name__}")

    def run_once(self, now: float | None = None) -> int:
        """Try every receiver's due head, draining a receiver while it accepts; returns calls made."""
        calls = 0
        for head in self.outbox.heads():
            row: Row | None = head if head.receiver not in self.held else None
            while row is not None and calls < self.max_sends:
                t = self.clock() if now is None else now
                if row.next_at > t:
                    break
                name = row.receiver
                if t - row.created_at > self.max_age_s:
                    self.outbox.mark_expired(
                        row.id, t, f"older than {self.max_age_s:.0f} s; last: {row.reason}"
                    )
                    self._count(name, "expired")
                else:
                    receiver = self.receivers.get(name)
                    if receiver is None:
                        self.outbox.mark_failed(row.id, t, f"no receiver named {name!r} is configured")
                        self._count(name, "fail")
                    else:
                        calls += 1
                        out = self._send(receiver, row)
                        self._count(name, out.status)
                        if out.status == "ok":
                            self.outbox.mark_sent(row.id, t, out.answer)
                        elif out.status == "fail":
                            self.outbox.mark_failed(row.id, t, out.reason)
                        else:
                            delay = backoff_s(row.attempts, self.backoff_base_s, self.backoff_max_s)
                            self.outbox.mark_retry(row.id, t + delay, out.reason)
                            break
                nxt = [r for r in self.outbox.heads() if r.receiver == name]
                row = nxt[0] if nxt else None
        return calls

    def wake(self) -> None:
        """Run now instead of at the next poll (the daemon calls it after an enqueue)."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except sqlite3.Error as e:  # a locked or busy file: the rows stay pending, try at the next poll
                log.warning("alerts outbox %s: %s; retrying in %.1f s", self.outbox.path, e, self.poll_s)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="milepost-alerts-dispatch", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the thread; False when a send still runs after timeout_s (it ends within its own timeout)."""
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        alive = self._thread.is_alive()
        self._thread = None if not alive else self._thread
        return not alive
