"""The alerting facade the daemon holds: feed it, tick it, persist it, deliver through the outbox.

Wiring (a handful of lines in the daemon):

    outbox, dispatcher, broken = open_delivery(cfg, run_dir / "alerts.sqlite")
    alerts = AlertManager(cfg, run_id, outbox, state=store.get("alerts"), on_enqueue=dispatcher.wake)
    bus: event -> alerts.on_event(ev); step record -> alerts.on_step(rec); report -> alerts.on_report(rep)
    every second: alerts.on_disk(...); alerts.tick(time.time()); store.put("alerts", alerts.state_dict())
    shutdown: dispatcher.stop(); outbox.close()

`tick` enqueues before it returns, so persisting the state afterwards is safe: a crash in
between replays the same notification keys, which the outbox ignores.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from milepost.alerts import rules
from milepost.alerts.model import Alert, AlertStatus, Matcher, Notification, Silence
from milepost.alerts.outbox import Dispatcher, Outbox
from milepost.alerts.receivers import MissingSecret, Outcome, build_receiver, build_receivers
from milepost.alerts.state import AlertState, advance, alert_views, counts, notifications
from milepost.engine.contract.config.alerts import AlertsConfig

STATE_VERSION = 1


class AlertManager:
    """Rules, alert state and silences of one run; thread-safe (the bus and the API call it)."""

    def __init__(
        self,
        cfg: AlertsConfig,
        run: str,
        outbox: Outbox | None = None,
        *,
        state: Mapping[str, Any] | None = None,
        on_enqueue: Callable[[], None] | None = None,
    ) -> None:
        self.cfg, self.run, self.outbox, self.on_enqueue = cfg, run, outbox, on_enqueue
        self._lock = threading.Lock()
        self._keep = rules.steps_to_keep(cfg.rules)
        self.obs = rules.Observations(run=run)
        self.state = AlertState()
        if state:
            self.restore(state)

    # ----- persistence -----
    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "v": STATE_VERSION,
                # Through JSON, so a NaN loss comes out as "NaN" and the dict is strict JSON.
                "observations": json.loads(self.obs.model_dump_json()),
                "alerts": json.loads(self.state.model_dump_json()),
            }

    def restore(self, saved: Mapping[str, Any]) -> None:
        if saved.get("v") != STATE_VERSION:
            raise ValueError(f"alerts state: version {saved.get('v')!r} is not {STATE_VERSION}")
        with self._lock:
            self.obs = rules.Observations.model_validate(saved["observations"])
            self.state = AlertState.model_validate(saved["alerts"])

    # ----- inputs -----
    def on_event(self, ev: Mapping[str, Any]) -> None:
        with self._lock:
            rules.observe_event(self.obs, dict(ev))

    def on_step(self, rec: Mapping[str, Any]) -> None:
        with self._lock:
            rules.observe_step(self.obs, dict(rec), self._keep)

    def on_report(self, report: Mapping[str, Any]) -> None:
        with self._lock:
            rules.observe_report(self.obs, dict(report))

    def on_disk(self, path: str, free_bytes: int, total_bytes: int) -> None:
        with self._lock:
            rules.observe_disk(self.obs, path, free_bytes, total_bytes)

    # ----- decisions -----
    def tick(self, now: float) -> list[Notification]:
        """Evaluate the rules at `now`, move the alerts, enqueue what is due; returns what was enqueued."""
        if not self.cfg.enabled:
            return []
        with self._lock:
            conditions = rules.evaluate(self.obs, now, self.cfg)
            advance(self.state, conditions, now, self.cfg)
            due = notifications(self.state, now, self.cfg)
            rules.prune(self.obs, now, self.cfg)
            if self.outbox is not None:
                for n in due:
                    self.outbox.enqueue(n)
        if due and self.on_enqueue is not None:
            self.on_enqueue()
        return due

    # ----- silences -----
    def add_silence(
        self, matchers: list[str], starts_at: float, ends_at: float, created_by: str = "", comment: str = ""
    ) -> Silence:
        if ends_at <= starts_at:
            raise ValueError(f"silence: ends_at {ends_at} must be after starts_at {starts_at}")
        sil = Silence(
            id=uuid.uuid4().hex[:16],
            matchers=[Matcher.parse(m) for m in matchers],
            starts_at=starts_at,
            ends_at=ends_at,
            created_by=created_by,
            comment=comment,
        )
        with self._lock:
            self.state.silences[sil.id] = sil
        return sil

    def expire_silence(self, silence_id: str, now: float) -> bool:
        with self._lock:
            sil = self.state.silences.get(silence_id)
            if sil is None or sil.ends_at <= now:
                return False
            self.state.silences[silence_id] = sil.model_copy(update={"ends_at": now})
            return True

    def silences(self) -> list[Silence]:
        with self._lock:
            return sorted(self.state.silences.values(), key=lambda s: s.starts_at)

    # ----- reads -----
    def alerts(self, now: float) -> list[dict[str, object]]:
        with self._lock:
            return alert_views(self.state, now, self.cfg)

    def firing(self) -> list[Alert]:
        with self._lock:
            return [a.model_copy() for a in self.state.alerts.values() if a.status == AlertStatus.FIRING]

    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return counts(self.state)


def open_delivery(
    cfg: AlertsConfig,
    path: str | Path,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    on_outcome: Callable[[str, str], None] | None = None,
) -> tuple[Outbox, Dispatcher, dict[str, str]]:
    """The outbox at `path` and a started dispatcher over every receiver that could be built.

    The third value names the receivers that could not be built and why (an unset secret
    variable): the daemon logs it as an event; their notifications stay pending until a
    restart with the variable set, or expire.
    """
    outbox = Outbox(path)
    built, broken = build_receivers(cfg, env)
    dispatcher = Dispatcher(
        outbox,
        built,
        timeouts={r.name: r.timeout_s for r in cfg.receivers},
        backoff_base_s=cfg.backoff_base_s,
        backoff_max_s=cfg.backoff_max_s,
        max_age_s=cfg.outbox_max_age_s,
        clock=clock,
        on_outcome=on_outcome,
    )
    dispatcher.held.update(broken)
    dispatcher.start()
    return outbox, dispatcher, broken


def make_test_notification(receiver: str, run: str, now: float, cfg: AlertsConfig) -> Notification:
    """A firing notification of one `MilepostTest` info alert (what `milepost alerts test` sends)."""
    labels = {"alertname": "MilepostTest", "severity": "info", "run": run}
    alert = Alert(
        fingerprint=f"test-{int(now)}",
        labels=labels,
        status=AlertStatus.FIRING,
        active_since=now,
        fired_at=now,
        last_seen=now,
        generator_url=f"{cfg.dashboard_url.rstrip('/')}/alerts",
        annotations={
            "summary": f"test notification from milepost to receiver {receiver}",
            "action": "nothing to do: this checks that delivery works",
        },
    )
    return Notification(
        key=f"test|{receiver}|{now}",
        receiver=receiver,
        group_key=f"test/{run}",
        group_labels={"run": run},
        status=AlertStatus.FIRING,
        alerts=[alert],
        external_url=cfg.dashboard_url,
        created_at=now,
    )


def send_test(
    cfg: AlertsConfig,
    receiver: str,
    run: str = "test",
    env: Mapping[str, str] | None = None,
    now: float | None = None,
    timeout_s: float | None = None,
) -> Outcome:
    """Build a test notification, send it straight to one receiver (no outbox) and say what it answered."""
    rc = cfg.receiver(receiver)
    try:
        rec = build_receiver(rc, cfg, env)
    except MissingSecret as e:
        return Outcome("fail", str(e))
    n = make_test_notification(receiver, run, time.time() if now is None else now, cfg)
    return rec.send(n, rc.timeout_s if timeout_s is None else timeout_s)
