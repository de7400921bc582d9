"""Process identity and control through psutil."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from milepost.daemon import procs


def test_identity_alive_cmdline_and_group_kill() -> None:
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while procs.cmdline(child.pid) != "sleep 30":  # the fork shows the parent's until the exec
            assert time.monotonic() < deadline
            time.sleep(0.01)
        ident = procs.ProcessIdentity.of(child.pid)
        assert ident is not None and ident.is_running()
        assert procs.alive(child.pid) and procs.runs(child.pid, "sleep 30")
        assert not procs.runs(child.pid, "--standby-dir")
        procs.kill_group(child.pid)
        child.wait(timeout=10)
        assert not procs.alive(child.pid) and not ident.is_running()
    finally:
        child.kill()
        child.wait()
    assert procs.ProcessIdentity.of(child.pid) is None and procs.cmdline(child.pid) == ""


def test_nothing_to_kill_and_no_permission_never_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    procs.kill_group(0)  # never our own group
    procs.kill_group(2**22 + 12345, or_process=True)  # no such process
    assert not procs.alive(0) and procs.cmdline(-1) == ""

    def refused(pid: int, sig: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "killpg", refused)
    monkeypatch.setattr(os, "kill", refused)
    procs.kill_group(4242, or_process=True)  # a process not ours: refused, quietly
