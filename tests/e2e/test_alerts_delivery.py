"""Alerts end to end: a real daemon, real gloo ranks, webhook and SMTP receivers inside the test.

One live run serves the whole module (tests run in file order, each picking up where the
last left off): an injected hang reaches the webhook firing, then resolved, once each, and
as mail through aiosmtpd, all from the job file's ``[alerts]``; a silence made through the
API (token) keeps an alert from being sent and survives a daemon restart; a webhook that
answers 503 for 60 s, with the daemon SIGKILLed and started again in between, still gets
every alert and every resolve exactly once, in order.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.harness import MILEPOST, DaemonRun, e2e_job
from tests.unit.test_alerts_receivers import smtp_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

OUTAGE_S = 60.0
PASSWORD_ENV = "MILEPOST_E2E_SMTP_PASSWORD"


@dataclass
class Hook:
    """A webhook receiver on loopback: answers 503 until ``refuse_until``, records what it accepted."""

    url: str = ""
    refuse_until: float = 0.0
    accepted: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alerts(self, alertname: str | None = None) -> list[tuple[str, str, str]]:
        """(alertname, status, fingerprint) of every accepted alert, in arrival order."""
        with self.lock:
            out = [
                (a["labels"]["alertname"], a["status"], a["fingerprint"])
                for body in self.accepted
                for a in body["alerts"]
            ]
        return [x for x in out if alertname is None or x[0] == alertname]

    def attempts(self, alertname: str) -> list[str]:
        """The attempt label of every accepted alert named ``alertname``."""
        with self.lock:
            return [
                a["labels"].get("attempt", "")
                for body in self.accepted
                for a in body["alerts"]
                if a["labels"]["alertname"] == alertname
            ]


def serve_hook() -> tuple[Hook, ThreadingHTTPServer, threading.Thread]:
    hook = Hook()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"null")
            with hook.lock:
                refuse = time.time() < hook.refuse_until
                if refuse:
                    hook.refused += 1
                else:
                    hook.accepted.append(body)
            code, payload = (503, b"down") if refuse else (200, b"ok")
            self.send_response(code)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    return hook, server, thread


def alerts_toml(hook_url: str, smtp_port: int) -> str:
    return f"""
[alerts]
dashboard_url = "http://127.0.0.1:8501"
group_wait_s = 0
group_interval_s = 0
backoff_base_s = 0.5
backoff_max_s = 2.0

[[alerts.receivers]]
name = "hook"
type = "webhook"
url = "{hook_url}"

[[alerts.receivers]]
name = "mail"
type = "email"
smarthost = "127.0.0.1:{smtp_port}"
from_addr = "milepost@example.org"
to = ["oncall@example.org"]
username = "alerts"
password_env = "{PASSWORD_ENV}"

[[alerts.receivers]]
name = "log"
type = "log"

[[alerts.routes]]
receivers = ["mail"]
min_severity = "critical"
continue = true

[[alerts.routes]]
receivers = ["hook"]
min_severity = "error"

[[alerts.routes]]
receivers = ["log"]
"""


@dataclass
class Live:
    run: DaemonRun
    hook: Hook
    mail: list[Any]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    hook, server, thread = serve_hook()
    tmp = tmp_path_factory.mktemp("alerts")
    with smtp_server("alerts", "pw-secret") as (port, mail):
        doc = e2e_job(
            "alerts",
            seed=5,
            steps=5000,
            checkpoint={"interval": 5},
            supervisor={"backoff_max_s": 1.0, "startup_grace_s": 300.0},
        )
        run = DaemonRun(tmp, doc)
        with run.job.open("a") as f:
            f.write(alerts_toml(hook.url, port))
        os.environ[PASSWORD_ENV] = "pw-secret"  # the daemon inherits it; the file names only the variable
        try:
            run.start()
            run.wait_step(3, timeout=180)
            yield Live(run, hook, mail)
        finally:
            os.environ.pop(PASSWORD_ENV, None)
            run.cleanup()
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


def _steady(live: Live) -> int:
    """Waits for 3 steps of the running attempt (a hang at start-up is a lost heartbeat); returns it."""
    client = live.run.client()

    def trained() -> tuple[int] | None:  # a tuple: attempt 0 is falsy
        attempt = int(client.status()["attempt"] or 0)
        recent = client.steps(since=max(0, int(client.status()["step"] or 0) - 3))
        return (attempt,) if len([s for s in recent if s.get("attempt") == attempt]) >= 3 else None

    return int(live.run.wait("3 steps of the running attempt", trained, 300)[0])


def _inject_hang(live: Live) -> int:
    """Freezes trainer 1 at its next step; returns the attempt it hangs in."""
    client = live.run.client()
    attempt = _steady(live)
    hangs = len(live.run.events("collective_hang"))
    client.inject("hang", role="trainer", rank=1)
    live.run.wait("the hang's diagnosis", lambda: len(live.run.events("collective_hang")) > hangs, 90)
    return attempt


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of the one sample of ``name`` carrying ``labels`` (and any others), else 0."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1).split(",") for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


def _alert(live: Live, alertname: str, attempt: int) -> dict[str, Any] | None:
    for a in live.run.client().alerts()["alerts"]:
        if a["labels"]["alertname"] == alertname and a["labels"].get("attempt") == str(attempt):
            return dict(a)
    return None


def test_hang_reaches_webhook_and_mail_firing_then_resolved_once_each(live: Live) -> None:
    attempt = _inject_hang(live)
    fired = live.run.wait("CollectiveHang at the webhook", lambda: live.hook.alerts("CollectiveHang"), 30)
    (_, status, fp) = fired[0]
    assert status == "firing"
    live.run.wait("a resumed attempt", lambda: (live.run.client().status()["attempt"] or 0) > attempt, 120)
    live.run.wait(
        "the resolve at the webhook", lambda: ("CollectiveHang", "resolved", fp) in live.hook.alerts(), 30
    )
    time.sleep(2)  # a duplicate would come within the dispatcher's next polls
    assert live.hook.alerts("CollectiveHang") == [
        ("CollectiveHang", "firing", fp),
        ("CollectiveHang", "resolved", fp),
    ]
    # One page per incident: the attempt the hang ended is inhibited, not paged.
    assert str(attempt) not in live.hook.attempts("AttemptFailed")
    failed = _alert(live, "AttemptFailed", attempt)
    assert failed is not None and failed["status"] == "resolved"
    body = live.hook.accepted[0]
    assert body["version"] == "4" and body["receiver"] == "hook"
    notes = body["alerts"][0]["annotations"]
    assert "trainer 1" in notes["evidence"] and notes["action"]
    assert body["alerts"][0]["generatorURL"].startswith("http://127.0.0.1:8501/incidents?")
    # The same page as mail, with the password from the daemon's environment.
    mail = live.run.wait("the mail", lambda: [m for m in live.mail if b"CollectiveHang" in m.content], 30)
    assert mail[0].rcpt_tos == ["oncall@example.org"]
    assert b"Subject: [FIRING:1]" in mail[0].content
    metrics = httpx.get(live.run.client().url + "/metrics").text
    assert _sample(metrics, "milepost_notifications_total", receiver="hook", outcome="ok") >= 2
    assert _sample(metrics, "milepost_alerts", alertname="CollectiveHang", state="resolved") == 1


def test_alerts_test_command_prints_the_receivers_answer(live: Live) -> None:
    out = subprocess.run(
        [*MILEPOST, "alerts", "test", "--receiver", "hook", "--run-dir", str(live.run.run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "receiver hook: ok; answered: HTTP 200 ok" in out.stdout
    assert live.hook.alerts("MilepostTest")


def test_silence_needs_the_token_and_mutes_delivery(live: Live) -> None:
    url = live.run.client().url + "/api/v1/silences"
    body = {"matchers": ["alertname=AttemptFailed"], "duration_s": 3600, "comment": "known"}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.delete(url + "/0123abcd").status_code == 401
    client = live.run.client()
    sil = client.silence(body["matchers"], 3600, comment="known")
    assert sil["active"] and [s["id"] for s in client.silences()] == [sil["id"]]
    # A failed attempt, not a hang: AttemptFailed fires, silenced.
    attempt = _steady(live)
    client.inject("exception", role="trainer", rank=0)
    failed = live.run.wait(
        "AttemptFailed, silenced",
        lambda: (a := _alert(live, "AttemptFailed", attempt)) and a["silenced_by"] and a,
        90,
    )
    assert failed["silenced_by"] == [sil["id"]]
    live.run.wait("a resumed attempt", lambda: (client.status()["attempt"] or 0) > attempt, 120)
    time.sleep(2)
    assert str(attempt) not in live.hook.attempts("AttemptFailed")
    # A second silence, expired through the CLI; the first one stays for the restart below.
    other = client.silence(["alertname=Straggler", "rank=1"], 600)
    out = subprocess.run(
        [*MILEPOST, "alerts", "unsilence", other["id"], "--run-dir", str(live.run.run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert not next(s for s in client.silences() if s["id"] == other["id"])["active"]
    listed = subprocess.run(
        [*MILEPOST, "alerts", "list", "--run-dir", str(live.run.run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert f"silence {sil['id']}: alertname=AttemptFailed" in listed.stdout
    assert "resolved  critical CollectiveHang" in listed.stdout


def test_receiver_down_60s_and_daemon_sigkilled_still_gets_everything_once_in_order(live: Live) -> None:
    run, hook = live.run, live.hook
    before = len(hook.alerts())
    _steady(live)  # the outage starts when the hang is injected, not while an attempt starts up
    hook.refuse_until = time.time() + OUTAGE_S
    attempt = _inject_hang(live)
    client = run.client()
    run.wait("a resumed attempt", lambda: (client.status()["attempt"] or 0) > attempt, 120)
    run.wait(
        "firing and resolved both waiting in the outbox",
        lambda: (
            (a := _alert(live, "CollectiveHang", attempt))
            and a["status"] == "resolved"
            and client.alerts()["delivery"]["pending"].get("hook", 0) >= 2
        ),
        60,
    )
    assert hook.refused >= 1 and len(hook.alerts()) == before
    silences = client.silences()
    run.kill_daemon()
    run.start()  # re-attaches to the running attempt; the outbox and the state come back
    client = run.client()
    assert client.silences() == silences  # silences survive the restart
    assert run.events("daemon_reattached")
    restarted = run.wait(
        "DaemonRestarted",
        lambda: [a for a in client.alerts()["alerts"] if a["labels"]["alertname"] == "DaemonRestarted"],
        10,
    )
    assert restarted[0]["status"] == "firing"
    got = run.wait(
        "both notifications after the outage",
        lambda: ("CollectiveHang", "resolved") in [x[:2] for x in hook.alerts()[before:]],
        OUTAGE_S + 60,
    )
    time.sleep(3)
    fp = next(x[2] for x in hook.alerts()[before:] if x[0] == "CollectiveHang")
    mine = [x[1] for x in hook.alerts("CollectiveHang") if x[2] == fp]
    assert mine == ["firing", "resolved"], got
    run.wait("an empty outbox", lambda: not client.alerts()["delivery"]["pending"].get("hook"), 30)
