"""The run's identity across daemon restarts: two daemon processes on one run dir (each with its own
str-hash salt) agree on the run id and leave one run row."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from milepost.engine.contract.layout import DB_FILE

pytestmark = pytest.mark.timeout(60)

# One daemon start, less the attempt: the supervisor records the run as it does at start-up.
_START = """
import sys
from pathlib import Path
from milepost.daemon.store import Store
from milepost.daemon.supervisor import Supervisor
from milepost.engine.contract.config import OpsView

run_dir = Path(sys.argv[1])
store = Store(run_dir)
sup = Supervisor(job="job.toml", run_dir=run_dir, ops=OpsView(), store=store, token="t", api_url="http://x")
sup._launch = lambda: None
sup.start()
print(store.run()["id"])
sup.shutdown()
store.close()
"""


def _daemon_start(run_dir: Path, seed: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _START, str(run_dir)],
        env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_a_restarted_daemon_keeps_the_run_id_and_adds_no_run_row(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = _daemon_start(run_dir, "1")
    second = _daemon_start(run_dir, "2")  # another salt, as every new process has by default
    assert first == second and first.startswith("run-")
    db = sqlite3.connect(run_dir / DB_FILE)
    try:
        assert db.execute("SELECT COUNT(*) FROM run").fetchone()[0] == 1
    finally:
        db.close()
