"""Daemon HTTP API: bearer auth, validation (4xx, never 5xx), the typed client and `milepost status`.

A real uvicorn server on 127.0.0.1 serves the app over a real Store and a fake controller.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from milepost.daemon.api import create_app
from milepost.daemon.auth import TOKEN_ENV, load_or_create_token, read_token, token_path
from milepost.daemon.client import DaemonClient, DaemonError, DaemonUnreachable
from milepost.daemon.status_cli import format_status, main_status
from milepost.daemon.store import Store

from tests.servers import AppSlot, FakeController, free_port, serve

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def report(**overrides: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "v": 1,
        "attempt": 1,
        "role": "trainer",
        "rank": 0,
        "seq": 1,
        "ts": 1_700_000_050.0,
        "pid": 4242,
        "host": "node-a",
        "step": 3,
        "phase": "train",
        "state": "running",
        "open_collectives": [
            {
                "op": "all_reduce",
                "group": "dp",
                "seq": 17,
                "nbytes": 4096,
                "dtype": "float32",
                "enter_ts": 1.0,
            }
        ],
        "timings": {"step_s": 0.5},
        "metrics": {"loss": 1.25},
        "counters": {"dropped": 0},
    }
    r.update(overrides)
    return r


def seeded_store(run_dir: Path) -> Store:
    store = Store(run_dir)
    store.ensure_run(run_id="run-1", name="tiny", job="job.toml", run_dir=str(run_dir), target_steps=12)
    store.set_run_state("RUNNING")
    store.add_attempt(0, pid=100, world_size=2)
    store.update_attempt(0, state="FAILED", exit_code=-9, ended_at=1.0)
    store.add_attempt(1, pid=101, world_size=2)
    for i, kind in enumerate(
        ["attempt_started", "rank_lost", "attempt_started", "resume_verified", "step_slow"]
    ):
        store.add_event(
            {"kind": kind, "message": f"event {i}", "attempt": 0 if i < 2 else 1, "data": {"i": i}}
        )
    for step in (1, 2, 3):
        store.add_step(
            {"step": step, "attempt": 1, "reward": 0.1 * step, "loss": float("nan") if step == 3 else 1.0}
        )
    store.upsert_checkpoint(2, path="/ckpt/2", status="committed", world_size=2, committed_at=2.0, attempt=1)
    return store


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = seeded_store(tmp_path)
    yield s
    s.close()


@pytest.fixture
def controller(store: Store) -> FakeController:
    return FakeController(store)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[AppSlot, str]]:
    slot = AppSlot()
    with serve(slot) as url:
        yield slot, url


@pytest.fixture
def serve_app(server: tuple[AppSlot, str]) -> Iterator[Callable[[Any], str]]:
    """Puts an app in the module's server; returns the server's URL."""
    slot, url = server

    def put(app: Any) -> str:
        slot.app = app
        return url

    yield put
    slot.app = None


@pytest.fixture
def url(store: Store, controller: FakeController, serve_app: Callable[[Any], str]) -> str:
    return serve_app(create_app(store, controller, token=TOKEN, require_token_for_reads=False))


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=5.0, trust_env=False) as c:
        yield c


# -- token ----------------------------------------------------------------------
def test_token_file_is_private_and_stable(tmp_path: Path) -> None:
    assert read_token(tmp_path) is None
    token = load_or_create_token(tmp_path)
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(token_path(tmp_path)).st_mode) == 0o600
    assert load_or_create_token(tmp_path) == token == read_token(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["token"]  # no temp file left behind


def test_env_token_wins_and_creates_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert load_or_create_token(tmp_path) == "from-env"
    assert not token_path(tmp_path).exists()


# -- auth -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("POST", "/api/v1/control/pause", None), ("POST", "/api/v1/ingest", {"reports": [report()]})],
)
def test_writes_need_the_token(http: httpx.Client, method: str, path: str, body: Any) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = http.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
    r = http.request(method, path, json=body, headers=AUTH)
    assert r.status_code == 200, r.text


READS = [
    "/api/v1/status",
    "/api/v1/goodput",
    "/api/v1/ranks",
    "/api/v1/attempts",
    "/api/v1/events",
    "/api/v1/steps",
    "/api/v1/checkpoints",
]


def test_reads_are_open_on_loopback(http: httpx.Client) -> None:
    for path in ["/healthz", *READS]:
        assert http.get(path).status_code == 200, path


def test_reads_need_the_token_when_required(
    store: Store, controller: FakeController, serve_app: Callable[[Any], str]
) -> None:
    url = serve_app(create_app(store, controller, token=TOKEN, require_token_for_reads=True))
    with httpx.Client(base_url=url, trust_env=False) as http:
        assert http.get("/healthz").json() == {"ok": True}
        for path in READS:
            assert http.get(path).status_code == 401, path
            assert http.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
            assert http.get(path, headers=AUTH).status_code == 200, path


def test_openapi_documents_bearer_security(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "the run's token (<run_dir>/token)",
    }
    assert doc["paths"]["/api/v1/ingest"]["post"]["security"] == [{"bearer": []}]
    assert "Report" in doc["components"]["schemas"]


# -- validation -----------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [
        {},
        {"reports": "x"},
        {"reports": [{}]},
        {"reports": [report(rank=-1)]},
        {"reports": [report(rank="zero")]},
        {"reports": [report(role="critic")]},
        {"reports": [report(seq=i) for i in range(5001)]},
        [1, 2, 3],
    ],
)
def test_bad_ingest_bodies_are_422(http: httpx.Client, body: Any) -> None:
    r = http.post("/api/v1/ingest", json=body, headers=AUTH)
    assert r.status_code == 422, r.text


@pytest.mark.parametrize(
    "bad",
    [
        {k: v for k, v in report().items() if k != "step"},
        report(ts="yesterday"),
        report(step=2**64),
        report(open_collectives=[{"op": "all_reduce"}]),
        report(metrics={"loss": "high"}),
        report(compute={"train": float("inf")}),
    ],
)
def test_a_bad_report_is_refused_alone_and_the_rest_of_its_batch_is_kept(
    http: httpx.Client, controller: FakeController, bad: dict[str, Any]
) -> None:
    bad = {**bad, "rank": 1}
    body = json.dumps({"reports": [report(seq=1), bad, report(seq=2)]})  # inf goes out as Infinity
    r = http.post("/api/v1/ingest", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["accepted"], got["rejected"]) == (2, 1)
    assert got["errors"][0]["loc"][:3] == ["body", "reports", 1]
    assert [(x["role"], x["rank"]) for x in controller.store.ranks()] == [("trainer", 0)]
    scrape = http.get("/metrics").text
    assert 'milepost_reports_rejected_total{role="trainer",run_id=""} 1.0' in scrape


def test_non_json_ingest_is_4xx(http: httpx.Client) -> None:
    r = http.post(
        "/api/v1/ingest", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert 400 <= r.status_code < 500


def test_nan_metric_is_accepted(http: httpx.Client, controller: FakeController) -> None:
    body = '{"reports": [' + json.dumps(report(metrics={"loss": float("nan")})) + "]}"
    r = http.post("/api/v1/ingest", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": 1, "control": [], "faults": []}


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/events?limit=0",
        "/api/v1/events?limit=5001",
        "/api/v1/events?since_id=-1",
        "/api/v1/events?since_id=99999999999999999999",
        "/api/v1/events?attempt=x",
        "/api/v1/steps?since=-5",
        "/api/v1/steps?limit=0",
    ],
)
def test_bad_query_params_are_422(http: httpx.Client, path: str) -> None:
    assert http.get(path).status_code == 422


def test_unknown_action_is_4xx_and_refused_action_is_409(http: httpx.Client) -> None:
    assert http.post("/api/v1/control/explode", headers=AUTH).status_code == 422
    assert http.post("/api/v1/control/resume", headers=AUTH).status_code == 409
    assert http.post("/api/v1/control/resume", headers=AUTH).json() == {
        "detail": "cannot resume a RUNNING run"
    }


def test_unexpected_error_is_clean_json_500(http: httpx.Client, controller: FakeController) -> None:
    controller.fail_with = RuntimeError("boom")
    r = http.get("/api/v1/status")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error: RuntimeError"}
    controller.fail_with = None
    assert http.get("/api/v1/status").status_code == 200  # the server survived


# -- client ---------------------------------------------------------------------
def test_client_round_trips_every_endpoint(url: str, http: httpx.Client, controller: FakeController) -> None:
    with DaemonClient(url, token=TOKEN) as c:
        assert c.healthz() == {"ok": True}
        st = c.status()
        assert (st["state"], st["step"], st["target_steps"], st["goodput"]) == ("RUNNING", 3, 12, 0.75)
        assert c.goodput()["badput"]["recovery_s"] == 8.0
        assert [a["number"] for a in c.attempts()] == [0, 1]
        assert c.attempts()[0]["exit_code"] == -9

        events = c.events()
        assert [e["id"] for e in events] == [1, 2, 3, 4, 5]
        assert events[0]["data"] == {"i": 0}
        assert [e["id"] for e in c.events(since_id=3)] == [4, 5]
        assert [e["id"] for e in c.events(limit=2, newest_first=True)] == [5, 4]
        assert [e["id"] for e in c.events(kind="attempt_started")] == [1, 3]
        assert [e["id"] for e in c.events(attempt=0)] == [1, 2]
        assert http.get("/api/v1/events", params={"since_id": 3}).json()["last_id"] == 5
        assert http.get("/api/v1/events", params={"since_id": 9}).json() == {"events": [], "last_id": 9}

        steps = c.steps()
        assert [s["step"] for s in steps] == [1, 2, 3]
        assert steps[2]["loss"] is None  # NaN is not JSON: it reads back as null, not a 500
        assert [s["step"] for s in c.steps(since=2)] == [3]
        assert c.checkpoints()[0]["path"] == "/ckpt/2"

        assert c.ranks() == []
        assert http.post(
            "/api/v1/ingest", json={"reports": [report(), report(rank=1)]}, headers=AUTH
        ).is_success
        ranks = c.ranks()
        assert [(r["role"], r["rank"], r["host"], r["step"]) for r in ranks] == [
            ("trainer", 0, "node-a", 3),
            ("trainer", 1, "node-a", 3),
        ]
        assert 0 <= ranks[0]["heartbeat_age_seconds"] < 30

        assert c.control("pause") == {"action": "pause", "accepted": True, "state": "PAUSED"}
        with pytest.raises(DaemonError) as e:
            c.control("pause")
        assert (e.value.status_code, e.value.message) == (409, "cannot pause a PAUSED run")
        with pytest.raises(DaemonError) as e:
            c.events(limit=0)
        assert e.value.status_code == 422 and "limit" in e.value.message
    assert controller.actions == ["pause"]

    with DaemonClient(url) as anonymous, pytest.raises(DaemonError) as e:
        anonymous.control("stop")
    assert e.value.status_code == 401


def test_client_from_run_dir_reads_but_never_creates_token(tmp_path: Path, url: str) -> None:
    with pytest.raises(DaemonUnreachable):
        DaemonClient.from_run_dir(tmp_path)
    (tmp_path / "daemon.json").write_text(json.dumps({"url": url, "pid": os.getpid(), "started_at": 1.0}))
    with DaemonClient.from_run_dir(tmp_path) as c:
        assert c.status()["state"] == "RUNNING"
        with pytest.raises(DaemonError) as e:
            c.control("pause")
        assert e.value.status_code == 401
    assert not token_path(tmp_path).exists()
    token_path(tmp_path).write_text(TOKEN + "\n")
    with DaemonClient.from_run_dir(tmp_path) as c:
        assert c.control("pause")["state"] == "PAUSED"

    with (
        DaemonClient(f"http://127.0.0.1:{free_port()}", timeout_s=2.0) as dead,
        pytest.raises(DaemonUnreachable),
    ):
        dead.healthz()


# -- milepost status ------------------------------------------------------------
def test_format_status_names_state_step_goodput_and_ranks(url: str, http: httpx.Client, store: Store) -> None:
    for i in (5, 6):
        msg = f"event {i}" + ("\n\tclass_name: TrainerRank (a cause quoted from Ray)" if i == 6 else "")
        store.add_event({"kind": "note", "severity": "warning", "message": msg, "attempt": 1})
    http.post("/api/v1/ingest", json={"reports": [report(), report(role="rollout", rank=0)]}, headers=AUTH)
    with DaemonClient(url) as c:
        text = format_status(c)
    assert "run tiny: RUNNING" in text
    assert "step 3/12 (25.0%)" in text
    assert "attempt 1" in text and "world size 2" in text
    assert "goodput 75.0%" in text and "recovery 8.0 s" in text
    assert "trainer" in text and "rollout" in text and "node-a" in text and "4242" in text
    assert "last 5 events" in text and "event 6" in text and "warning" in text
    assert "event 1" not in text and "event 2" in text
    assert "class_name" not in text  # one line an event
    assert "checkpoint: step 2 (committed)" in text


def test_main_status_prints_daemon_view(tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "daemon.json").write_text(json.dumps({"url": url, "pid": 1, "started_at": 1.0}))
    assert main_status(str(tmp_path)) == 0
    assert "run tiny: RUNNING" in capsys.readouterr().out


def test_main_status_without_daemon_falls_back_to_store(
    tmp_path: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.set_run_state("FAILED", "restart budget spent")
    assert main_status(str(tmp_path)) == 1
    out, err = capsys.readouterr()
    assert "daemon.json" in err
    assert "run tiny: FAILED (restart budget spent)" in out
    assert "last step 3/12" in out and "step_slow" in out and "checkpoint: step 2" in out

    (tmp_path / "daemon.json").write_text(json.dumps({"url": f"http://127.0.0.1:{free_port()}"}))
    assert main_status(str(tmp_path)) == 1
    out, err = capsys.readouterr()
    assert "cannot reach the daemon" in err and "run tiny: FAILED" in out


def test_main_status_on_an_empty_dir_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "nothing"
    run_dir.mkdir()
    assert main_status(str(run_dir)) == 1
    assert "no store" in capsys.readouterr().out
    assert list(run_dir.iterdir()) == []
