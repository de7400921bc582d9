"""Receivers against real loopback servers: exact payload shapes, answers, and secrets kept out of sight."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from milepost.alerts.manager import send_test
from milepost.alerts.model import Alert, AlertStatus, Notification
from milepost.alerts.receivers import MissingSecret, Secret, build_receiver
from milepost.engine.contract.config.alerts import AlertsConfig, ReceiverConfig

SECRET_URL_TAIL = "T000/B000/XXXXSECRETXXXX"


@dataclass
class Capture:
    """A loopback HTTP server that records every POST and answers from a script (default 200)."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self) -> list[Any]:
        with self.lock:
            return [r["body"] for r in self.requests if r["code"] < 300]


@contextmanager
def capture_server() -> Iterator[Capture]:
    cap = Capture()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
            with cap.lock:
                code = cap.answers.pop(0) if cap.answers else 200
                cap.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body, "code": code}
                )
            payload = b'{"status":"success"}' if code < 300 else b"unavailable"
            self.send_response(code)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    cap.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield cap
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def make_notification(status: str = "firing", receiver: str = "r") -> Notification:
    firing = Alert(
        fingerprint="0123456789abcdef",
        labels={
            "alertname": "CollectiveHang",
            "severity": "critical",
            "run": "r1",
            "attempt": "2",
            "group": "default_pg",
            "op": "all_reduce",
        },
        annotations={"summary": "hang in all_reduce", "evidence": "culprit trainer 1", "action": "restart"},
        status=AlertStatus.FIRING,
        active_since=1_700_000_000.0,
        fired_at=1_700_000_000.0,
        last_seen=1_700_000_001.0,
        generator_url="http://dash/incidents?run=r1",
    )
    alerts = [firing]
    if status == "resolved":
        firing.status, firing.resolved_at = AlertStatus.RESOLVED, 1_700_000_060.0
    return Notification(
        key="k1",
        receiver=receiver,
        group_key='{"alertname":"CollectiveHang","run":"r1"}',
        group_labels={"run": "r1", "alertname": "CollectiveHang"},
        status=AlertStatus(status),
        alerts=alerts,
        external_url="http://dash",
        created_at=1_700_000_001.0,
    )


CFG = AlertsConfig()


def test_webhook_sends_alertmanager_v4_exactly() -> None:
    with capture_server() as cap:
        rec = build_receiver(ReceiverConfig(name="hook", type="webhook", url=cap.url + "/hook"), CFG, {})
        out = rec.send(make_notification(receiver="hook"), 5)
        assert out.ok and out.answer.startswith("HTTP 200")
        (req,) = cap.requests
    body = req["body"]
    assert req["path"] == "/hook"
    assert set(body) == {
        "version",
        "groupKey",
        "truncatedAlerts",
        "receiver",
        "status",
        "alerts",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
    }
    assert body["version"] == "4" and body["receiver"] == "hook" and body["status"] == "firing"
    (a,) = body["alerts"]
    assert set(a) == {"status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"}
    assert a["startsAt"] == "2023-11-14T22:13:20.000Z" and a["endsAt"] == "0001-01-01T00:00:00Z"
    assert a["fingerprint"] == "0123456789abcdef" and a["generatorURL"] == "http://dash/incidents?run=r1"
    assert body["commonLabels"]["op"] == "all_reduce" and body["groupLabels"] == {
        "run": "r1",
        "alertname": "CollectiveHang",
    }


def test_webhook_resolved_carries_ends_at() -> None:
    with capture_server() as cap:
        rec = build_receiver(ReceiverConfig(name="hook", type="webhook", url=cap.url), CFG, {})
        assert rec.send(make_notification("resolved"), 5).ok
        (a,) = cap.requests[0]["body"]["alerts"]
    assert a["status"] == "resolved" and a["endsAt"] == "2023-11-14T22:14:20.000Z"


def test_http_answers_are_classified() -> None:
    with capture_server() as cap:
        rec = build_receiver(ReceiverConfig(name="hook", type="webhook", url=cap.url), CFG, {})
        cap.answers[:] = [503, 429, 400]
        assert rec.send(make_notification(), 5).status == "retry"
        assert rec.send(make_notification(), 5).status == "retry"
        out = rec.send(make_notification(), 5)
        assert out.status == "fail" and "400" in out.reason
    down = rec.send(make_notification(), 1)  # the server is gone: connection refused
    assert down.status == "retry" and "ConnectError" in down.reason


def test_slack_block_kit_and_secret_url_stays_hidden() -> None:
    with capture_server() as cap:
        env = {"SLACK_URL": cap.url + "/services/" + SECRET_URL_TAIL}
        rc = ReceiverConfig(name="slack", type="slack", url_env="SLACK_URL")
        rec = build_receiver(rc, CFG, env)
        assert SECRET_URL_TAIL not in repr(rec) and SECRET_URL_TAIL not in str(rec)
        assert rec.send(make_notification(), 5).ok
        body = cap.requests[0]["body"]
        cap.answers[:] = [500]
        failed = rec.send(make_notification(), 5)
    assert set(body) == {"text", "blocks"} and body["text"].startswith("[FIRING:1]")
    kinds = [b["type"] for b in body["blocks"]]
    assert kinds == ["header", "section", "actions"]
    section = body["blocks"][1]["text"]
    assert section["type"] == "mrkdwn" and "culprit trainer 1" in section["text"]
    assert "<http://dash/incidents?run=r1|open in the dashboard>" in section["text"]
    assert body["blocks"][2]["elements"][0]["url"] == "http://dash"
    assert SECRET_URL_TAIL not in failed.reason and SECRET_URL_TAIL not in failed.answer


def test_pagerduty_trigger_and_resolve_with_fingerprint_dedup_key() -> None:
    with capture_server() as cap:
        rc = ReceiverConfig(
            name="pd", type="pagerduty", routing_key_env="PD_KEY", url=cap.url + "/v2/enqueue"
        )
        rec = build_receiver(rc, CFG, {"PD_KEY": "pdkey-secret-123"})
        assert "pdkey-secret-123" not in repr(rec)
        assert rec.send(make_notification(), 5).ok
        assert rec.send(make_notification("resolved"), 5).ok
        trigger, resolve = cap.bodies()
    assert trigger["event_action"] == "trigger" and trigger["dedup_key"] == "0123456789abcdef"
    assert trigger["routing_key"] == "pdkey-secret-123"
    p = trigger["payload"]
    assert p["severity"] == "critical" and p["source"] == "r1" and p["class"] == "CollectiveHang"
    assert p["summary"].startswith("CollectiveHang: hang") and p["timestamp"] == "2023-11-14T22:13:20.000Z"
    assert trigger["links"] == [{"href": "http://dash/incidents?run=r1", "text": "milepost dashboard"}]
    assert resolve == {
        "routing_key": "pdkey-secret-123",
        "event_action": "resolve",
        "dedup_key": "0123456789abcdef",
    }


def test_alertmanager_push() -> None:
    with capture_server() as cap:
        rec = build_receiver(ReceiverConfig(name="am", type="alertmanager", url=cap.url), CFG, {})
        assert rec.send(make_notification(), 5).ok
        assert rec.send(make_notification("resolved"), 5).ok
        (f,), (r,) = cap.bodies()
        assert [q["path"] for q in cap.requests] == ["/api/v2/alerts"] * 2
    assert set(f) == {"labels", "annotations", "startsAt", "endsAt", "generatorURL"}
    assert f["endsAt"] > f["startsAt"]  # a firing alert ends a horizon ahead unless pushed again
    assert r["endsAt"] == "2023-11-14T22:14:20.000Z"


def test_headers_from_env_and_missing_secret_names_the_variable() -> None:
    with capture_server() as cap:
        rc = ReceiverConfig(
            name="hook", type="webhook", url=cap.url, headers_env={"Authorization": "HOOK_TOKEN"}
        )
        rec = build_receiver(rc, CFG, {"HOOK_TOKEN": "Bearer tok-secret"})
        assert "tok-secret" not in repr(rec)
        assert rec.send(make_notification(), 5).ok
        assert cap.requests[0]["headers"]["Authorization"] == "Bearer tok-secret"
    with pytest.raises(MissingSecret, match="HOOK_TOKEN"):
        build_receiver(rc, CFG, {})
    assert repr(Secret("x")) == "Secret(***)" and "x" not in f"{Secret('x')}"


def test_log_receiver(caplog: pytest.LogCaptureFixture) -> None:
    rec = build_receiver(ReceiverConfig(name="log", type="log"), CFG, {})
    with caplog.at_level(logging.WARNING, logger="milepost.alerts"):
        assert rec.send(make_notification(), 1).ok
    assert "CollectiveHang" in caplog.text and "hang in all_reduce" in caplog.text


def test_send_test_reports_the_answer() -> None:
    with capture_server() as cap:
        cfg = AlertsConfig(
            receivers=(
                ReceiverConfig(name="log", type="log"),
                ReceiverConfig(name="hook", type="webhook", url=cap.url),
            )
        )
        out = send_test(cfg, "hook", run="r9", env={}, now=1_700_000_000.0)
        assert out.ok and "200" in out.answer
        body = cap.requests[0]["body"]
    assert body["alerts"][0]["labels"] == {"alertname": "MilepostTest", "severity": "info", "run": "r9"}
    cfg2 = AlertsConfig(
        receivers=(
            ReceiverConfig(name="log", type="log"),
            ReceiverConfig(name="pd", type="pagerduty", routing_key_env="UNSET_PD_KEY"),
        )
    )
    missing = send_test(cfg2, "pd", env={})
    assert missing.status == "fail" and "UNSET_PD_KEY" in missing.reason
    with pytest.raises(KeyError, match="nope"):
        send_test(cfg2, "nope")


# ----- email through a real local SMTP server --------------------------------------------------


@contextmanager
def smtp_server(user: str = "", password: str = "") -> Iterator[tuple[int, list[Any]]]:
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    got: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            got.append(envelope)
            return "250 OK"

    def auth(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == user
            and data.password.decode() == password
        )
        return AuthResult(success=ok, handled=False)  # handled=True would leave the 535 unsent

    kw: dict[str, Any] = {"authenticator": auth, "auth_require_tls": False} if user else {}
    with socket.socket() as probe:  # aiosmtpd's ready check connects to the port it was given: no port 0
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctl = Controller(Handler(), hostname="127.0.0.1", port=port, ready_timeout=5, **kw)
    ctl.start()
    try:
        yield port, got
    finally:
        ctl.stop()


def test_email_with_login_password_from_env() -> None:
    with smtp_server("alerts", "pw-secret") as (port, got):
        rc = ReceiverConfig(
            name="mail",
            type="email",
            smarthost=f"127.0.0.1:{port}",
            from_addr="milepost@example.org",
            to=("oncall@example.org",),
            username="alerts",
            password_env="SMTP_PW",
        )
        rec = build_receiver(rc, CFG, {"SMTP_PW": "pw-secret"})
        assert "pw-secret" not in repr(rec)
        out = rec.send(make_notification(), 5)
        assert out.ok, out
        bad = build_receiver(rc, CFG, {"SMTP_PW": "wrong-pw"}).send(make_notification(), 5)
    (env,) = got
    assert env.mail_from == "milepost@example.org" and env.rcpt_tos == ["oncall@example.org"]
    text = env.content.decode()
    assert "Subject: [FIRING:1] alertname=CollectiveHang run=r1" in text and "culprit trainer 1" in text
    assert bad.status == "fail" and "wrong-pw" not in bad.reason


def test_email_server_down_is_retryable() -> None:
    with smtp_server() as (port, _):
        pass
    rc = ReceiverConfig(
        name="mail", type="email", smarthost=f"127.0.0.1:{port}", from_addr="a@b", to=("c@d",)
    )
    assert build_receiver(rc, CFG, {}).send(make_notification(), 2).status == "retry"
