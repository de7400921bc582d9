"""Telemetry yields CPU to training, and training never inherits that: the niceness of the
daemon's threads (supervisor.telemetry_nice) stays off the attempts it launches."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest
from milepost.daemon.store import Store
from milepost.daemon.supervisor import Supervisor
from milepost.engine.contract.config import OpsView
from milepost.engine.wire import lower_thread_priority

pytestmark = pytest.mark.timeout(30)


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def test_children_of_a_niced_supervisor_thread_run_at_the_daemons_priority(tmp_path: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base + 10 > 19:
        pytest.skip("this process is already too nice to tell the difference")
    store = Store(tmp_path)
    sup = Supervisor(
        job="job.toml", run_dir=tmp_path, ops=OpsView(), store=store, token="t", api_url="http://x"
    )
    seen: dict[str, int] = {}

    def niced_thread() -> None:
        lower_thread_priority(10)  # as daemon.main does to the supervisor's thread
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        plain = subprocess.Popen(["sleep", "5"])  # forked here: inherits the thread's niceness
        launched = sup.popen(["sleep", "5"])
        try:
            seen["plain"], seen["launched"] = nice_of(plain.pid), nice_of(launched.pid)
        finally:
            for p in (plain, launched):
                p.kill()
                p.wait()

    t = threading.Thread(target=niced_thread)
    t.start()
    t.join()
    sup.shutdown()
    store.close()
    assert seen["thread"] == base + 10
    assert seen["plain"] == base + 10  # the witness: inheritance is real on this kernel
    assert seen["launched"] == base
