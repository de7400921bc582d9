"""Starting attempt processes, and the warm standby that makes a restart fast.

An attempt is one engine driver process (``milepost engine JOB --attempt N``) in a session
of its own, so it outlives the daemon (separate failure domains); its output goes to
``attempts/attempt_N.log``. Processes are forked by the launcher's own thread: a child
inherits the niceness of the thread that forks it, and the daemon's threads may run at
the telemetry niceness (``daemon.main``), while attempts must run at full priority.

The warm standby is the next attempt started ahead (imports done, Ray up) with
``--standby-dir``: it waits for a ``go`` file there, and writes ``ready`` when it can
take over. Its pid is kept in the store (offset ``standby_pid``) for tools and tests.

Every spawn is recorded in ``attempts/attempt_N.proc.json`` (``engine.contract.identity``):
first the intent (run dir, attempt, kind; no pid yet), then the process's pid, start time
and boot id. A daemon that starts ends every recorded process of its run dir except the
attempt it re-attaches to (``end_orphans``): a standby no one will start, or an attempt a
daemon that died started without recording it in the store. Each acts on an exact identity
match only (or, for a bare intent, on the engine command line of this run dir and attempt).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from milepost.engine.contract.enums import AttemptState
from milepost.engine.contract.identity import ProcessRecord
from milepost.engine.contract.layout import RunDir, StandbyDir
from milepost.engine.contract.process import RUN_ID_ENV, TOKEN_ENV

from . import procs

STANDBY_MARKER = "--standby-dir"  # in a standby's command line


class Launcher:
    def __init__(
        self,
        *,
        job: str,
        run_dir: Path,
        token: str,
        api_url: str,
        ray_address: str | None = None,
        run_id: Callable[[], str] = lambda: "",
    ) -> None:
        self.job, self.run_dir, self.token, self.api_url = job, run_dir, token, api_url
        self.ray_address, self.run_id = ray_address, run_id
        # Made here, by the thread that builds the supervisor: its priority is the one children get.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milepost-launcher")
        self._thread.submit(lambda: None).result()

    def command(self, n: int, standby_dir: Path | None = None) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "milepost.engine.cli",
            "engine",
            self.job,
            "--run-dir",
            str(self.run_dir.resolve()),
            "--attempt",
            str(n),
            "--daemon-url",
            self.api_url,
            "--elastic",
            "--no-progress",
        ]
        if self.ray_address:
            cmd += ["--ray-address", self.ray_address]
        if standby_dir is not None:
            cmd += [STANDBY_MARKER, str(standby_dir)]
        return cmd

    def env(self) -> dict[str, str]:
        env = {
            **os.environ,
            TOKEN_ENV: self.token,
            "PYTHONUNBUFFERED": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            RUN_ID_ENV: self.run_id(),  # a trace resource attribute
        }
        env.setdefault("RAY_AUTH_MODE", "disabled")
        return env

    def spawn(self, n: int, standby_dir: Path | None = None) -> subprocess.Popen[bytes]:
        """Starts attempt ``n`` (as a standby waiting in ``standby_dir`` when given)."""
        run_dir = RunDir(self.run_dir)
        run_dir.attempts.mkdir(exist_ok=True)
        kind = "attempt" if standby_dir is None else "standby"
        intent = ProcessRecord(kind, str(self.run_dir.resolve()), n)
        intent.write(run_dir.attempt_record(n))  # before the spawn: a crash now leaves a findable orphan
        with run_dir.attempt_log(n).open("ab") as out:
            # A session of its own: the attempt outlives the daemon (separate failure domains).
            proc = self.popen(
                self.command(n, standby_dir),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
                cwd=os.getcwd(),
            )
        intent.with_process(proc.pid).write(run_dir.attempt_record(n))
        return proc

    def record(self, n: int) -> ProcessRecord | None:
        """Attempt ``n``'s process record, if it was started by a daemon that records them."""
        return ProcessRecord.read(RunDir(self.run_dir).attempt_record(n))

    def running_record(self, last: dict[str, Any] | None) -> ProcessRecord | None:
        """The record of the store's running attempt (row ``last``) while that very process lives.

        An attempt started before records were kept is matched by its engine command line
        (this run dir, this attempt), never by its pid alone."""
        if not last or last["state"] != AttemptState.RUNNING or not last["pid"]:
            return None
        n, pid = last["number"], last["pid"]
        rec = self.record(n)
        if rec is not None:
            return rec if rec.names(pid, run_dir=self.run_dir, attempt=n) else None
        if pid in procs.engine_processes(self.run_dir, n):
            return ProcessRecord("attempt", str(self.run_dir.resolve()), n).with_process(pid)
        return None

    def end_orphans(self, keep: int | None = None) -> list[int]:
        """Kills every recorded process of this run dir but attempt ``keep``; returns their pids."""
        ended = []
        mine = str(self.run_dir.resolve())
        for n, path in sorted(RunDir(self.run_dir).attempt_records().items()):
            rec = ProcessRecord.read(path)
            if n == keep or rec is None or rec.run_dir != mine:
                continue
            pids = [rec.pid] if rec.pid else procs.engine_processes(self.run_dir, n)
            for pid in pids:
                if (rec.pid == 0 or rec.is_running()) and procs.kill_group(pid, or_process=True):
                    ended.append(pid)
        return ended

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen`` from the launcher thread: the child gets the launcher's
        priority, whatever the niceness of the calling thread."""

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(cmd, **kwargs)

        return self._thread.submit(start).result()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False)


class Offsets(Protocol):
    def offset(self, name: str) -> int: ...
    def set_offset(self, name: str, value: int) -> None: ...


@dataclass
class Standby:
    attempt: int
    dir: Path
    proc: subprocess.Popen[bytes]

    def ready(self) -> bool:
        return self.proc.poll() is None and StandbyDir(self.dir).ready.exists()


class WarmStandby:
    """At most one standby attempt: spawned, taken over through its go file, or dropped."""

    def __init__(self, launcher: Launcher, offsets: Offsets) -> None:
        self.launcher, self.offsets = launcher, offsets
        self.held: Standby | None = None

    def spawn(self, n: int) -> None:
        where = RunDir(self.launcher.run_dir).standby(n).path
        if where.exists():
            shutil.rmtree(where, ignore_errors=True)
        self.held = Standby(n, where, self.launcher.spawn(n, where))
        self.offsets.set_offset("standby_pid", self.held.proc.pid)

    def take(self, n: int) -> subprocess.Popen[bytes] | None:
        """The standby's process, told to go, when it is attempt ``n`` and ready; else None."""
        sb = self.held
        if sb is None or sb.attempt != n or not sb.ready():
            return None
        StandbyDir(sb.dir).go.touch()
        self.held = None
        return sb.proc

    def drop(self) -> None:
        if self.held is not None:
            # Our own child, not yet reaped: its pid cannot have been reused.
            if procs.kill_group(self.held.proc.pid):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.held.proc.wait(timeout=10)
            self.held = None
            self.offsets.set_offset("standby_pid", 0)
