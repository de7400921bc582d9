"""Lose nothing: a tailed batch and its file offset commit together, and ingest's counters move
only after its writes commit. A transient SQLite error mid-batch (or a crash there) must
leave the batch to be read again: every line ends in the store exactly once."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon.store import Store
from milepost.daemon.supervisor import Supervisor
from milepost.daemon.tailer import Tailer
from milepost.engine.contract.config import OpsView
from milepost.engine.contract.layout import EVENTS_FILE, STEPS_FILE

pytestmark = pytest.mark.timeout(30)


class Flaky:
    """Makes ``store.<method>`` raise once, on its ``nth`` call: a transient SQLite error."""

    def __init__(self, store: Store, method: str, nth: int) -> None:
        self.real, self.nth, self.calls = getattr(store, method), nth, 0
        setattr(store, method, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.nth:
            raise sqlite3.OperationalError("database is locked (injected)")
        return self.real(*args, **kwargs)


def write_lines(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def events(n: int) -> list[dict[str, Any]]:
    return [
        {"ts": 100.0 + i, "kind": "fault_injected", "message": f"e{i}", "attempt": 0, "role": "trainer"}
        for i in range(n)
    ]


def steps(first: int, last: int, attempt: int = 0) -> list[dict[str, Any]]:
    return [
        {"step": s, "attempt": attempt, "ts": 1000.0 + s, "step_s": 1.0, "phases": {}}
        for s in range(first, last + 1)
    ]


@pytest.fixture
def sup(tmp_path: Path) -> Iterator[Supervisor]:
    store = Store(tmp_path)
    sup = Supervisor(
        job="job.toml", run_dir=tmp_path, ops=OpsView(), store=store, token="t", api_url="http://x"
    )
    yield sup
    sup.shutdown()
    store.close()


def test_an_error_between_data_and_offset_leaves_neither(tmp_path: Path) -> None:
    store = Store(tmp_path)
    write_lines(tmp_path / EVENTS_FILE, events(3))
    tailer = Tailer(tmp_path, store)
    batch = tailer.read(EVENTS_FILE)
    assert batch is not None and len(batch.records) == 3
    with pytest.raises(RuntimeError), store.transaction():
        for ev in batch.records:
            store.add_event(ev)
        raise RuntimeError("crash between the data and the offset")
    assert (
        store.events() == [] and store.offset(EVENTS_FILE) == 0 and store.count_events("fault_injected") == 0
    )
    with store.transaction():
        for ev in batch.records:
            store.add_event(ev)
        tailer.commit(batch)
    assert [e["message"] for e in store.events()] == ["e0", "e1", "e2"]
    assert store.offset(EVENTS_FILE) == (tmp_path / EVENTS_FILE).stat().st_size
    store.close()


def test_a_transient_store_error_mid_batch_loses_no_event(sup: Supervisor, tmp_path: Path) -> None:
    write_lines(tmp_path / EVENTS_FILE, events(5))
    Flaky(sup.store, "add_event", nth=3)
    with pytest.raises(sqlite3.OperationalError):
        sup._tail()
    sup._tail()  # the next tick reads the batch again
    stored = [e["message"] for e in sup.store.events()]
    assert stored == ["e0", "e1", "e2", "e3", "e4"]  # each line once, in order
    assert sup.store.count_events("fault_injected") == 5


def test_a_transient_store_error_mid_batch_loses_no_step(sup: Supervisor, tmp_path: Path) -> None:
    write_lines(tmp_path / STEPS_FILE, steps(1, 6))
    Flaky(sup.store, "add_step", nth=4)
    with pytest.raises(sqlite3.OperationalError):
        sup._tail()
    sup._tail()
    assert [s["step"] for s in sup.store.steps()] == [1, 2, 3, 4, 5, 6]
    assert sup.ledger.step_s == pytest.approx(6.0)  # the ledger counts each step once
    assert sup.store.step_totals()["steps"] == 6


def test_an_attempt_failure_is_acted_on_only_once_stored(sup: Supervisor, tmp_path: Path) -> None:
    failed = {"ts": 5.0, "kind": "attempt_failed", "message": "boom", "attempt": 0, "role": "driver"}
    write_lines(tmp_path / EVENTS_FILE, [*events(1), failed])
    sup.attempt.number = 0
    Flaky(sup.store, "add_event", nth=2)
    with pytest.raises(sqlite3.OperationalError):
        sup._tail()
    assert sup.attempt.outcome == {} and sup.store.events() == []  # neither stored nor acted on
    sup._tail()
    assert sup.attempt.outcome["failed"]["message"] == "boom"
    assert [e["kind"] for e in sup.store.events()] == ["fault_injected", "attempt_failed"]


def report(seq: int, rank: int = 0) -> dict[str, Any]:
    return {"attempt": 0, "role": "trainer", "rank": rank, "seq": seq, "ts": 1.0, "step": seq}


def test_ingest_counts_a_report_seen_only_once_its_write_commits(sup: Supervisor) -> None:
    sup.attempt.number = 0
    ctl = sup.controller
    assert ctl.ingest({"reports": [report(1)]})["accepted"] == 1
    Flaky(sup.store, "upsert_rank", nth=1)
    with pytest.raises(sqlite3.OperationalError):
        ctl.ingest({"reports": [report(2), report(1, rank=1)]})
    # The rank resends the batch: it is new to the daemon, not a replay.
    assert ctl.ingest({"reports": [report(2), report(1, rank=1)]})["accepted"] == 2
    assert sup.store.seen_seq(0, "trainer", 0) == (2, 2)
    assert sup.store.seen_seq(0, "trainer", 1) == (1, 1)
    assert {(r["rank"], r["data"]["seq"]) for r in sup.store.ranks()} == {(0, 2), (1, 1)}


def test_a_huge_backlog_is_read_in_bounded_slices(tmp_path: Path) -> None:
    store = Store(tmp_path)
    write_lines(tmp_path / EVENTS_FILE, events(200))
    with (tmp_path / EVENTS_FILE).open("a") as f:
        f.write("x" * 5000 + "\n")  # a line longer than a whole read: skipped, not a stall
    write_lines(tmp_path / EVENTS_FILE, events(1))
    tailer = Tailer(tmp_path, store, max_bytes=4096)
    got: list[dict[str, Any]] = []
    while (batch := tailer.read(EVENTS_FILE)) is not None:
        got += batch.records
        tailer.commit(batch)
        if not batch.more and batch.end == (tmp_path / EVENTS_FILE).stat().st_size:
            break
    assert len(got) == 201
    store.close()
