"""The store's schema versions: a database from before versions opens intact, new ones start current,
reopening changes nothing, and a database newer than the code is refused with both versions named.

``data/milepost-schema1.db`` was written by the store as it was before schema versions
(user_version 0): a run, two attempts, events, steps, a checkpoint, a rank, a diagnosis.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from milepost.daemon.store import MIGRATIONS, SCHEMA_VERSION, SchemaTooNew, Store, migrate
from milepost.engine.contract.layout import DB_FILE

PREVIOUS = Path(__file__).parent / "data" / "milepost-schema1.db"


def _user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


def _tables(path: Path) -> dict[str, str]:
    db = sqlite3.connect(path)
    try:
        return dict(db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall())
    finally:
        db.close()


def test_a_database_from_before_versions_opens_with_its_rows_intact(tmp_path: Path) -> None:
    assert _user_version(PREVIOUS) == 0
    shutil.copy(PREVIOUS, tmp_path / DB_FILE)
    store = Store(tmp_path)
    try:
        run = store.run()
        assert run is not None and run["id"] == "r-previous" and run["state"] == "STOPPED"
        assert [a["number"] for a in store.attempts()] == [0, 1]
        assert (store.attempt(1) or {})["resumed_from"] == 2
        assert [e["kind"] for e in store.events()] == ["attempt_started", "attempt_ended", "resume_verified"]
        assert store.events(kind="attempt_ended")[0]["data"] == {"cause": "killed"}
        assert [s["step"] for s in store.steps()] == [1, 2, 3]
        (ckpt,) = store.checkpoints()
        assert ckpt["step"] == 2 and ckpt["status"] == "committed" and ckpt["state_checksum"] == "abc123"
        assert store.ranks()[0]["data"] == {"step": 3}
        assert store.seen_seq(1, "trainer", 0) == (7, 7)
        assert store.diagnoses()[0]["culprit_ranks"] == [1]
        assert store.offset("events.jsonl") == 1234
        store.add_event({"kind": "later", "message": "written after the upgrade"})
        assert store.events()[-1]["id"] == 4  # AUTOINCREMENT goes on from the old rows
    finally:
        store.close()
    assert _user_version(tmp_path / DB_FILE) == SCHEMA_VERSION


def test_version_1_is_the_schema_before_versions(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    assert migrate(db, tmp_path / DB_FILE, MIGRATIONS[:1]) == 1
    db.close()
    assert _tables(tmp_path / DB_FILE) == _tables(PREVIOUS)  # same tables, columns and index, to the byte


def test_a_fresh_database_starts_at_the_current_version(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.add_step({"step": 1, "attempt": 0})
    store.close()
    assert _user_version(tmp_path / DB_FILE) == SCHEMA_VERSION == len(MIGRATIONS)


def test_reopening_changes_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.add_event({"kind": "k", "message": "m"})
    store.close()
    before = (_tables(tmp_path / DB_FILE), _user_version(tmp_path / DB_FILE))
    for _ in range(2):
        store = Store(tmp_path)
        assert [e["kind"] for e in store.events()] == ["k"]
        store.close()
    assert (_tables(tmp_path / DB_FILE), _user_version(tmp_path / DB_FILE)) == before


def test_a_database_newer_than_the_code_is_refused_naming_the_file_and_both_versions(tmp_path: Path) -> None:
    Store(tmp_path).close()
    db = sqlite3.connect(tmp_path / DB_FILE)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    db.close()
    with pytest.raises(SchemaTooNew) as e:
        Store(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / DB_FILE) in msg
    assert f"version {SCHEMA_VERSION + 3}" in msg and f"knows ({SCHEMA_VERSION})" in msg


def _later(*steps: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return (*MIGRATIONS, *steps)


def test_later_steps_run_in_order_once_each(tmp_path: Path) -> None:
    shutil.copy(PREVIOUS, tmp_path / DB_FILE)
    db = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    steps = _later(
        ("ALTER TABLE run ADD COLUMN owner TEXT", "UPDATE run SET owner = 'ops'"),
        ("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)",),
    )
    assert migrate(db, tmp_path / DB_FILE, steps) == SCHEMA_VERSION + 2
    assert db.execute("SELECT id, owner FROM run").fetchall() == [("r-previous", "ops")]
    assert migrate(db, tmp_path / DB_FILE, steps) == SCHEMA_VERSION + 2  # nothing left to run
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 2
    db.close()


def test_a_failing_step_leaves_the_database_at_the_step_before(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)
    steps = _later(
        ("CREATE TABLE a (x INTEGER)",),
        ("CREATE TABLE b (x INTEGER)", "INSERT INTO no_such_table VALUES (1)"),
    )
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        migrate(db, tmp_path / DB_FILE, steps)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "a" in names and "b" not in names
    db.close()


def _too_new(run_dir: Path) -> None:
    Store(run_dir).close()
    db = sqlite3.connect(run_dir / DB_FILE)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()


def test_status_on_a_store_too_new_says_so_in_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from milepost.daemon.status_cli import main_status

    _too_new(tmp_path)
    assert main_status(str(tmp_path)) == 2
    out, err = capsys.readouterr()
    line = err.splitlines()[-1]
    assert line.startswith("milepost status: ") and str(tmp_path / DB_FILE) in line
    assert f"version {SCHEMA_VERSION + 1}" in line and f"({SCHEMA_VERSION})" in line
    assert "Traceback" not in err and out == ""


def test_the_daemon_on_a_store_too_new_says_so_in_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from milepost.daemon.main import serve

    _too_new(tmp_path)
    job = Path(__file__).parents[2] / "examples" / "tiny-grpo-cpu.toml"
    assert serve(str(job), tmp_path, ray_address=None, exit_when_done=True) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("milepost daemon: ") and str(tmp_path / DB_FILE) in err
    assert f"version {SCHEMA_VERSION + 1}" in err and f"({SCHEMA_VERSION})" in err
