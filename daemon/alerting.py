"""Alerting in the daemon: the alert manager on the event bus, ticked, persisted, delivering.

``DaemonAlerting`` subscribes to the bus (events, step records, rank reports) and ticks on a
thread of its own, at once after an event, else every ``tick_s``: every ``disk_check_s`` it
reads the run dir's free space, then it evaluates the rules, enqueues what is due into the outbox (``<run_dir>/alerts_outbox.db``), saves the
alert state and silences in the store (document ``alerts``) when they changed, and sets
``milepost_alerts``. The outbox's dispatcher delivers on another thread, counting
``milepost_notifications_total``. A restarted daemon restores the state before the supervisor
publishes anything, so firing alerts and silences survive it, and the supervisor's own
``daemon_reattached`` (or a second ``daemon_started``) raises DaemonRestarted.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from milepost.alerts import AlertManager, Silence, open_delivery, send_test
from milepost.alerts.catalog import ALERTNAMES
from milepost.engine.contract.config.alerts import AlertsConfig
from milepost.engine.contract.layout import RunDir

from .metrics import RunMetrics
from .store import Store

log = logging.getLogger(__name__)
STATE_DOC = "alerts"
HISTORY_ROWS = 200  # the newest outbox rows the API shows
SAVE_EVERY_S = 2.0


class DaemonAlerting:
    """One run's alerting; every method is safe from the bus, the API and its own thread."""

    def __init__(
        self,
        cfg: AlertsConfig,
        run_dir: Path,
        store: Store,
        metrics: RunMetrics,
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        tick_s: float = 0.5,
    ) -> None:
        self.cfg, self.run_dir, self.store, self.metrics = cfg, run_dir, store, metrics
        self.env, self.clock, self.tick_s = env, clock, tick_s
        self.outbox, self.dispatcher, self.held = open_delivery(
            cfg, RunDir(run_dir).alerts_outbox, env, clock, on_outcome=metrics.on_notification
        )
        for name, why in self.held.items():
            log.warning("alerts receiver %s cannot send (its notifications wait): %s", name, why)
        metrics.set_alerts({}, ALERTNAMES)
        self._am: AlertManager | None = None
        self._lock = threading.Lock()
        self._saved, self._saved_at = "", float("-inf")
        self._disk_at = float("-inf")
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    # -- the manager, made once the run has an id -------------------------------
    def manager(self) -> AlertManager | None:
        with self._lock:
            if self._am is None:
                run = self.store.run()
                if run is None:
                    return None  # the supervisor has not recorded the run yet
                saved = self.store.get_state(STATE_DOC)
                try:
                    self._am = AlertManager(
                        self.cfg, str(run["id"]), self.outbox, state=saved, on_enqueue=self.dispatcher.wake
                    )
                except ValueError as e:  # a state this code cannot read: start afresh, say so
                    log.error("alerts: saved state not restored (%s); starting with none", e)
                    self._am = AlertManager(
                        self.cfg, str(run["id"]), self.outbox, on_enqueue=self.dispatcher.wake
                    )
            return self._am

    # -- bus subscriber ----------------------------------------------------------
    def on_event(self, ev: dict[str, Any], restart_reason: str = "") -> None:
        if (am := self.manager()) is not None:
            # The supervisor's own events carry no ts: they happen now.
            am.on_event(ev if ev.get("ts") else {**ev, "ts": self.clock()})
            self._wake.set()  # a diagnosis pages now, not at the next tick

    def on_step(self, rec: dict[str, Any]) -> None:
        if (am := self.manager()) is not None:
            am.on_step(rec)

    def on_report(self, rep: dict[str, Any]) -> None:
        if (am := self.manager()) is not None:
            am.on_report(rep)

    # -- ticking -------------------------------------------------------------------
    def tick(self) -> int:
        """One evaluation; returns the notifications enqueued."""
        am = self.manager()
        if am is None:
            return 0
        now = self.clock()
        if now - self._disk_at >= self.cfg.disk_check_s:
            self._disk_at = now
            try:
                usage = shutil.disk_usage(self.run_dir)
                am.on_disk(str(self.run_dir), usage.free, usage.total)
            except OSError as e:
                log.warning("alerts: cannot read free space of %s: %s", self.run_dir, e)
        due = am.tick(now)
        # Reports change the state every second: save at most every SAVE_EVERY_S, unless something was sent.
        if due or now - self._saved_at >= SAVE_EVERY_S:
            self.save()
        self.metrics.set_alerts(am.counts(), ALERTNAMES)
        return len(due)

    def save(self) -> None:
        """Saves the state when it changed since the last save (after the enqueue: replays are no-ops)."""
        if (am := self.manager()) is None:
            return
        text = json.dumps(am.state_dict(), sort_keys=True)
        if text != self._saved:
            self.store.put_state(STATE_DOC, text)
            self._saved = text
        self._saved_at = self.clock()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception:  # alerting's own bug must not end alerting: log, tick again
                log.exception("alerts tick failed")

    def start(self) -> DaemonAlerting:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="milepost-alerts", daemon=True)
            self._thread.start()
        return self

    def close(self, drain_s: float = 3.0) -> None:
        """Stops ticking, saves, lets the dispatcher drain for up to ``drain_s``; what is left waits in the outbox."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.tick()  # the run's last events (its end) resolve what they resolve
        except Exception:
            log.exception("alerts: the last tick failed")
        deadline = self.clock() + drain_s
        while (
            any(n for r, n in self.outbox.pending().items() if r not in self.held) and self.clock() < deadline
        ):
            self.dispatcher.wake()
            time.sleep(0.1)
        if not self.dispatcher.stop(timeout_s=5.0):
            log.warning("alerts: a send was still running at shutdown; its row stays pending")
        self.outbox.close()

    # -- what the API calls ----------------------------------------------------------
    def alerts(self) -> list[dict[str, object]]:
        am = self.manager()
        return am.alerts(self.clock()) if am is not None else []

    def delivery(self) -> dict[str, Any]:
        """Per receiver: pending rows and why it cannot send; the newest outbox rows, newest first."""
        rows = self.outbox.rows(limit=100000)[-HISTORY_ROWS:]
        history = [
            {
                "key": r.key,
                "receiver": r.receiver,
                "status": str(r.notification.status),
                "alerts": [a.alertname for a in r.notification.alerts],
                "state": r.state,
                "attempts": r.attempts,
                "reason": r.reason,
                "created_at": r.created_at,
            }
            for r in reversed(rows)
        ]
        return {"pending": self.outbox.pending(), "held": dict(self.held), "history": history}

    def silences(self) -> list[Silence]:
        am = self.manager()
        return am.silences() if am is not None else []

    def add_silence(
        self, matchers: list[str], starts_at: float, ends_at: float, created_by: str, comment: str
    ) -> Silence:
        am = self.manager()
        if am is None:
            raise RuntimeError("the run is not recorded yet; try again in a second")
        sil = am.add_silence(matchers, starts_at, ends_at, created_by, comment)
        self.save()  # a silence the API acknowledged survives a crash right after
        return sil

    def expire_silence(self, silence_id: str) -> bool:
        am = self.manager()
        done = am is not None and am.expire_silence(silence_id, self.clock())
        if done:
            self.save()
        return done

    def send_test(self, receiver: str) -> dict[str, str]:
        """A test alert straight to one receiver (no outbox); what it answered, secrets scrubbed."""
        run = (self.store.run() or {}).get("id", "")
        out = send_test(self.cfg, receiver, run=str(run), env=self.env)
        return {"receiver": receiver, "status": out.status, "answer": out.answer, "reason": out.reason}
