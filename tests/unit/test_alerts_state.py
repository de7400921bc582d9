"""Alert state: pending -> firing -> resolved, fingerprints, grouping, repeats, inhibition, silences, routes."""

from __future__ import annotations

import json

import pytest
from milepost.alerts.manager import AlertManager
from milepost.alerts.model import AlertStatus, Condition, Matcher, Silence, fingerprint
from milepost.alerts.state import AlertState, advance, alert_views, notifications, route_receivers
from milepost.engine.contract.config.alerts import AlertsConfig, ReceiverConfig, RouteConfig

CFG = AlertsConfig(group_wait_s=10, group_interval_s=30, repeat_interval_s=1000)


def cond(name: str = "NoProgress", severity: str = "error", for_s: float = 0.0, **labels: str) -> Condition:
    return Condition(
        alertname=name,
        severity=severity,
        labels={"run": "r1", **labels},
        for_s=for_s,
        summary=f"{name} now",
        view="overview",
    )


def run(state: AlertState, conds: list[Condition], now: float, cfg: AlertsConfig = CFG) -> list:
    advance(state, conds, now, cfg)
    return notifications(state, now, cfg)


def test_fingerprint_is_stable_and_order_free() -> None:
    a = fingerprint({"run": "r", "alertname": "X", "rank": "1"})
    assert a == fingerprint({"rank": "1", "alertname": "X", "run": "r"}) and len(a) == 16
    assert a != fingerprint({"run": "r", "alertname": "X", "rank": "2"})
    assert cond().fingerprint == cond().fingerprint


def test_pending_then_firing_then_resolved() -> None:
    st = AlertState()
    c = cond(for_s=60)
    assert run(st, [c], 0) == []
    assert st.alerts[c.fingerprint].status == AlertStatus.PENDING
    assert run(st, [c], 59) == [] and st.alerts[c.fingerprint].status == AlertStatus.PENDING
    run(st, [c], 60)
    a = st.alerts[c.fingerprint]
    assert a.status == AlertStatus.FIRING and a.fired_at == 60 and a.active_since == 0
    assert a.annotations["dashboard"].startswith("http://127.0.0.1:8501/overview?run=r1")
    advance(st, [], 100, CFG)
    assert a.status == AlertStatus.RESOLVED and a.resolved_at == 100


def test_pending_that_clears_is_dropped_silently() -> None:
    st = AlertState()
    c = cond(for_s=60)
    run(st, [c], 0)
    assert run(st, [], 30) == [] and st.alerts == {}


def test_group_wait_gathers_then_interval_then_resolve() -> None:
    st = AlertState()
    a, b = cond(rank="0", name="WorkerDown"), cond(rank="1", name="WorkerDown")
    assert run(st, [a], 0) == []  # group_wait 10 s
    assert run(st, [a, b], 5) == []
    (n,) = run(st, [a, b], 10)
    assert n.receiver == "log" and n.status == "firing" and len(n.alerts) == 2
    assert n.group_labels == {"run": "r1", "alertname": "WorkerDown"}
    assert run(st, [a, b], 20) == []  # nothing changed
    assert run(st, [a], 25) == []  # b resolved, but group_interval 30 s since 10
    (n2,) = run(st, [a], 40)
    assert {x.labels["rank"]: x.status for x in n2.alerts} == {"0": "firing", "1": "resolved"}
    assert n2.key != n.key
    (n3,) = run(st, [], 70)
    assert n3.status == "resolved" and [x.labels["rank"] for x in n3.alerts] == ["0"]
    assert run(st, [], 200) == [] and len(st.groups) == 1
    assert (
        run(st, [], 70 + 3601) == [] and st.groups == {} and st.alerts == {}
    )  # forgotten after resolved_keep_s


def test_repeat_interval_resends_unchanged_firing_group() -> None:
    st = AlertState()
    c = cond()
    run(st, [c], 0)
    assert len(run(st, [c], 10)) == 1
    assert run(st, [c], 500) == []
    (again,) = run(st, [c], 1010)
    assert again.alerts[0].status == "firing"


def test_alert_that_cleared_within_group_wait_is_sent_once_as_resolved() -> None:
    st = AlertState()
    c = cond("CollectiveHang", "critical")
    run(st, [c], 0)
    assert run(st, [], 5) == []  # resolved within group_wait: still news once the wait is over
    (n,) = run(st, [], 10)
    assert n.status == "resolved" and n.alerts[0].fired_at == 0 and n.alerts[0].resolved_at == 5
    assert run(st, [], 50) == [] and run(st, [], 5000) == []


def test_same_key_after_a_replayed_tick() -> None:
    """A daemon that crashed after enqueueing replays from the persisted state: the same keys."""
    st = AlertState()
    run(st, [cond()], 0)
    saved = st.model_dump_json()
    first = run(st, [cond()], 10)
    replay = run(AlertState.model_validate_json(saved), [cond()], 10)
    assert [n.key for n in first] == [n.key for n in replay]


def test_inhibition_run_failed_mutes_attempt_failed_of_same_run() -> None:
    st = AlertState()
    att, other = (
        cond("AttemptFailed", attempt="2"),
        Condition(
            alertname="AttemptFailed", severity="error", labels={"run": "r2", "attempt": "1"}, summary="x"
        ),
    )
    failed = cond("RunFailed", "critical")
    run(st, [att, other, failed], 0)
    sent = run(st, [att, other, failed], 10)
    names = sorted((n.group_labels["run"], n.group_labels["alertname"]) for n in sent)
    assert names == [("r1", "RunFailed"), ("r2", "AttemptFailed")]
    views = {(v["labels"]["run"], v["labels"]["alertname"]): v for v in alert_views(st, 10, CFG)}
    assert views[("r1", "AttemptFailed")]["inhibited_by"] == [failed.fingerprint]


def test_silence_mutes_and_expiry_lets_the_alert_out() -> None:
    st = AlertState()
    c = cond("GpuXid", node="n1", gpu="0")
    st.silences["s1"] = Silence(
        id="s1",
        matchers=[Matcher.parse('alertname=~"Gpu.*"'), Matcher.parse("node!=n2")],
        starts_at=0,
        ends_at=100,
    )
    run(st, [c], 0)
    assert run(st, [c], 50) == []
    assert run(st, [c], 100) == []  # the silence ended: the group forms now and waits group_wait
    (n,) = run(st, [c], 110)
    assert n.alerts[0].alertname == "GpuXid"


@pytest.mark.parametrize(
    ("text", "labels", "hit"),
    [
        ("run=r1", {"run": "r1"}, True),
        ("run!=r1", {"run": "r1"}, False),
        ('severity=~"error|critical"', {"severity": "critical"}, True),
        ("severity=~err", {"severity": "error"}, False),  # anchored like Alertmanager
        ("role!~roll.*", {"role": "trainer"}, True),
        ("rank=", {}, True),  # an absent label is the empty string
    ],
)
def test_matchers(text: str, labels: dict[str, str], hit: bool) -> None:
    assert Matcher.parse(text).matches(labels) is hit


def test_matcher_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="not of the form"):
        Matcher.parse("no operator")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Matcher.parse("a=~(")


def test_routes_first_match_and_continue() -> None:
    cfg = AlertsConfig(
        receivers=(
            ReceiverConfig(name="log", type="log"),
            ReceiverConfig(name="pd", type="pagerduty", routing_key_env="PD"),
            ReceiverConfig(name="hook", type="webhook", url="http://127.0.0.1:1/"),
        ),
        routes=(
            RouteConfig.model_validate({"receivers": ["pd"], "min_severity": "critical", "continue": True}),
            RouteConfig.model_validate({"receivers": ["hook"], "matchers": ['alertname=~"Gpu.*"']}),
            RouteConfig.model_validate({"receivers": ["log"]}),
        ),
    )
    assert route_receivers(cfg.routes, {"severity": "critical", "alertname": "RunFailed"}) == ["pd", "log"]
    assert route_receivers(cfg.routes, {"severity": "error", "alertname": "GpuXid"}) == ["hook"]
    assert route_receivers(cfg.routes, {"severity": "info", "alertname": "X"}) == ["log"]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="unknown receiver"):
        AlertsConfig(routes=(RouteConfig.model_validate({"receivers": ["nope"]}),))
    with pytest.raises(ValueError, match="slack needs url_env"):
        ReceiverConfig(name="s", type="slack", url="https://hooks.slack.com/services/SECRET")
    with pytest.raises(ValueError, match="unknown key"):
        ReceiverConfig.model_validate(
            {"name": "w", "type": "webhook", "url": "http://x", "password": "hunter2"}
        )
    with pytest.raises(ValueError, match="smarthost"):
        ReceiverConfig(name="m", type="email", smarthost="mail", from_addr="a@b", to=("c@d",))
    with pytest.raises(ValueError, match="duplicate"):
        AlertsConfig(
            receivers=(ReceiverConfig(name="log", type="log"), ReceiverConfig(name="log", type="log"))
        )
    with pytest.raises(ValueError, match="matcher"):
        RouteConfig.model_validate({"receivers": ["log"], "matchers": ["bad matcher"]})
    cfg = AlertsConfig()
    with pytest.raises(ValueError):
        cfg.group_wait_s = 1  # frozen


def test_manager_round_trip_through_json_and_silence_api() -> None:
    m = AlertManager(CFG, "r1")
    m.on_event(
        {
            "id": 1,
            "ts": 0,
            "kind": "attempt_started",
            "severity": "info",
            "message": "",
            "attempt": 1,
            "role": None,
            "rank": None,
            "step": None,
            "data": {},
        }
    )
    m.on_event(
        {
            "id": 2,
            "ts": 1,
            "kind": "run_failed",
            "severity": "critical",
            "message": "boom",
            "attempt": 1,
            "role": None,
            "rank": None,
            "step": None,
            "data": {},
        }
    )
    m.on_step({"step": 0, "ts": 1, "attempt": 1, "loss": float("nan")})
    m.tick(2)
    assert m.tick(12)  # group_wait passed
    saved = json.loads(json.dumps(m.state_dict(), allow_nan=False))
    back = AlertManager(CFG, "r1", state=saved)
    assert back.state_dict() == m.state_dict()
    assert {a.alertname for a in back.firing()} == {"RunFailed", "NonFiniteLoss"}
    assert back.counts() == {("RunFailed", "firing"): 1, ("NonFiniteLoss", "firing"): 1}
    sil = back.add_silence(["alertname=RunFailed"], 12, 1000, "me", "known")
    assert [v["silenced_by"] for v in back.alerts(13) if v["labels"]["alertname"] == "RunFailed"] == [
        [sil.id]
    ]
    assert back.expire_silence(sil.id, 14) and not back.expire_silence(sil.id, 15)
    with pytest.raises(ValueError, match="ends_at"):
        back.add_silence(["run=r1"], 10, 5)
    with pytest.raises(ValueError, match="version"):
        AlertManager(CFG, "r1", state={"v": 99})


def test_a_hang_that_restarts_pages_once_firing_and_once_resolved() -> None:
    cfg = AlertsConfig(group_wait_s=0, group_interval_s=0)
    m = AlertManager(cfg, "r1")

    def ev(kind: str, ts: float, attempt: int, severity: str = "info", **data: object) -> dict[str, object]:
        return {
            "kind": kind,
            "ts": ts,
            "severity": severity,
            "attempt": attempt,
            "message": kind,
            "data": data,
        }

    m.on_event(ev("attempt_launched", 0, 0))
    m.tick(1)
    m.on_event(ev("collective_hang", 10, 0, "critical", group="world", op="all_reduce", seq=7))
    sent = m.tick(10.5)
    m.on_event(ev("attempt_ended", 11, 0, "error"))
    m.on_event(ev("restart_scheduled", 11, 0, "warning"))
    sent += m.tick(11.5)
    m.on_event(ev("attempt_launched", 14, 1))
    sent += m.tick(14.5) + m.tick(20)
    seen = [(a.alertname, str(a.status)) for n in sent for a in n.alerts]
    assert seen == [("CollectiveHang", "firing"), ("CollectiveHang", "resolved")]
    failed = [v for v in m.alerts(20) if v["labels"]["alertname"] == "AttemptFailed"]  # type: ignore[index]
    assert failed and failed[0]["status"] == "resolved"  # it was there, inhibited: shown, not paged
