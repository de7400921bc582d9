"""A run directory written by the previous schema resumes under today's daemon.

The run dir is made the way the milepost before schema versions leaves it when its node
goes down mid-run: a real daemon and attempt train and checkpoint, then both are killed,
and the store is put back to the previous schema's marks (user_version 0; its tables are
checked against ``tests/unit/data/milepost-schema1.db``, written by that milepost). A new
``milepost run`` must migrate the store, keep every old row, and resume from the checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon.procs import alive as pid_alive
from milepost.daemon.store import SCHEMA_VERSION
from milepost.engine.contract.layout import DB_FILE

from tests.harness import DaemonRun, job_doc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PREVIOUS = Path(__file__).resolve().parent.parent / "unit" / "data" / "milepost-schema1.db"
STEPS = 20


def _schema(db: sqlite3.Connection) -> dict[str, str]:
    return dict(db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall())


def _rows(db: sqlite3.Connection, table: str, order: str) -> list[tuple[Any, ...]]:
    return list(db.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall())


@pytest.fixture
def run(tmp_path: Path) -> Iterator[DaemonRun]:
    doc = job_doc(
        {
            "run": {"name": "previous-schema", "seed": 13, "steps": STEPS},
            "grpo": {"prompts_per_step": 8, "group_size": 4, "minibatches": 2},
            "trainer": {"world_size": 2, "collective_timeout_s": 60.0},
            "checkpoint": {"interval": 2, "keep_last": 3},
            # Wide: a cold attempt's start-up took over 120 s here while other test runs shared the CPUs.
            "supervisor": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0, "startup_grace_s": 400.0},
        }
    )
    r = DaemonRun(tmp_path, doc)
    yield r
    r.cleanup()


def _node_down(run: DaemonRun) -> None:
    """The daemon and every process of the attempt die at once, as when their node goes down."""
    run.kill_daemon()
    store = run.store()
    pids = [a["pid"] for a in store.attempts()] + [store.offset("standby_pid")]
    store.close()
    for pid in filter(None, pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    run.wait("the attempt to be gone", lambda: not any(pid_alive(p) for p in filter(None, pids)), 30)


def test_a_run_dir_of_the_previous_schema_resumes_from_its_checkpoint(run: DaemonRun) -> None:
    client = run.start()
    run.wait(
        "a committed checkpoint at step 4 or later",
        lambda: [c for c in client.checkpoints() if c["status"] == "committed" and c["step"] >= 4],
        420,
    )
    _node_down(run)

    db = sqlite3.connect(run.run_dir / DB_FILE, isolation_level=None)
    previous = sqlite3.connect(PREVIOUS)
    # Back to version 1: what later schema steps added goes (their tables are rebuilt on open).
    later = [(n, t) for n, t in db.execute("SELECT name, type FROM sqlite_master WHERE sql IS NOT NULL")]
    for name, kind in later:
        if name not in _schema(previous):
            db.execute(f'DROP {kind.upper()} IF EXISTS "{name}"')
    assert _schema(db) == _schema(previous), "version 1 is no longer the previous schema"
    previous.close()
    db.execute("PRAGMA user_version = 0")  # as the milepost before schema versions left it
    old_events = _rows(db, "events", "id")
    old_attempts = _rows(db, "attempts", "number")
    old_steps = _rows(db, "steps", "step")
    checkpoint = max(s for (s,) in db.execute("SELECT step FROM checkpoints WHERE status = 'committed'"))
    db.close()
    assert [a[0] for a in old_attempts] == [0] and old_attempts[0][2] == "RUNNING"
    assert old_steps and old_steps[-1][0] < STEPS, "the run finished before its node went down"

    client = run.start()
    status = run.wait_state("SUCCEEDED", "FAILED", "STOPPED", timeout=480)
    assert status["state"] == "SUCCEEDED", status

    db = sqlite3.connect(run.run_dir / DB_FILE)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    events = _rows(db, "events", "id")
    assert events[: len(old_events)] == old_events, "an old event changed or went missing"
    attempts = _rows(db, "attempts", "number")
    final_steps = _rows(db, "steps", "step")
    db.close()
    assert [a[0] for a in attempts] == [0, 1]
    assert attempts[0][2] == "LOST" and attempts[0][:2] == old_attempts[0][:2]

    verified = [e for e in run.events("resume_verified") if e["attempt"] == 1]
    assert verified and verified[0]["step"] >= checkpoint, (verified, checkpoint)
    resumed_from = verified[0]["step"]
    steps = client.steps()
    # Up to the checkpoint: the old attempt's records, the old rows unchanged (a record lost to a
    # kill between a step's checkpoint and its line comes back from the manifest, attempt 0's).
    assert {s["attempt"] for s in steps if s["step"] <= resumed_from} == {0}
    kept = {row[0]: row for row in final_steps}
    assert [r for r in old_steps if r[0] <= resumed_from] == [
        kept[r[0]] for r in old_steps if r[0] <= resumed_from
    ]
    # After it: every step to the target, by the new attempt.
    after = [s for s in steps if s["step"] > resumed_from]
    assert [s["step"] for s in after] == list(range(resumed_from + 1, STEPS + 1))
    assert {s["attempt"] for s in after} == {1}
    assert client.status()["step"] == STEPS
