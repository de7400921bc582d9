"""A rank process whose reports turn invalid (a non-finite compute time) against the daemon's real
API and controller on 127.0.0.1: its heartbeats keep reaching the daemon and its attempt stays alive."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from milepost.daemon.api import create_app
from milepost.daemon.store import Store
from milepost.daemon.supervisor import Supervisor
from milepost.engine.contract.config import OpsView, SupervisorConfig

from tests.servers import serve

pytestmark = pytest.mark.timeout(90)

TOKEN = "live-token"
NAN_FROM_STEP = 5

# A trainer rank's real reporter; from step NAN_FROM_STEP on, its train phase time is NaN.
_RANK = """
import sys, time
from milepost.engine.instrument import RankInstrument
from milepost.engine.reporter import Reporter

inst = RankInstrument("trainer", 0)
rep = Reporter(sys.argv[1], sys.argv[2], inst, attempt=0, interval_s=0.1, timeout_s=2).start()
for step in range(1, 100000):
    inst.state.step = step
    if step >= int(sys.argv[3]):
        inst.state.compute["train"] = float("nan")
    time.sleep(0.1)
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Supervisor, Store, str]]:
    store = Store(tmp_path)
    store.ensure_run(run_id="r", name="nan", job="job.toml", run_dir=str(tmp_path), target_steps=10)
    ops = OpsView(supervisor=SupervisorConfig(heartbeat_timeout_trainer_s=2.0))
    sup = Supervisor(job="job.toml", run_dir=tmp_path, ops=ops, store=store, token=TOKEN, api_url="http://x")
    app = create_app(store, sup.controller, token=TOKEN, require_token_for_reads=False)
    with serve(app) as url:
        yield sup, store, url
    sup.shutdown()
    store.close()


def _trainer(store: Store) -> dict[str, Any] | None:
    return next((r for r in store.ranks() if r["role"] == "trainer" and r["rank"] == 0), None)


def test_a_rank_reporting_a_nan_keeps_its_heartbeat_and_its_attempt(
    daemon: tuple[Supervisor, Store, str],
) -> None:
    sup, store, url = daemon
    a = sup.attempt
    a.number, a.started = 0, time.time() - 1
    rank = subprocess.Popen([sys.executable, "-c", _RANK, url, TOKEN, str(NAN_FROM_STEP)])
    try:
        deadline = time.monotonic() + 30
        while (row := _trainer(store)) is None or row["data"]["step"] < NAN_FROM_STEP - 1:
            assert time.monotonic() < deadline and rank.poll() is None, "the rank's valid reports never came"
            time.sleep(0.05)
        last_valid = row["data"]["step"]
        nan_since = time.time()
        # The witness: heartbeats still arriving 3 s (over the 2 s heartbeat timeout) into the NaNs.
        while (row := _trainer(store)) is not None and row["received_at"] < nan_since + 3.0:
            assert time.monotonic() < deadline and rank.poll() is None, "the rank's heartbeats stopped"
            time.sleep(0.05)
        a.last_step_ts = time.time()  # steps are not this test's subject
        assert sup._check_liveness() is None
        assert (
            row is not None and row["data"]["step"] == last_valid
        )  # the refused reports' data is not stored
    finally:
        rank.kill()
        rank.wait(10)
