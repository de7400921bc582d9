"""Hang and straggler detection end to end: real gloo ranks in Ray actors under the real daemon.

Each test asserts the witnesses: the fault fired (or was sent from outside), the daemon's
diagnosis names exactly the culprit rank and the collective, and the run recovers.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import DaemonRun, e2e_job, job_doc

pytestmark = pytest.mark.slow


def job(steps: int = 400, **sections: Any) -> dict[str, Any]:
    base = e2e_job(
        "detect",
        seed=3,
        steps=steps,
        grpo={"prompts_per_step": 16},
        trainer={"collective_timeout_s": 120.0},
        checkpoint={"interval": 5},
        supervisor={"backoff_max_s": 1.0},
    )
    return job_doc(base, **sections)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[DaemonRun]:
    r = DaemonRun(tmp_path, job())
    yield r
    r.cleanup()


def _trainer(run: DaemonRun, rank: int) -> dict[str, Any]:
    client = run.client()
    return run.wait(
        f"trainer {rank}", lambda: [r for r in client.ranks() if r["role"] == "trainer" and r["rank"] == rank]
    )[0]


def _hang(run: DaemonRun) -> dict[str, Any]:
    return run.wait("a collective_hang diagnosis", lambda: run.events("collective_hang"), 90)[0]


def _recovered(run: DaemonRun, after_step: int) -> None:
    run.wait(
        "a verified resume", lambda: [e for e in run.events("resume_verified") if e["attempt"] >= 1], 120
    )
    run.wait_step(after_step + 2, timeout=120)


def test_sigstop_names_the_frozen_rank_then_recovers(run: DaemonRun) -> None:
    client = run.start()
    run.wait_step(6)
    victim = _trainer(run, 1)
    os.kill(victim["pid"], signal.SIGSTOP)  # frozen: main thread and reporter thread alike
    hang = _hang(run)
    data = hang["data"]
    assert data["diagnosis"] == "frozen_rank" and data["culprit_ranks"] == [["trainer", 1]]
    assert hang["data"]["detection_s"] < 20
    (diag,) = run.wait(
        "the diagnosis with its evidence", lambda: [d for d in client.diagnoses() if d.get("evidence")]
    )
    assert diag["kind"] == "frozen_rank" and diag["culprit_ranks"] == [["trainer", 1]]
    # the collective rank 0 waits in: the next training one, or a checkpoint save's
    assert diag["op"] and diag["group"] in ("world", "checkpoint") and diag["seq"] > 0
    assert "trainer 0" in hang["message"]  # every rank's phase is in the message
    stacks = Path(diag["evidence"]["stacks"]["trainer0"]).read_text()
    assert "MainThread" in stacks, stacks
    # the culprit is SIGSTOPped: its stack still holds its main thread's frames
    culprit = Path(diag["evidence"]["stacks"]["trainer1"]).read_text()
    assert "MainThread" in culprit and "(" in culprit.split("MainThread", 1)[1], culprit
    _recovered(run, client.status()["step"])


def test_skipped_collective_names_the_desynced_rank(run: DaemonRun) -> None:
    client = run.start()
    run.wait_step(6)
    client.inject("skip-collective", role="trainer", rank=1)
    hang = _hang(run)
    fired = run.events("fault_injected")
    assert fired and fired[0]["role"] == "trainer" and fired[0]["rank"] == 1
    assert hang["data"]["diagnosis"] == "desync" and hang["data"]["culprit_ranks"] == [["trainer", 1]]
    assert hang["data"]["op"] == "all_reduce"
    _recovered(run, client.status()["step"])


def test_slow_rank_is_flagged_and_no_other(run: DaemonRun) -> None:
    client = run.start()
    run.wait_step(8)
    assert not run.events("straggler")
    client.inject("slow", role="trainer", rank=0, factor=1.5)
    flagged = run.wait("a straggler event", lambda: run.events("straggler"), 90)
    assert [e["data"]["rank"] for e in flagged] == [0]
    assert flagged[0]["data"]["relative_score"] > 1.12
    run.wait_step(client.status()["step"] + 10, timeout=60)
    assert [e["data"]["rank"] for e in run.events("straggler")] == [0]
    assert not run.events("collective_hang")


def test_healthy_run_with_checkpoints_and_slow_first_steps_reports_nothing(tmp_path: Path) -> None:
    doc = job(
        steps=60,
        checkpoint={"interval": 1},
        faults=[
            {"kind": "slow", "role": "trainer", "rank": 0, "step": 1, "factor": 40.0, "duration_steps": 1}
        ],
    )
    run = DaemonRun(tmp_path, doc)
    try:
        run.start()
        assert run.wait_state("SUCCEEDED", "FAILED")["state"] == "SUCCEEDED"
        assert run.events("fault_injected")  # the slow first step did happen
        assert not run.events("collective_hang") and not run.events("straggler")
        assert len(run.events("checkpoint_committed")) >= 50
    finally:
        run.cleanup()
