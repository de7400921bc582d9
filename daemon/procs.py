"""Process identity and control (psutil): is a pid alive, what it runs, and ending its group.

A pid alone names a process only while it lives: the kernel reuses it, and a rebooted
host hands the same numbers out again. Re-attach and kill decisions therefore go through
``ProcessRecord`` (``engine.contract.identity``: pid, start time, boot id, run dir,
attempt, written when the process was started) and act only on an exact match. Every call
here answers instead of raising: a process that is gone, a zombie, or one we may not signal
is an answer too.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import psutil
from milepost.engine.contract.identity import ProcessIdentity, ProcessRecord

__all__ = ["ProcessIdentity", "ProcessRecord", "alive", "cmdline", "kill_group", "kill_recorded", "runs"]

log = logging.getLogger(__name__)

_DEAD = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


def alive(pid: int) -> bool:
    """True for a live, non-zombie process."""
    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() not in _DEAD
    except psutil.Error:
        return False


def cmdline(pid: int) -> str:
    """The process's command line, its arguments joined by spaces ("" when unreadable)."""
    if pid <= 0:
        return ""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def runs(pid: int, marker: str) -> bool:
    """True when ``pid`` is alive and its command line contains ``marker``."""
    return alive(pid) and marker in cmdline(pid)


def kill_group(pid: int, *, or_process: bool = False) -> bool:
    """SIGKILLs the process group ``pid`` leads; ``or_process``: the process alone when the group
    cannot be signalled. True when a signal was sent; never raises: a gone process or a refused
    signal is an answer (logged), not an error that would stop the caller's next tick."""
    if pid <= 0:
        return False  # killpg(0) would signal our own group
    try:
        os.killpg(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        pass
    except PermissionError:
        log.warning("not allowed to signal process group %d", pid)
    if or_process:
        try:
            os.kill(pid, signal.SIGKILL)
            return True
        except ProcessLookupError:
            pass
        except PermissionError:
            log.warning("not allowed to signal process %d", pid)
    return False


def kill_recorded(record: ProcessRecord | None, *, or_process: bool = False) -> bool:
    """Kills the group of the process ``record`` names, only while that very process lives."""
    if record is None or not record.is_running():
        return False
    return kill_group(record.pid, or_process=or_process)


def engine_processes(run_dir: Path, attempt: int) -> list[int]:
    """Live engine processes started for ``attempt`` of ``run_dir`` (found by their command line:
    for a process whose spawn was recorded as an intent only, without its pid)."""
    want = str(run_dir.resolve())
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        args = p.info.get("cmdline") or []
        if "milepost.engine.cli" not in args or "--run-dir" not in args or "--attempt" not in args:
            continue
        try:
            rd = Path(args[args.index("--run-dir") + 1])
            n = int(args[args.index("--attempt") + 1])
        except (IndexError, ValueError):
            continue
        if n == attempt and str(rd.resolve()) == want and alive(p.info["pid"]):
            found.append(int(p.info["pid"]))
    return found
