"""A full disk must not blind detection: when a diagnosis's evidence or row cannot be written, the hang
is still acted on, and the failure is an ``evidence_write_failed`` event and a metric."""

from __future__ import annotations

import errno
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon import evidence
from milepost.daemon.store import Store
from milepost.daemon.supervisor import Supervisor
from milepost.engine.contract.config import OpsView


def _hung(tmp_path: Path) -> tuple[Supervisor, Store]:
    """Two trainers inside the same all_reduce for 100 s, both reporting: a collective_stuck hang."""
    store = Store(tmp_path)
    store.ensure_run(run_id="r", name="full", job="job.toml", run_dir=str(tmp_path), target_steps=100)
    sup = Supervisor(job="job.toml", run_dir=tmp_path, ops=OpsView(), store=store, token="t", api_url="x")
    now = time.time()
    sup.started_at, sup.attempt.number = now - 300, 1
    for rank in (0, 1):
        open_ = [{"op": "all_reduce", "group": "dp", "seq": 7, "nbytes": 8, "enter_ts": now - 100}]
        data = {"ts": now, "pid": 0, "host": "h", "step": 50, "phase": "train", "state": "running"}
        store.upsert_rank("trainer", rank, 1, {**data, "open_collectives": open_, "coll_entered": {"dp": 7}})
    return sup, store


def _no_space(*_a: Any, **_k: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_evidence_write_still_acts_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup, store = _hung(tmp_path)
    monkeypatch.setattr(evidence, "collect", _no_space)
    try:
        diag = sup._check_hang()
        assert diag is not None and diag.kind == "collective_stuck"  # decided: the tick acts on it
        (failed,) = store.events(kind="evidence_write_failed")
        assert failed["data"]["what"] == "evidence" and failed["data"]["errno"] == errno.ENOSPC
        assert "No space left on device" in failed["message"]
        assert len(store.events(kind="collective_hang")) == 1
        assert sup.metrics.evidence_write_failures._value.get() == 1
    finally:
        sup.shutdown()
        store.close()


def test_a_store_that_cannot_take_the_diagnosis_still_acts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup, store = _hung(tmp_path)

    def full(*_a: Any, **_k: Any) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(store, "add_diagnosis", full)
    try:
        assert sup._check_hang() is not None
        (failed,) = store.events(kind="evidence_write_failed")
        assert failed["data"]["what"] == "diagnosis row" and "disk is full" in failed["data"]["error"]
    finally:
        sup.shutdown()
        store.close()


def test_an_event_the_store_cannot_take_still_reaches_the_bus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sup, store = _hung(tmp_path)
    heard: list[str] = []
    sup.bus.subscribe(type("Listener", (), {"on_event": lambda self, ev, _r: heard.append(ev["kind"])})())
    monkeypatch.setattr(store, "add_event", _no_space)
    monkeypatch.setattr(evidence, "collect", _no_space)
    try:
        assert sup._check_hang() is not None
        assert heard == ["collective_hang", "evidence_write_failed"]
        assert sup.metrics.evidence_write_failures._value.get() == 1
    finally:
        sup.shutdown()
        store.close()
