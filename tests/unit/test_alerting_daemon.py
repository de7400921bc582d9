"""The daemon's alerting: DaemonAlerting over a real store and outbox, and its routes over a real
uvicorn server (token before body, silences surviving a restart, secrets never shown)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from milepost.daemon.alerting import DaemonAlerting
from milepost.daemon.api import create_app
from milepost.daemon.client import DaemonClient, DaemonError
from milepost.daemon.metrics import RunMetrics
from milepost.daemon.store import Store
from milepost.engine.contract.config import AlertsConfig
from milepost.engine.contract.routes import ALERTS_PATH, ALERTS_TEST_PATH, SILENCES_PATH

from tests.servers import FakeController, serve
from tests.unit.test_alerts_receivers import Capture, capture_server

pytestmark = pytest.mark.timeout(60)

TOKEN = "t0ken"
SECRET = "http://127.0.0.1:9/SECRET-PART"  # nothing listens: a refused connection


def config(url: str) -> AlertsConfig:
    return AlertsConfig.model_validate(
        {
            "group_wait_s": 0,
            "group_interval_s": 0,
            "receivers": [
                {"name": "hook", "type": "webhook", "url": url},
                {"name": "slack", "type": "slack", "url_env": "MP_TEST_SLACK_URL"},
                {"name": "secret-hook", "type": "webhook", "url_env": "MP_TEST_HOOK_URL"},
            ],
            "routes": [{"receivers": ["hook"], "min_severity": "error"}],
        }
    )


def ev(kind: str, attempt: int = 0, severity: str = "info", **data: Any) -> dict[str, Any]:
    return {"kind": kind, "message": kind, "severity": severity, "attempt": attempt, "data": data}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Store, Capture, AlertsConfig]]:
    store = Store(tmp_path)
    store.ensure_run(run_id="r1", name="t", job="j", run_dir=str(tmp_path), target_steps=10)
    with capture_server() as cap:
        yield store, cap, config(cap.url)
    store.close()


def alerting(store: Store, cfg: AlertsConfig, env: dict[str, str] | None = None) -> DaemonAlerting:
    env = {"MP_TEST_HOOK_URL": SECRET} if env is None else env
    return DaemonAlerting(cfg, Path(store.path).parent, store, RunMetrics(), env=env, tick_s=0.05)


def test_a_hang_is_delivered_and_the_state_survives_a_restart(
    setup: tuple[Store, Capture, AlertsConfig],
) -> None:
    store, cap, cfg = setup
    a = alerting(store, cfg)
    a.on_event(ev("attempt_launched"))
    a.on_event(
        ev("collective_hang", 0, "critical", group="world", op="all_reduce", culprit_ranks=[["trainer", 1]])
    )
    assert a.tick() == 1
    deadline = time.time() + 10
    while not cap.bodies() and time.time() < deadline:
        time.sleep(0.05)
    (body,) = cap.bodies()
    assert body["alerts"][0]["labels"]["alertname"] == "CollectiveHang"
    assert "trainer 1" in body["alerts"][0]["annotations"]["evidence"]
    a.close()
    b = alerting(store, cfg)  # a restarted daemon: same store, same outbox
    (hang,) = [x for x in b.alerts() if x["status"] == "firing"]
    assert hang["labels"]["alertname"] == "CollectiveHang"  # type: ignore[index]
    b.on_event(ev("attempt_launched", 1))
    assert b.tick() == 1  # the resolve, not a second firing
    b.close()


def test_silence_routes_token_first_then_body_and_survive_restart(
    setup: tuple[Store, Capture, AlertsConfig],
) -> None:
    store, _, cfg = setup
    a = alerting(store, cfg).start()
    app = create_app(store, FakeController(store), token=TOKEN, require_token_for_reads=False, alerting=a)
    with serve(app) as url:
        # No token: refused before the body is read (this one is not even JSON).
        assert httpx.post(url + SILENCES_PATH, content=b"{not json").status_code == 401
        assert httpx.delete(url + SILENCES_PATH + "/abc").status_code == 401
        assert httpx.post(url + ALERTS_TEST_PATH, json={"receiver": "hook"}).status_code == 401
        client = DaemonClient(url, token=TOKEN)
        with pytest.raises(DaemonError) as bad:
            client.silence(["alertname"], 60)
        assert bad.value.status_code == 400 and "'alertname'" in bad.value.message
        with pytest.raises(DaemonError) as neg:
            client.silence(["alertname=X"], -1)
        assert neg.value.status_code == 422 and "duration_s" in neg.value.message
        sil = client.silence(["alertname=CollectiveHang", "rank=1"], 600, comment="known")
        assert sil["active"] and sil["matchers"][1] == {"name": "rank", "op": "=", "value": "1"}
        keep = client.silence(["alertname=Straggler"], 600)
        assert client.unsilence(sil["id"])["active"] is False
        with pytest.raises(DaemonError) as gone:
            client.unsilence(sil["id"])
        assert gone.value.status_code == 404
        # Secrets: a held receiver says which variable is missing, never a value.
        delivery = client.alerts()["delivery"]
        assert "MP_TEST_SLACK_URL" in delivery["held"]["slack"]
        out = client.test_receiver("secret-hook")  # nothing listens there: a refused connection
        assert out["status"] == "retry" and "SECRET-PART" not in str(out)
        assert client.test_receiver("hook")["status"] == "ok"
        with pytest.raises(DaemonError) as unknown:
            client.test_receiver("nope")
        assert unknown.value.status_code == 404 and "hook" in unknown.value.message
        doc = httpx.get(url + "/openapi.json").json()
        assert "requestBody" in doc["paths"][SILENCES_PATH]["post"]
        assert {ALERTS_PATH, SILENCES_PATH, SILENCES_PATH + "/{silence_id}"} <= set(doc["paths"])
    a.close()
    b = alerting(store, cfg)
    assert {s.id: s.active(time.time()) for s in b.silences()} == {sil["id"]: False, keep["id"]: True}
    b.close()
