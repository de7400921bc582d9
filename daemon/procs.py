"""Process identity and control (psutil): is a pid alive, what it runs, and ending its group.

A pid alone names a process only while it lives: the kernel reuses it. ``ProcessIdentity``
adds the process's create time and the host's boot time, so that a recorded identity can
tell its own process from a later one with the same pid. Every call here answers instead
of raising: a process that is gone, a zombie, or one we may not signal is an answer too.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

import psutil

_DEAD = (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    create_time: float  # seconds since the epoch, as psutil reads it
    boot_time: float  # the host's boot: a create time is only comparable within one boot

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of a live process, None when there is none under ``pid``."""
        if pid <= 0:
            return None
        try:
            return cls(pid, psutil.Process(pid).create_time(), psutil.boot_time())
        except psutil.Error:
            return None

    def is_running(self) -> bool:
        """True while the very process this identity names lives (not a reuse of its pid)."""
        now = ProcessIdentity.of(self.pid)
        return now == self and alive(self.pid)


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


def kill_group(pid: int, *, or_process: bool = False) -> None:
    """SIGKILLs the process group ``pid`` leads; ``or_process``: the process alone when the group
    cannot be signalled. Never raises: a gone process or a refused signal is nothing to do."""
    if pid <= 0:
        return  # killpg(0) would signal our own group
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if or_process:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
