"""Kill only what is ours: process records (pid, start time, boot id, run dir, attempt) decide
re-attach and kill, never a pid whose command line happens to say "milepost".

Real processes throughout; the engine an attempt would run is a stand-in (a ``sleep``), named
a fake here, because these tests decide on identities, not on training.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon import procs
from milepost.daemon.store import Store
from milepost.daemon.supervisor import Supervisor
from milepost.engine.contract.config import load_ops_view
from milepost.engine.contract.enums import AttemptState
from milepost.engine.contract.identity import ProcessIdentity, ProcessRecord, boot_id
from milepost.engine.contract.layout import RunDir

from tests.conftest import REPO

# An unrelated process that a reused pid might name: its command line even says "milepost".
UNRELATED = [sys.executable, "-c", "import time; time.sleep(120)", "milepost-unrelated"]


@pytest.fixture
def procs_started() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        p.kill()
        p.wait(timeout=10)


def _start(started: list[subprocess.Popen[bytes]], cmd: list[str]) -> subprocess.Popen[bytes]:
    started.append(subprocess.Popen(cmd, start_new_session=True))
    deadline = time.monotonic() + 10
    while "time.sleep" in cmd[-2] and "milepost" not in procs.cmdline(started[-1].pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)  # until the exec is done: the pid runs the command line we gave
    return started[-1]


def _reused(rec: ProcessRecord, how: str) -> ProcessRecord:
    """``rec`` as if written for another process that had the same pid (another start or boot)."""
    if how == "start time":
        return replace(rec, start_ticks=rec.start_ticks - 1)
    return replace(rec, boot_id="00000000-0000-0000-0000-000000000000")


def test_identity_is_exact() -> None:
    me = ProcessIdentity.of(os.getpid())
    assert me is not None and me.is_running() and me.boot_id == boot_id() != ""
    assert not replace(me, start_ticks=me.start_ticks + 1).is_running()
    assert not replace(me, boot_id="another boot").is_running()
    assert ProcessIdentity.of(0) is None and ProcessIdentity.of(2**22 + 12345) is None


@pytest.mark.parametrize("how", ["start time", "boot id"])
def test_a_reused_pid_is_neither_killed_nor_reattached(
    tmp_path: Path, procs_started: list[subprocess.Popen[bytes]], how: str
) -> None:
    run_dir = tmp_path / "run"
    stranger = _start(procs_started, UNRELATED)
    rec = _reused(ProcessRecord("attempt", str(run_dir.resolve()), 0).with_process(stranger.pid), how)
    rec.write(RunDir(run_dir).attempt_record(0))
    sup = _supervisor(tmp_path, run_dir)
    sup.store.add_attempt(0, pid=stranger.pid, world_size=2)  # RUNNING, as a daemon that died left it
    fake_engine = _fake_spawn(sup, procs_started)
    sup.start()
    assert stranger.poll() is None, "an unrelated process was killed"
    assert not sup.store.events(kind="daemon_reattached")
    assert sup.store.attempt(0)["state"] == AttemptState.LOST
    assert sup.attempt.number == 1 and sup.attempt.pid == fake_engine[0].pid  # a new attempt instead
    assert not procs.kill_recorded(rec) and stranger.poll() is None
    sup.shutdown()


def test_the_recorded_attempt_itself_is_reattached_and_orphans_end(
    tmp_path: Path, procs_started: list[subprocess.Popen[bytes]]
) -> None:
    run_dir = tmp_path / "run"
    attempt = _start(procs_started, ["sleep", "120"])  # a fake engine
    standby = _start(procs_started, ["sleep", "121"])  # a fake standby of attempt 1, no one will start it
    mine = str(run_dir.resolve())
    ProcessRecord("attempt", mine, 0).with_process(attempt.pid).write(RunDir(run_dir).attempt_record(0))
    ProcessRecord("standby", mine, 1).with_process(standby.pid).write(RunDir(run_dir).attempt_record(1))
    sup = _supervisor(tmp_path, run_dir)
    sup.store.add_attempt(0, pid=attempt.pid, world_size=2)
    sup.start()
    assert [e["attempt"] for e in sup.store.events(kind="daemon_reattached")] == [0]
    assert attempt.poll() is None
    assert standby.wait(timeout=10) == -9
    sup.shutdown()


def test_a_refused_kill_does_not_wedge_the_ticks(
    tmp_path: Path, procs_started: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    sup = _supervisor(tmp_path, run_dir)
    fake_engine = _fake_spawn(sup, procs_started)
    sup.start()
    assert sup.attempt.pid == fake_engine[0].pid

    def refused(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "killpg", refused)
    monkeypatch.setattr(os, "kill", refused)
    sup.attempt.outcome["resume_mismatch"] = {"kind": "resume_verification_failed"}  # -> kill, then end
    t = time.monotonic()
    sup.tick()
    assert time.monotonic() - t < 3.0, "a refused kill held the tick"
    assert sup.attempt.pid is None and sup.done.is_set()  # decided: a resume mismatch fails the run
    sup.tick()  # and the next tick runs
    sup.shutdown()


def _supervisor(tmp_path: Path, run_dir: Path) -> Supervisor:
    run_dir.mkdir(parents=True, exist_ok=True)
    job = REPO / "examples" / "tiny-grpo-cpu.toml"
    store = Store(run_dir)
    return Supervisor(
        job=str(job),
        run_dir=run_dir,
        ops=load_ops_view(job),
        store=store,
        token="t",
        api_url="http://127.0.0.1:9",
    )


def _fake_spawn(sup: Supervisor, started: list[subprocess.Popen[bytes]]) -> list[subprocess.Popen[bytes]]:
    """The launcher's spawn, recording as it does, with a ``sleep`` (a fake engine) for the process."""
    spawned: list[subprocess.Popen[bytes]] = []

    def spawn(n: int, standby_dir: Any = None) -> subprocess.Popen[bytes]:
        proc = _start(started, ["sleep", "120"])
        ProcessRecord("attempt", str(sup.run_dir.resolve()), n).with_process(proc.pid).write(
            RunDir(sup.run_dir).attempt_record(n)
        )
        spawned.append(proc)
        return proc

    sup.launcher.spawn = spawn  # type: ignore[method-assign]
    return spawned


def test_a_stale_sglang_record_kills_only_its_own_server(
    tmp_path: Path, procs_started: list[subprocess.Popen[bytes]]
) -> None:
    from milepost.engine.backends.sglang.servers import _reap_stale_server

    record = tmp_path / "sglang-30000.proc.json"
    stranger = _start(procs_started, UNRELATED)  # took the pid a dead server had
    rec = ProcessRecord("sglang", str(tmp_path), 0).with_process(stranger.pid)
    _reused(rec, "start time").write(record)
    assert not _reap_stale_server(record) and stranger.poll() is None
    server = _start(procs_started, ["sleep", "122"])  # a fake server of an earlier attempt
    ProcessRecord("sglang", str(tmp_path), 0).with_process(server.pid).write(record)
    assert _reap_stale_server(record) and server.wait(timeout=10) == -9


@pytest.mark.parametrize("recorded", ["intent only", "with its pid"])
def test_an_attempt_spawned_but_never_stored_is_ended_not_duplicated(
    tmp_path: Path, procs_started: list[subprocess.Popen[bytes]], recorded: str
) -> None:
    """A daemon died between spawning attempt 0 and storing it: the next daemon ends that orphan."""
    run_dir = tmp_path / "run"
    mine = str(run_dir.resolve())
    # A fake engine with the engine's command line (the interpreter sleeps; the arguments are its argv).
    engine_args = ["milepost.engine.cli", "engine", "job.toml", "--run-dir", mine, "--attempt", "0"]
    orphan = _start(procs_started, [sys.executable, "-c", "import time; time.sleep(120)", *engine_args])
    deadline = time.monotonic() + 10
    while "--attempt" not in procs.cmdline(orphan.pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    intent = ProcessRecord("attempt", mine, 0)
    (intent if recorded == "intent only" else intent.with_process(orphan.pid)).write(
        RunDir(run_dir).attempt_record(0)
    )
    sup = _supervisor(tmp_path, run_dir)
    fake_engine = _fake_spawn(sup, procs_started)
    sup.start()
    assert orphan.wait(timeout=10) == -9
    assert [a["number"] for a in sup.store.attempts()] == [0] and sup.attempt.pid == fake_engine[0].pid
    sup.shutdown()
