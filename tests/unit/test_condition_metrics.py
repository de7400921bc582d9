"""The series the Prometheus alerting rules need beyond the counters: open hangs, a failed
attempt, a failed resume verification, a rank's lost heartbeat, the newest checkpoint
failure, the daemon's start time and the run dir's disk, fed the way the supervisor feeds
RunMetrics."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon.condition_metrics import MAX_HANGS
from milepost.daemon.metrics import RunMetrics
from prometheus_client.exposition import generate_latest

pytestmark = pytest.mark.timeout(30)

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make(run_dir: Path | None = None, clock: Clock | None = None) -> RunMetrics:
    run: dict[str, Any] = {"id": "run-1", "state": "RUNNING", "created_at": T0 - 100.0, "updated_at": T0}
    if run_dir is not None:
        run["run_dir"] = str(run_dir)
    return RunMetrics(run_info=lambda: run, heartbeat_timeouts={"trainer": 20.0}, clock=clock or Clock())


def ev(kind: str, attempt: int | None = 0, severity: str = "info", **data: Any) -> dict[str, Any]:
    return {"kind": kind, "attempt": attempt, "severity": severity, "ts": T0, "data": data}


def series(m: RunMetrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    fams = [f for f in m.registry.collect() if f.name == name]
    return {tuple(sorted(s.labels.items())): s.value for f in fams for s in f.samples}


def hang_labels(attempt: str, op: str, group: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"run_id": "run-1", "attempt": attempt, "op": op, "group": group}.items()))


def test_a_hang_is_open_until_the_next_attempt_launches() -> None:
    m = make()
    m.on_event(ev("attempt_launched"))
    assert series(m, "milepost_collective_hang_open") == {}
    m.on_event(ev("collective_hang", severity="critical", op="reduce_scatter", group="world"))
    assert series(m, "milepost_collective_hang_open") == {hang_labels("0", "reduce_scatter", "world"): 1.0}
    m.on_event(ev("attempt_killed", severity="warning"))
    m.on_event(ev("restart_scheduled", severity="warning"))
    assert series(m, "milepost_collective_hang_open") == {hang_labels("0", "reduce_scatter", "world"): 1.0}
    m.on_event(ev("attempt_launched", attempt=1))
    assert series(m, "milepost_collective_hang_open") == {hang_labels("0", "reduce_scatter", "world"): 0.0}
    # An older daemon's spelling opens one too; the run's success closes it.
    m.on_event(ev("CollectiveHang", attempt=1, op="all_reduce", group="dp"))
    assert series(m, "milepost_collective_hang_open")[hang_labels("1", "all_reduce", "dp")] == 1.0
    m.on_event(ev("run_succeeded", attempt=None))
    assert set(series(m, "milepost_collective_hang_open").values()) == {0.0}


def test_hang_series_stay_bounded_and_closed_ones_leave_first() -> None:
    m = make()
    m.on_event(ev("collective_hang", op="all_reduce", group="open-one"))
    m.on_event(ev("attempt_launched", attempt=1))
    for a in range(1, MAX_HANGS + 5):
        m.on_event(ev("collective_hang", attempt=a, op="all_gather", group="world"))
        m.on_event(ev("attempt_launched", attempt=a + 1))
    m.on_event(ev("collective_hang", attempt=99, op="broadcast", group="world"))
    got = series(m, "milepost_collective_hang_open")
    assert len(got) == MAX_HANGS
    assert got[hang_labels("99", "broadcast", "world")] == 1.0  # the newest, open, is kept
    assert hang_labels("0", "all_reduce", "open-one") not in got  # the oldest closed left


def test_an_attempt_that_ended_with_an_error_is_failed_until_the_next_launches() -> None:
    m = make()
    m.on_event(ev("attempt_launched"))
    assert series(m, "milepost_attempt_failed") == {(("attempt", "0"), ("run_id", "run-1")): 0.0}
    m.on_event(ev("attempt_ended", severity="info"))  # a clean end is no failure
    assert series(m, "milepost_attempt_failed") == {(("attempt", "0"), ("run_id", "run-1")): 0.0}
    m.on_event(ev("attempt_ended", severity="error", cause="actor_died"))
    assert series(m, "milepost_attempt_failed") == {(("attempt", "0"), ("run_id", "run-1")): 1.0}
    m.on_event(ev("attempt_launched", attempt=1))
    assert series(m, "milepost_attempt_failed") == {(("attempt", "1"), ("run_id", "run-1")): 0.0}


def test_a_resume_mismatch_holds_until_a_commit() -> None:
    m = make()
    m.on_event(ev("attempt_launched", attempt=2))
    m.on_event(ev("resume_verification_failed", attempt=2, severity="error"))
    assert series(m, "milepost_resume_mismatch") == {(("attempt", "2"), ("run_id", "run-1")): 1.0}
    m.on_event(ev("checkpoint_committed", attempt=2, total_s=0.5))
    assert series(m, "milepost_resume_mismatch") == {(("attempt", "2"), ("run_id", "run-1")): 0.0}


def test_a_silent_rank_has_lost_its_heartbeat_an_exited_one_has_not() -> None:
    clock = Clock()
    m = make(clock=clock)
    for rank, state in ((0, "running"), (1, "exited")):
        m.on_report({"attempt": 0, "role": "trainer", "rank": rank, "ts": T0, "host": "n1", "state": state})

    def lost(rank: int) -> float | None:
        labels = {"run_id": "run-1", "role": "trainer", "rank": str(rank), "attempt": "0"}
        return m.registry.get_sample_value("milepost_worker_heartbeat_lost", labels)

    assert (lost(0), lost(1)) == (0.0, 0.0)
    clock.now += 21  # past the trainer heartbeat timeout: both are down, only rank 0 is lost
    assert (lost(0), lost(1)) == (1.0, 0.0)
    up = {"run_id": "run-1", "role": "trainer", "node": "n1", "attempt": "0"}
    assert [m.registry.get_sample_value("milepost_worker_up", {**up, "rank": str(r)}) for r in (0, 1)] == [
        0.0,
        0.0,
    ]
    m.on_report(
        {"attempt": 0, "role": "trainer", "rank": 0, "ts": clock.now, "host": "n1", "state": "running"}
    )
    assert lost(0) == 0.0


def test_checkpoint_failure_time_and_daemon_start_time() -> None:
    m = make()
    assert m.registry.get_sample_value("milepost_daemon_start_timestamp_seconds", {"run_id": "run-1"}) == T0
    labels = {"run_id": "run-1"}
    assert m.registry.get_sample_value("milepost_last_checkpoint_failure_timestamp_seconds", labels) == 0.0
    failed = ev("checkpoint_failed", severity="warning")
    failed["ts"] = T0 + 7
    m.on_event(failed)
    assert m.registry.get_sample_value("milepost_last_checkpoint_failure_timestamp_seconds", labels) == T0 + 7


def test_run_dir_disk_is_the_filesystem_of_the_run_dir(tmp_path: Path) -> None:
    m = make(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    size = m.registry.get_sample_value("milepost_run_dir_filesystem_size_bytes", {"run_id": "run-1"})
    avail = m.registry.get_sample_value("milepost_run_dir_filesystem_avail_bytes", {"run_id": "run-1"})
    assert size == float(usage.total)
    assert avail is not None and 0 < avail <= size
    gone = make(tmp_path / "missing")  # an unreadable run dir: no series, and the scrape still works
    assert series(gone, "milepost_run_dir_filesystem_size_bytes") == {}
    assert b"milepost_steps_total" in generate_latest(gone.registry)
