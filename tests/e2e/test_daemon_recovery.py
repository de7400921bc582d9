"""End-to-end faults under the real daemon: real attempt processes, real Ray, real gloo ranks.

Each recovery test asserts its witnesses: the fault fired, the daemon diagnosed it (an
event naming the rank and the cause), it restarted, and the resume was verified.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DaemonRun, e2e_job, job_doc

pytestmark = pytest.mark.slow


def job(steps: int = 8, **sections: Any) -> dict[str, Any]:
    base = e2e_job("e2e", seed=11, steps=steps, supervisor={"startup_grace_s": 120.0})
    return job_doc(base, **sections)


@pytest.fixture
def daemon_run(tmp_path: Path) -> Iterator[Any]:
    runs: list[DaemonRun] = []

    def make(doc: dict[str, Any], **kw: Any) -> DaemonRun:
        runs.append(DaemonRun(tmp_path, doc, **kw))
        return runs[-1]

    yield make
    for r in runs:
        r.cleanup()


def _assert_recovered(run: DaemonRun, *, role: str, rank: int, cause: str, steps: int) -> None:
    ended = run.events("attempt_ended")
    assert ended and f"{role} {rank} {cause}" in ended[0]["message"], ended
    assert run.events("restart_scheduled"), "no restart was scheduled"
    verified = [e for e in run.events("resume_verified") if e["attempt"] >= 1]
    assert verified, "the resumed attempt did not verify its checkpoint"
    assert run.events("run_succeeded")
    client = run.client()
    assert [s["step"] for s in client.steps()] == list(range(1, steps + 1))
    status = client.status()
    assert status["state"] == "SUCCEEDED" and status["step"] == steps and status["restarts"] >= 1


def test_sigkill_trainer_rank_restarts_from_checkpoint(daemon_run: Any) -> None:
    # Long enough that the kill lands mid-run: the standby needs ~10 s, a step here ~0.2 s.
    run = daemon_run(job(steps=150))
    client = run.start()
    run.wait_step(3)
    # The warm standby of attempt 1 is up (Ray started, actors being built ahead).
    run.wait("the warm standby", lambda: (run.run_dir / "attempts" / "standby_1" / "ready").exists(), 60)
    trainer = run.wait(
        "trainer 1 report", lambda: [r for r in client.ranks() if r["role"] == "trainer" and r["rank"] == 1]
    )[0]
    os.kill(trainer["pid"], signal.SIGKILL)  # the fault, from outside, as an OOM killer would
    run.wait_state("SUCCEEDED", "FAILED")
    _assert_recovered(run, role="trainer", rank=1, cause="process died", steps=150)
    failed = run.events("attempt_failed")[0]
    assert failed["data"]["cause"] == "actor_died" and failed["data"]["role"] == "trainer"
    launched = [e for e in run.events("attempt_launched") if e["attempt"] == 1]
    assert launched and launched[0]["data"]["warm"], "attempt 1 did not start from the warm standby"
    started = [e for e in run.events("attempt_started") if e["attempt"] == 1]
    assert started[0]["data"]["built_ahead"] == 3  # 2 trainer ranks + 1 rollout worker, built ahead


def test_killed_rollout_worker_recovers(daemon_run: Any) -> None:
    run = daemon_run(job(faults=[{"kind": "kill", "role": "rollout", "rank": 0, "step": 5}]))
    run.start()
    run.wait_state("SUCCEEDED", "FAILED")
    (fired,) = run.events("fault_injected")
    assert fired["role"] == "rollout" and fired["step"] == 5
    _assert_recovered(run, role="rollout", rank=0, cause="process died", steps=8)


def test_exception_in_rank_recovers(daemon_run: Any) -> None:
    run = daemon_run(job(faults=[{"kind": "exception", "role": "trainer", "rank": 0, "step": 5}]))
    run.start()
    run.wait_state("SUCCEEDED", "FAILED")
    assert len(run.events("fault_injected")) == 1
    _assert_recovered(run, role="trainer", rank=0, cause="raised InjectedFault", steps=8)


def test_rank_that_always_fails_ends_failed_with_reason(daemon_run: Any) -> None:
    run = daemon_run(
        job(
            supervisor={"no_progress_restarts": 2, "backoff_initial_s": 0.2},
            faults=[{"kind": "exception", "role": "trainer", "rank": 1, "step": 1, "attempts": "all"}],
        )
    )
    run.start()
    status = run.wait_state("FAILED", "SUCCEEDED")
    assert status["state"] == "FAILED"
    assert "2 attempts in a row made no progress" in status["reason"]
    assert "trainer 1 raised InjectedFault" in status["reason"]
    assert len(run.events("fault_injected")) == 2 and len(run.events("restart_scheduled")) == 1
    assert run.events("run_failed")


def test_daemon_sigkill_reattaches_without_losing_reports(daemon_run: Any) -> None:
    run = daemon_run(job(steps=60, grpo={"prompts_per_step": 32}))
    run.start()
    run.wait_step(3)
    run.kill_daemon()
    run.wait_steps_written(3, "training to go on without the daemon")
    client = run.start()
    (reattached,) = run.wait("re-attach", lambda: run.events("daemon_reattached"), 30)
    assert reattached["attempt"] == 0
    status = run.wait_state("SUCCEEDED", "FAILED")
    assert status["state"] == "SUCCEEDED"
    assert [a["number"] for a in client.attempts()] == [0]  # no new attempt
    assert [s["step"] for s in client.steps()] == list(range(1, 61))
    # Every event the ranks wrote reached the store, and no report went missing.
    written = len((run.run_dir / "events.jsonl").read_text().splitlines())
    stored = [e for e in run.events() if e["role"] != "daemon"]
    assert len(stored) == written
    assert client.status()["reports_lost"] == 0


def _run_processes(daemon_pid: int, store_pids: list[int]) -> set[int]:
    """Every process of the run now: the daemon's descendants and every member of the process
    groups of the attempts and the standby (their Ray clusters included)."""
    import psutil

    found: set[int] = set()
    with contextlib.suppress(psutil.Error):
        found |= {p.pid for p in psutil.Process(daemon_pid).children(recursive=True)}
    groups = {os.getpgid(p) for p in store_pids if p and _pgid_or_none(p) is not None}
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) in groups:
                found.add(p.pid)
                found |= {c.pid for c in p.children(recursive=True)}
    return found


def _pgid_or_none(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_ctrl_c_of_a_foreground_run_stops_everything_with_a_last_checkpoint(daemon_run: Any) -> None:
    """`make run`, then Ctrl-C: a last checkpoint, the attempt ended, the standby and every Ray
    process gone, and how to keep a run going without a terminal."""
    import json
    import subprocess
    import time

    import psutil

    from tests.harness import MILEPOST

    run = daemon_run(job(steps=400))
    cmd = [*MILEPOST, "run", str(run.job), "--run-dir", str(run.run_dir)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        run.wait("the daemon to write daemon.json", lambda: (run.run_dir / "daemon.json").exists(), 60)
        daemon_pid = int(json.loads((run.run_dir / "daemon.json").read_text())["pid"])
        run.daemon_pids.append(daemon_pid)
        run.wait_step(3)
        store = run.store()
        # The standby is up once the attempt made a step; wait for it so that its end is checked too.
        run.wait("the warm standby", lambda: psutil.pid_exists(store.offset("standby_pid")), 60)
        pids = [a["pid"] for a in store.attempts()] + [store.offset("standby_pid")]
        store.close()
        seen = _run_processes(daemon_pid, pids)
        assert len(seen) >= 4, seen  # attempt, standby, their Ray clusters and actors
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "--detach" in out and "nothing of it is left running" in out, out
    deadline = time.monotonic() + 15  # processes SIGKILLed a moment ago may still be reaped
    while left := [p for p in seen if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]:
        assert time.monotonic() < deadline, [(p, " ".join(psutil.Process(p).cmdline())[:100]) for p in left]
        time.sleep(0.2)
    stopped = run.status()
    assert stopped["state"] == "STOPPED", stopped
    store = run.store()
    (attempt,) = store.attempts()
    committed = [c["step"] for c in store.checkpoints() if c["status"] == "committed"]
    store.close()
    assert attempt["state"] == "STOPPED"
    assert committed and max(committed) == stopped["step"], (committed, stopped)  # the last checkpoint


def test_control_api_pause_resume_checkpoint_stop(daemon_run: Any) -> None:
    import time

    import httpx

    run = daemon_run(job(steps=400))
    client = run.start()
    run.wait_step(2)
    url = client.url
    assert httpx.post(f"{url}/api/v1/control/pause").status_code == 401
    assert client.control("pause")["state"] == "PAUSED"
    run.wait("run_paused", lambda: run.events("run_paused"), 30)
    held = run.status()["step"]
    time.sleep(3)
    assert run.status()["step"] == held
    client.control("resume")
    run.wait_step(held + 2, timeout=60)
    client.control("checkpoint")
    (requested,) = run.wait("checkpoint_requested", lambda: run.events("checkpoint_requested"), 30)
    client.control("stop")
    status = run.wait_state("STOPPED", "FAILED", "SUCCEEDED")
    assert status["state"] == "STOPPED"
    final = status["step"]
    assert final < 400
    newest = client.checkpoints()[0]
    assert newest["step"] == final and newest["status"] == "committed"
    assert requested["step"] <= final
