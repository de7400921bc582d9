"""Lose nothing: the daemon SIGKILLed at random moments, over and over, during a run with faults.

Each kill is followed by ``milepost run`` on the same run dir, which re-attaches to the
running attempt (or, when the attempt ended while no daemon watched, starts the next one).
At the end every line the ranks wrote to ``events.jsonl`` is in the store exactly once, and
every step of ``steps.jsonl`` is in the store with the record its last line holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import DaemonRun, e2e_job

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

KILLS = 22


def _key(ev: dict[str, Any]) -> tuple[Any, ...]:
    return (ev["ts"], ev["kind"], ev["message"], ev["attempt"], ev["role"], ev["rank"], ev["step"])


@pytest.fixture
def run(tmp_path: Path) -> Iterator[DaemonRun]:
    doc = e2e_job(
        "kills",
        seed=5,
        steps=100_000,  # ended by a stop once the kills are done
        supervisor={"startup_grace_s": 120.0, "standby": False},
        faults=[{"kind": "exception", "role": "trainer", "rank": 0, "step": 6}],
    )
    r = DaemonRun(tmp_path, doc)
    yield r
    r.cleanup()
    # An attempt a killed daemon launched but never recorded would be in no row: end it by its run dir.
    for p in psutil.process_iter(["pid", "cmdline"]):
        if str(r.run_dir) in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_daemon_sigkilled_at_random_moments_loses_no_event_and_no_step(run: DaemonRun) -> None:
    rng = random.Random(20261203)
    client = run.start()
    run.wait_step(2)
    for i in range(KILLS):
        time.sleep(rng.uniform(0.2, 2.0))  # from "just started, still catching up" to "steady ticks"
        if i in (7, 14):
            with contextlib.suppress(Exception):  # no attempt may be running at this moment
                client.inject("exception", role="trainer", rank=1)
        run.kill_daemon()
        client = run.start()
    run.wait("a step after the last re-attach", lambda: run.status()["step"] > 8, 120)
    run.wait("the run to be RUNNING", lambda: client.status()["state"] == "RUNNING", 120)
    client.control("stop")
    status = run.wait_state("STOPPED", "FAILED", "SUCCEEDED")
    assert status["state"] == "STOPPED", status
    assert run.events("restart_scheduled") or run.events("attempt_lost"), "no fault was recovered from"

    written = [json.loads(line) for line in (run.run_dir / "events.jsonl").read_text().splitlines()]
    stored = [e for e in run.events() if e["role"] != "daemon"]
    missing = Counter(map(_key, written)) - Counter(map(_key, stored))
    doubled = Counter(map(_key, stored)) - Counter(map(_key, written))
    assert not missing and not doubled, (list(missing)[:5], list(doubled)[:5])

    last: dict[int, dict[str, Any]] = {}
    for line in (run.run_dir / "steps.jsonl").read_text().splitlines():
        rec = json.loads(line)
        last[rec["step"]] = rec
    store = run.store()
    try:
        kept = {s["step"]: s for s in store.iter_steps()}
        totals = store.step_totals()
    finally:
        store.close()
    assert sorted(kept) == sorted(last) == list(range(1, max(last) + 1))
    assert all(kept[n] == rec for n, rec in last.items())
    assert totals["steps"] == len(last)
    assert totals["step_s"] == pytest.approx(sum(r["step_s"] for r in last.values()), rel=1e-9)
    assert len(run.daemon_pids) == KILLS + 1
