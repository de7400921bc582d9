"""Months, not minutes: every table and directory that grows with run length is bounded, and the
counts and goodput derived from them stay right past the bound (the store keeps totals)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon.goodput import GoodputLedger
from milepost.daemon.metrics import RunMetrics
from milepost.daemon.retention import Keep, Retainer, prune_diagnostics
from milepost.daemon.store import Store
from milepost.engine.contract.config import RetentionConfig
from milepost.engine.contract.layout import DB_FILE, RunDir

pytestmark = pytest.mark.timeout(60)

PREVIOUS = Path(__file__).parent / "data" / "milepost-schema1.db"


def step(n: int, attempt: int, *, stall: float = 0.0) -> dict[str, Any]:
    return {"step": n, "attempt": attempt, "ts": 1000.0 + n, "step_s": 0.5, "phases": {"checkpoint": stall}}


def count(store: Store, table: str) -> int:
    return int(store._all(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])


def test_steps_are_bounded_and_totals_and_goodput_stay_right(tmp_path: Path) -> None:
    store = Store(tmp_path)
    # Attempt 0 runs steps 1..1000; attempt 1 resumes from step 990 and runs 991..3000.
    records = [step(n, 0, stall=0.1 if n % 10 == 0 else 0.0) for n in range(1, 1001)]
    records += [step(n, 1) for n in range(991, 3001)]
    for r in records:
        store.add_step(r)
    full = GoodputLedger.of(store.iter_steps())
    store.prune(Keep(events=100, steps=200, attempts=5))
    kept = [s["step"] for s in store.iter_steps()]
    assert len(kept) <= 200 + 4  # the newest 200, plus each attempt's first and last
    assert kept[-200:] == list(range(2801, 3001)) and 1 in kept and 1000 not in kept  # 1000 was redone by 1
    totals = store.step_totals()
    assert totals["steps"] == 3000 and totals["max_step"] == 3000 and totals["last_ts"] == 4000.0
    assert totals["step_s"] == pytest.approx(1500.0)  # each step number once: 3000 x 0.5 s
    assert totals["stall_s"] == pytest.approx(99 * 0.1)  # 10..990: step 1000's stall was redone away
    ledger = GoodputLedger.from_totals(totals)
    args: dict[str, Any] = {"created_at": 900.0, "end": 4100.0, "attempts": store.attempts(), "lost_s": 0.0}
    assert ledger.summary(**args) == full.summary(**args)
    m = RunMetrics()
    m.seed_totals(totals)
    assert m.steps._value.get() == 3000 and m.global_step._value.get() == 3000
    assert m.productive._value.get() == pytest.approx(1500.0 - 9.9)
    store.close()


def test_events_are_bounded_and_counts_and_milestones_stay(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for a in range(8):
        store.add_attempt(a, pid=1, world_size=2)
        store.add_event({"kind": "attempt_launched", "message": f"a{a}", "attempt": a})
        for i in range(500):
            store.add_event({"kind": "checkpoint_committed", "message": f"{a}/{i}", "attempt": a})
        store.add_event({"kind": "restart_scheduled", "message": f"r{a}", "attempt": a})
    deleted = store.prune(Keep(events=100, steps=100, attempts=3))
    assert deleted["events"] > 3500
    rows = store.events(limit=10**6)
    assert len(rows) <= 100 + 2 * 3
    launched = [e["attempt"] for e in rows if e["kind"] == "attempt_launched"]
    assert launched == [5, 6, 7]  # the newest attempts' milestones, whatever their age
    assert store.count_events("restart_scheduled") == 8  # the restart policy's count survives
    assert store.count_events("checkpoint_committed") == 4000
    store.close()


def test_report_counters_of_old_attempts_fold_into_a_total(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for a in range(10):
        store.add_attempt(a, pid=1, world_size=64)
        for r in range(64):
            store.set_seen_seq(a, "trainer", r, 100, 99 if r == 0 else 100)  # one report lost per attempt
    assert sum(g["lost"] for g in store.report_gaps()) == 10
    store.prune(Keep(events=100, steps=100, attempts=2))
    assert count(store, "reports_seen") == 2 * 64
    assert sum(g["lost"] for g in store.report_gaps()) == 10
    store.prune(Keep(events=100, steps=100, attempts=2))  # again: nothing counted twice
    assert sum(g["lost"] for g in store.report_gaps()) == 10
    store.close()


def test_a_database_from_before_versions_gets_its_totals(tmp_path: Path) -> None:
    shutil.copy(PREVIOUS, tmp_path / DB_FILE)
    store = Store(tmp_path)
    before = GoodputLedger.of(store.iter_steps())
    totals = store.step_totals()
    assert totals["steps"] == 3 and totals["max_step"] == 3
    assert GoodputLedger.from_totals(totals).first_start == before.first_start
    assert store.count_events("attempt_ended") == 1
    store.close()


def test_diagnostics_keep_the_newest_dirs_and_dumps(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    for n in range(1, 31):
        rd.diagnosis(n).mkdir(parents=True)
        (rd.diagnosis(n) / "stack_trainer0.txt").write_text("x")
    for i in range(500):
        p = rd.flight_recorder_dump(i // 100, "trainer", i % 2, "default", i)
        p.write_text("{}")
        os.utime(p, (1000 + i, 1000 + i))
    (rd.diagnostics / "notes.txt").write_text("not ours")
    cfg = RetentionConfig(diagnoses=5, flight_recorder_dumps=20)
    assert prune_diagnostics(rd.diagnostics, cfg) == {"diagnosis_dirs": 25, "flight_recorder_dumps": 480}
    assert sorted(p.name for p in rd.diagnostics.glob("diagnosis_*")) == [
        f"diagnosis_{n}" for n in (26, 27, 28, 29, 30)
    ]
    dumps = sorted(rd.diagnostics.glob("fr_*.json"))
    assert len(dumps) == 20 and all(p.stat().st_mtime >= 1480 for p in dumps)
    assert (rd.diagnostics / "notes.txt").exists()


def test_the_retainer_prunes_at_its_interval(tmp_path: Path) -> None:
    store = Store(tmp_path)
    now = [0.0]
    retainer = Retainer(
        store, tmp_path, RetentionConfig(events=100, prune_interval_s=60), clock=lambda: now[0]
    )
    for i in range(300):
        store.add_event({"kind": "k", "message": str(i)})
    assert retainer.maybe_prune() is not None and count(store, "events") == 100
    for i in range(300):
        store.add_event({"kind": "k", "message": str(i)})
    now[0] = 30.0
    assert retainer.maybe_prune() is None and count(store, "events") == 400
    now[0] = 61.0
    assert retainer.maybe_prune() is not None and count(store, "events") == 100
    assert store.count_events("k") == 600
    store.close()


def test_bad_bounds_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"retention.steps=0"):
        Keep(events=1, steps=0, attempts=1)


def test_daemon_log_rotates_at_its_cap_and_skips_a_stderr_that_is_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging
    import sys

    from milepost.daemon.logfile import log_handlers

    cap = 0.01  # MB
    with (tmp_path / "daemon.out").open("w") as out:
        monkeypatch.setattr(sys, "stderr", out)  # what --detach does
        handlers = log_handlers(tmp_path, RetentionConfig(log_max_mb=cap, log_backups=2))
    assert [type(h).__name__ for h in handlers] == ["RotatingFileHandler"]
    logger = logging.getLogger("test-daemon-log")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(handlers[0])
    try:
        for i in range(5000):
            logger.info("line %05d of a long run", i)
    finally:
        logger.removeHandler(handlers[0])
        handlers[0].close()
    files = sorted(p.name for p in tmp_path.glob("daemon.log*"))
    assert files == ["daemon.log", "daemon.log.1", "daemon.log.2"]
    assert all((tmp_path / f).stat().st_size <= cap * 1024 * 1024 for f in files)
    assert "line 04999" in (tmp_path / "daemon.log").read_text()
    assert (tmp_path / "daemon.out").read_text() == ""
    with pytest.raises(ValueError, match="log_backups"):
        RetentionConfig(log_backups=0)


def test_sglang_server_history_keeps_its_newest_changes() -> None:
    from milepost.engine.backends.sglang.health import DEAD, HEALTHY, ServerManager
    from milepost.engine.contract.config import SGLangConfig

    class Sink:
        def emit(self, *a: Any, **k: Any) -> None:
            pass

    manager = ServerManager(SGLangConfig(), events=Sink(), push=lambda s: None, history_keep=7)
    manager.attach(["http://127.0.0.1:9"])  # never contacted: states are set by hand
    (server,) = manager.servers
    for i in range(1000):  # a server that flaps for weeks
        manager._set(server, HEALTHY if i % 2 == 0 else DEAD, f"flap {i}")
    assert len(server.history) == 7 and server.history[-1].endswith("flap 999")
