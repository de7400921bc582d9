"""One daemon per run dir: two daemons started at the same moment, real processes.

The loser exits with ``DAEMON_LOCKED_EXIT`` and names the winner (pid, URL); the winner
supervises. A daemon that died between spawning an attempt and recording it in its store
leaves no orphan that the next daemon duplicates (tests/unit/test_identity.py covers the
records themselves).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from milepost.daemon.lock import DaemonLock, Held
from milepost.engine.contract.process import DAEMON_LOCKED_EXIT

from tests.harness import MILEPOST, DaemonRun, e2e_job

pytestmark = pytest.mark.slow


def test_two_daemons_at_the_same_moment_one_supervises_the_other_names_it(tmp_path: Path) -> None:
    run = DaemonRun(tmp_path, e2e_job("lock", seed=5, steps=4))
    # The daemon itself, twice, bypassing `milepost run`'s own check: the lock must decide.
    cmd = [sys.executable, "-m", "milepost.daemon.main", str(run.job), "--run-dir", str(run.run_dir)]
    both = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        for _ in range(2)
    ]
    run.daemon_pids += [p.pid for p in both]
    try:
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in both):
            assert time.monotonic() < deadline, "neither daemon was refused"
            time.sleep(0.05)
        (loser,) = [p for p in both if p.poll() is not None]
        (winner,) = [p for p in both if p is not loser]
        _, err = loser.communicate(timeout=10)
        assert loser.returncode == DAEMON_LOCKED_EXIT, err
        info = run.wait(
            "the winner's daemon.json",
            lambda: (d := json.loads((run.run_dir / "daemon.json").read_text()))["pid"] == winner.pid and d,
            60,
        )
        # Named by pid; by URL too once the winner has one (it writes it right after binding its port).
        assert f"pid {winner.pid}" in err, err
        out = subprocess.run(
            [*MILEPOST, "run", str(run.job), "--run-dir", str(run.run_dir), "--detach"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == DAEMON_LOCKED_EXIT
        assert f"pid {winner.pid}, {info['url']}" in out.stderr, out.stderr
        with pytest.raises(Held, match=f"pid {winner.pid}, {info['url']}"):
            DaemonLock(run.run_dir).acquire()
        assert winner.poll() is None
    finally:
        for p in both:
            p.kill()
            p.communicate(timeout=10)
        run.cleanup()
    DaemonLock(run.run_dir).acquire().release()  # the kernel dropped the dead winner's lock
