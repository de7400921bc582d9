"""The dashboard's API views: the rank matrix, collective buckets, the recovery timeline, evidence,
step traces and checkpoint sizes, over a real Store and a real uvicorn server (fake controller)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon.api import create_app
from milepost.daemon.api_views import ViewHistory, recovery_timeline
from milepost.daemon.client import DaemonClient, DaemonError
from milepost.daemon.store import Store
from milepost.dashboard import cli as dashboard_cli

from tests.servers import FakeController, serve

pytestmark = pytest.mark.timeout(60)


def report(
    rank: int, *, hist: list[tuple[int, float]], ts: float = 1000.0, count: int = 0, **extra: Any
) -> dict[str, Any]:
    return {
        "role": "trainer",
        "rank": rank,
        "attempt": 0,
        "ts": ts,
        "compute_hist": hist,
        "collectives": {
            "all_reduce|world": {"count": count, "seconds": 0.1 * count, "bytes": 1000 * count, "world": 4}
        },
        **extra,
    }


def test_matrix_pages_sorts_and_aggregates_over_every_rank() -> None:
    h = ViewHistory()
    for r in range(10):
        h.on_report(report(r, hist=[(s, 1.0 + (2.0 if r == 7 else 0.0)) for s in range(1, 21)]))
    m = h.matrix("trainer", steps=5, offset=0, limit=3, sort="score")
    assert m["steps"] == [16, 17, 18, 19, 20] and m["total_ranks"] == 10
    assert m["ranks"][0] == 7 and m["scores"][0] == pytest.approx(3.0)  # the slow rank sorts first
    assert len(m["ranks"]) == 3 and all(len(row) == 5 for row in m["values"])
    assert m["aggregate"]["max"] == [3.0] * 5 and m["aggregate"]["p50"] == [1.0] * 5
    page2 = h.matrix("trainer", steps=5, offset=3, limit=3, sort="rank")
    assert page2["ranks"] == [3, 4, 5]
    assert h.matrix("rollout", steps=5, offset=0, limit=3, sort="rank")["total_ranks"] == 0


def test_matrix_keeps_a_bounded_history_per_rank() -> None:
    h = ViewHistory()
    for s in range(1, 1000):
        h.add_compute("trainer", 0, s, 0.5)
    assert len(h.compute[("trainer", 0)]) <= ViewHistory.KEEP_STEPS + 32
    assert h.matrix("trainer", 200, 0, 1, "rank")["steps"][-1] == 999


def test_collective_buckets_take_deltas_and_bus_bandwidth() -> None:
    h = ViewHistory()
    h.on_report(report(0, hist=[], ts=1000.0, count=10))
    h.on_report(
        report(0, hist=[], ts=1001.0, count=30, recent_collectives=[["world", 30, "all_reduce", 1001.0, 0.4]])
    )
    (b,) = h.series(since=0)
    assert b["op"] == "all_reduce" and b["group"] == "world" and b["count"] == 30
    assert b["mean_s"] == pytest.approx(0.1) and b["max_s"] == pytest.approx(0.4)
    # algbw 1000 B / 0.1 s = 10 kB/s; all_reduce over 4 ranks: x 2*3/4
    assert b["busbw_bytes_per_second"] == pytest.approx(10_000 * 1.5)


def test_recovery_timeline_orders_the_stages_it_reached() -> None:
    diag = {"detected_at": 110.0, "onset_at": 100.0, "kind": "frozen_rank"}
    events = [
        {"kind": "fault_injected", "ts": 99.0, "message": "hang"},
        {"kind": "attempt_killed", "ts": 111.0, "message": "killed"},
        {"kind": "attempt_launched", "ts": 90.0, "message": "attempt 0"},  # before: not the restart
        {"kind": "attempt_launched", "ts": 112.0, "message": "attempt 1"},
        {"kind": "resume_verified", "ts": 120.0, "message": "ok"},
    ]
    points = recovery_timeline(diag, events, [{"step": 7, "ts": 119.0}, {"step": 8, "ts": 125.0}])
    assert [p["stage"] for p in points] == [
        "fault",
        "detected",
        "attempt ended",
        "restarted",
        "resume verified",
        "first step",
    ]
    assert points[0]["ts"] == 99.0 and points[3]["detail"] == "attempt 1" and points[-1]["detail"] == "step 8"
    partial = recovery_timeline(diag, events[:2], [])
    assert [p["stage"] for p in partial] == ["fault", "detected", "attempt ended"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[DaemonClient, Store, Any]]:
    store = Store(tmp_path)
    app = create_app(store, FakeController(store), token="tok", require_token_for_reads=False)
    with serve(app) as url, DaemonClient(url, token="tok") as client:
        yield client, store, app
    store.close()


def test_routes_serve_matrix_collectives_evidence_timeline_and_sizes(
    served: tuple[DaemonClient, Store, Any], tmp_path: Path
) -> None:
    client, store, app = served
    app.state.view_history.on_report(report(0, hist=[(1, 0.2), (2, 0.3)], ts=time.time(), count=3))
    m = client.rank_matrix(steps=10, limit=5, sort="last")
    assert m["ranks"] == [0] and m["values"] == [[0.2, 0.3]] and m["last"] == [0.3]
    coll = client.collectives(window_s=3600)
    assert coll["series"][0]["count"] == 3 and coll["in_flight"] == []

    stack = tmp_path / "diagnostics" / "diagnosis_1" / "stack_trainer1.txt"
    stack.parent.mkdir(parents=True)
    stack.write_text("Thread 1 (idle): MainThread\n    all_reduce (torch/distributed.py:1)\n")
    fr = tmp_path / "diagnostics" / "fr_attempt0_trainer0_world_5.json"
    fr.write_text(
        json.dumps(
            {
                "role": "trainer",
                "rank": 0,
                "stuck": {"op": "all_reduce", "seq": 5},
                "flight_recorder": {"pg_status": {"0": {"last_enqueued_collective": 5}}, "entries": [{}] * 3},
            }
        )
    )
    diag_id = store.add_diagnosis(
        {
            "kind": "frozen_rank",
            "culprit_ranks": [["trainer", 1]],
            "detected_at": 10.0,
            "onset_at": 5.0,
            "phases": {"trainer 0": "train@3"},
            "evidence": {
                "stacks": {"trainer1": str(stack), "evil": "/etc/passwd"},
                "flight_recorder": [str(fr)],
            },
        }
    )
    ev = client.evidence(diag_id)
    assert "all_reduce" in ev["stacks"]["trainer1"] and "not served" in ev["stacks"]["evil"]
    assert ev["flight_recorder"][0]["entries"] == 3 and ev["phases"] == {"trainer 0": "train@3"}
    assert [p["stage"] for p in client.recovery_timeline(diag_id)] == ["fault", "detected"]
    with pytest.raises(DaemonError) as e:
        client.evidence(diag_id + 100)
    assert e.value.status_code == 404
    with pytest.raises(DaemonError) as e:
        client.step_trace(3)
    assert e.value.status_code == 404 and "step 3" in e.value.message

    ckpt = tmp_path / "checkpoints" / "step_2"
    ckpt.mkdir(parents=True)
    (ckpt / "shard0").write_bytes(b"x" * 1234)
    store.upsert_checkpoint(2, path=str(ckpt), status="committed")
    assert client.checkpoints()[0]["size_bytes"] == 1234
    doc = client._http.get("/openapi.json").json()
    for path in ("/api/v1/ranks/matrix", "/api/v1/collectives", "/api/v1/diagnoses/{diag_id}/timeline"):
        assert path in doc["paths"]


def test_matrix_refuses_bad_queries_naming_the_field(served: tuple[DaemonClient, Store, Any]) -> None:
    client, _, _ = served
    with pytest.raises(DaemonError) as e:
        client.rank_matrix(sort="fastest")
    assert e.value.status_code == 422 and "sort" in e.value.message
    with pytest.raises(DaemonError) as e:
        client.rank_matrix(limit=0)
    assert "limit" in e.value.message


def test_dashboard_cli_checks_its_flags_and_passes_them_as_environment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = dashboard_cli.parse(["--run-dir", "runs/x", "--port", "8600", "--refresh-s", "1.5"])
    env = dashboard_cli.environment(args, base={})
    assert (
        env["MILEPOST_DASHBOARD_RUN_DIR"].endswith("runs/x") and env["MILEPOST_DASHBOARD_REFRESH_S"] == "1.5"
    )
    assert "--server.port=8600" in dashboard_cli.streamlit_command(8600, "127.0.0.1")
    for bad, needle in (
        (["--port", "0"], "--port"),
        (["--api", "ftp://x"], "--api"),
        (["--refresh-s", "0"], "--refresh-s"),
    ):
        with pytest.raises(SystemExit):
            dashboard_cli.parse(bad)
        assert needle in capsys.readouterr().err
