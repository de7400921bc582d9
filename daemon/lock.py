"""One daemon per run directory: an exclusive ``flock`` on ``<run_dir>/daemon.lock`` for its lifetime.

The kernel drops the lock when the holder's process dies, however it dies, so a crashed
daemon never leaves a stale lock, and two ``milepost run`` started at the same moment
cannot both supervise one run dir. The holder writes its pid and API URL into the file, so
that the one refused can name it. The file descriptor is not inherited by attempts (Python
opens files close-on-exec): an attempt that outlives its daemon does not hold the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Any

from milepost.engine.contract.layout import RunDir


class Held(RuntimeError):
    """Another process holds the run dir's daemon lock."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path, self.holder = path, holder
        who = f"pid {holder.get('pid', '?')}, {holder.get('url') or 'URL not written yet'}"
        super().__init__(f"another milepost daemon supervises {path.parent} ({who}); lock {path}")


def _holder(path: Path, run_dir: Path) -> dict[str, Any]:
    """What the holder wrote into the lock file, else its daemon.json (it may not have written yet)."""
    for source in (path, RunDir(run_dir).daemon_file):
        with contextlib.suppress(OSError, ValueError):
            doc = json.loads(source.read_text())
            if isinstance(doc, dict) and doc.get("pid"):
                return doc
    return {}


class DaemonLock:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = RunDir(run_dir).daemon_lock
        self._fd: int | None = None

    def acquire(self, *, describe: bool = True) -> DaemonLock:
        """Takes the lock, or raises ``Held`` naming the holder. Never blocks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Held(self.path, _holder(self.path, self.run_dir)) from None
        self._fd = fd
        if describe:
            self.describe(pid=os.getpid(), url="")
        return self

    def describe(self, **info: Any) -> None:
        """Writes the holder's pid and URL into the lock file (for the one refused)."""
        if self._fd is None:
            return
        data = json.dumps(info).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The lock holder's pid and URL while a daemon holds ``run_dir``'s lock; None when none does."""
    probe = DaemonLock(run_dir)
    if not probe.path.exists():
        return None
    try:
        probe.acquire(describe=False)
    except Held as e:
        return e.holder or {"pid": "?", "url": ""}
    probe.release()
    return None
