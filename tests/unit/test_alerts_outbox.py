"""The outbox: at-least-once, in order, per receiver; backoff; survives a crash; the dispatcher thread."""

from __future__ import annotations

import time
from pathlib import Path

from milepost.alerts.manager import AlertManager, open_delivery
from milepost.alerts.model import AlertStatus, Notification
from milepost.alerts.outbox import Dispatcher, Outbox, backoff_s
from milepost.alerts.receivers import Outcome, build_receiver
from milepost.engine.contract.config.alerts import AlertsConfig, ReceiverConfig

from tests.unit.test_alerts_receivers import capture_server, make_notification


def note(key: str, receiver: str = "hook", at: float = 0.0) -> Notification:
    n = make_notification(receiver=receiver)
    return n.model_copy(update={"key": key, "created_at": at})


class Scripted:
    """A receiver that answers from a script and records what it was sent."""

    def __init__(self, name: str, answers: list[str]) -> None:
        self.name, self.answers = name, answers
        self.sent: list[tuple[str, str]] = []

    def send(self, batch: Notification, timeout_s: float) -> Outcome:
        status = self.answers.pop(0) if self.answers else "ok"
        self.sent.append((batch.key, status))
        return Outcome("ok" if status == "ok" else "retry" if status == "retry" else "fail")


def test_enqueue_is_idempotent(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    assert ob.enqueue(note("a")) and not ob.enqueue(note("a"))
    assert ob.pending() == {"hook": 1}


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_s(n, 1, 10) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    assert backoff_s(10_000, 1, 300) == 300


def test_fifo_per_receiver_and_backoff(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    for k in ("a1", "a2"):
        ob.enqueue(note(k, "a"))
    ob.enqueue(note("b1", "b"))
    a, b = Scripted("a", ["retry", "retry"]), Scripted("b", [])
    d = Dispatcher(ob, {"a": a, "b": b}, backoff_base_s=10, backoff_max_s=15)
    d.run_once(now=0)
    assert a.sent == [("a1", "retry")] and b.sent == [("b1", "ok")]  # b is not held up by a
    d.run_once(now=9)
    assert len(a.sent) == 1  # backing off 10 s
    d.run_once(now=10)
    assert a.sent[-1] == ("a1", "retry")
    d.run_once(now=24)
    assert len(a.sent) == 2  # second backoff 15 s (capped), not 20
    d.run_once(now=25)
    assert a.sent[2:] == [("a1", "ok"), ("a2", "ok")]
    assert [r.state for r in ob.rows("a")] == ["sent", "sent"] and ob.rows("a")[0].attempts == 3
    assert d.outcomes == {("a", "retry"): 2, ("a", "ok"): 2, ("b", "ok"): 1}


def test_permanent_failure_moves_on_unknown_fails_held_waits_old_expires(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    ob.enqueue(note("x1", "x", at=150))
    ob.enqueue(note("x2", "x", at=150))
    ob.enqueue(note("gone1", "gone", at=150))
    ob.enqueue(note("held1", "held", at=150))
    ob.enqueue(note("old1", "y", at=0))
    x = Scripted("x", ["fail"])
    d = Dispatcher(ob, {"x": x, "y": Scripted("y", [])}, max_age_s=100)
    d.held.add("held")
    d.run_once(now=200)
    assert x.sent == [("x1", "fail"), ("x2", "ok")]
    assert ob.rows("gone")[0].state == "failed" and "gone" in ob.rows("gone")[0].reason
    assert ob.rows("held")[0].state == "pending"
    assert ob.rows("y")[0].state == "expired"
    assert ob.purge(before=201) == 4 and ob.pending() == {"held": 1}


def test_receiver_that_raises_is_retried_not_fatal(tmp_path: Path) -> None:
    class Broken:
        name = "b"

        def send(self, batch: Notification, timeout_s: float) -> Outcome:
            raise RuntimeError("secret-in-message")

    ob = Outbox(tmp_path / "o.sqlite")
    ob.enqueue(note("k", "b"))
    Dispatcher(ob, {"b": Broken()}).run_once(now=0)
    (row,) = ob.rows("b")
    assert row.state == "pending" and row.reason == "receiver raised RuntimeError"


def _hang_events(m: AlertManager, t: float, attempt: int) -> None:
    m.on_event(
        {
            "id": int(t),
            "ts": t,
            "kind": "attempt_started",
            "severity": "info",
            "message": "",
            "attempt": attempt,
            "role": None,
            "rank": None,
            "step": None,
            "data": {},
        }
    )
    m.on_event(
        {
            "id": int(t) + 1,
            "ts": t + 1,
            "kind": "collective_hang",
            "severity": "critical",
            "message": "hang",
            "attempt": attempt,
            "role": None,
            "rank": None,
            "step": None,
            "data": {
                "group": "pg",
                "op": "all_reduce",
                "seq": 3,
                "diagnosis_id": attempt,
                "culprit_ranks": [],
            },
        }
    )


def test_receiver_down_then_up_gets_every_alert_and_resolve_once_in_order(tmp_path: Path) -> None:
    cfg = AlertsConfig(
        group_wait_s=0,
        group_interval_s=0,
        backoff_base_s=1,
        backoff_max_s=8,
        group_by=("run", "alertname", "attempt"),
        receivers=(ReceiverConfig(name="log", type="log"),),
    )
    with capture_server() as cap:
        hook = ReceiverConfig(name="hook", type="webhook", url=cap.url)
        cfg = cfg.model_copy(
            update={
                "receivers": (hook,),
                "routes": (cfg.routes[0].model_copy(update={"receivers": ("hook",)}),),
            }
        )
        ob = Outbox(tmp_path / "outbox.sqlite")
        m = AlertManager(cfg, "r1", ob)
        d = Dispatcher(
            ob, {"hook": build_receiver(hook, cfg, {})}, timeout_s=5, backoff_base_s=1, backoff_max_s=8
        )
        cap.answers[:] = [503] * 6  # down for six tries (~ a minute of backoff)
        now = 0.0
        for attempt in (1, 2, 3):  # three hangs, each resolved by the next attempt
            _hang_events(m, now, attempt)
            m.tick(now + 2)
            d.run_once(now + 2)
            now += 10
        m.on_event(
            {
                "id": 99,
                "ts": now,
                "kind": "run_succeeded",
                "severity": "info",
                "message": "",
                "attempt": 3,
                "role": None,
                "rank": None,
                "step": None,
                "data": {},
            }
        )
        m.tick(now)
        for t in range(int(now), int(now) + 120):
            d.run_once(float(t))
        got = [(a["labels"]["attempt"], a["status"]) for body in cap.bodies() for a in body["alerts"]]
        refused = sum(r["code"] == 503 for r in cap.requests)
    assert refused == 6
    assert got == [
        ("1", "firing"),
        ("1", "resolved"),
        ("2", "firing"),
        ("2", "resolved"),
        ("3", "firing"),
        ("3", "resolved"),
    ]
    assert ob.pending() == {}


def test_reopened_outbox_after_a_crash_delivers(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    ob.enqueue(note("k1"))
    ob.enqueue(note("k2"))
    Dispatcher(ob, {"hook": Scripted("hook", ["retry"])}).run_once(now=0)
    del ob  # the daemon died: no close, no flush beyond what SQLite committed
    with capture_server() as cap:
        ob2 = Outbox(path)
        assert not ob2.enqueue(note("k1"))  # the replayed tick is a no-op
        hook = build_receiver(ReceiverConfig(name="hook", type="webhook", url=cap.url), AlertsConfig(), {})
        Dispatcher(ob2, {"hook": hook}).run_once(now=100)
        assert len(cap.bodies()) == 2
    assert [r.state for r in ob2.rows()] == ["sent", "sent"]


def test_dispatcher_thread_delivers_and_stops(tmp_path: Path) -> None:
    with capture_server() as cap:
        cfg = AlertsConfig(
            receivers=(
                ReceiverConfig(name="log", type="log"),
                ReceiverConfig(name="hook", type="webhook", url=cap.url),
                ReceiverConfig(name="pd", type="pagerduty", routing_key_env="NOT_SET_HERE"),
            )
        )
        seen: list[tuple[str, str]] = []
        ob, d, broken = open_delivery(
            cfg, tmp_path / "o.sqlite", env={}, on_outcome=lambda r, o: seen.append((r, o))
        )
        try:
            assert list(broken) == ["pd"] and "NOT_SET_HERE" in broken["pd"]
            ob.enqueue(note("t1", at=time.time()))
            ob.enqueue(note("p1", "pd", at=time.time()))
            d.wake()
            deadline = time.monotonic() + 10
            # The server records the body before the dispatcher has read the answer and said so.
            while not (cap.bodies() and ("hook", "ok") in seen) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert len(cap.bodies()) == 1 and ("hook", "ok") in seen
            assert ob.pending() == {"pd": 1}  # waits for a restart with the variable set
        finally:
            assert d.stop(timeout_s=10)
            ob.close()


def test_notification_round_trips_through_the_outbox(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "o.sqlite")
    n = note("k")
    ob.enqueue(n)
    (row,) = ob.rows()
    assert row.notification == n and row.notification.alerts[0].status == AlertStatus.FIRING


def test_daemon_crash_between_enqueue_and_persist_sends_once(tmp_path: Path) -> None:
    """The daemon enqueues, dies before it stores the alert state, restarts from the older state and
    ticks again: the same keys come out, the outbox ignores them, the receiver hears each once."""
    cfg = AlertsConfig(group_wait_s=0)
    path = tmp_path / "outbox.sqlite"
    m = AlertManager(cfg, "r1", Outbox(path))
    _hang_events(m, 0.0, 1)
    saved = m.state_dict()  # the last state the store holds
    assert len(m.tick(2)) == 1  # enqueued; then the crash
    m2 = AlertManager(cfg, "r1", Outbox(path), state=saved)
    assert len(m2.tick(2)) == 1  # the same notification again...
    assert m2.outbox is not None and len(m2.outbox.rows()) == 1  # ...stored once
    rec = Scripted("log", [])
    Dispatcher(m2.outbox, {"log": rec}).run_once(now=3)
    assert [k for k, _ in rec.sent] == [m2.outbox.rows()[0].key]
