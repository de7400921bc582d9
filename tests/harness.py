"""Drives a real daemon (``milepost run --detach``) on a temporary run dir, for end-to-end tests.

Everything it starts is stopped at the end: the daemon and every attempt's process
group (which takes the attempt's own loopback Ray cluster with it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from milepost.daemon.client import DaemonClient, DaemonError
from milepost.daemon.store import Store

MILEPOST = [sys.executable, "-m", "milepost.daemon.cli"]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    raise TypeError(f"cannot write {v!r} to TOML")


def job_doc(base: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """``base`` with ``sections`` merged in: a table updates its section, anything else replaces it."""
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in sections.items():
        if isinstance(v, dict):
            doc.setdefault(k, {}).update(v)
        else:
            doc[k] = v
    return doc


def e2e_job(name: str, *, seed: int, steps: int, **sections: Any) -> dict[str, Any]:
    """A job for the daemon end to end (two gloo ranks, groups of 4 in 2 minibatches), ``sections`` merged in."""
    doc: dict[str, Any] = {
        "run": {"name": name, "seed": seed, "steps": steps},
        "grpo": {"prompts_per_step": 8, "group_size": 4, "minibatches": 2},
        "trainer": {"world_size": 2, "collective_timeout_s": 60.0},
        "checkpoint": {"interval": 2, "keep_last": 3},
        "supervisor": {"backoff_initial_s": 0.5, "backoff_max_s": 2.0, "allow_faults": True},
    }
    return job_doc(doc, **sections)


def write_job(path: Path, doc: dict[str, Any]) -> Path:
    lines: list[str] = []
    for section, table in doc.items():
        if isinstance(table, list):
            for item in table:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonRun:
    def __init__(self, tmp: Path, doc: dict[str, Any], *, ray_address: str | None = None) -> None:
        self.tmp, self.run_dir = tmp, tmp / "run"
        self.job = write_job(tmp / "job.toml", doc)
        self.ray_address = ray_address
        self.daemon_pids: list[int] = []

    # -- processes ------------------------------------------------------------
    def start(self) -> DaemonClient:
        cmd = [
            *MILEPOST,
            "run",
            str(self.job),
            "--run-dir",
            str(self.run_dir),
            "--detach",
            "--exit-when-done",
        ]
        if self.ray_address:
            cmd += ["--ray-address", self.ray_address]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, f"milepost run failed: {out.stdout}\n{out.stderr}"
        info = json.loads((self.run_dir / "daemon.json").read_text())
        self.daemon_pids.append(int(info["pid"]))
        return self.client()

    def client(self) -> DaemonClient:
        return DaemonClient.from_run_dir(self.run_dir)

    def kill_daemon(self) -> int:
        pid = self.daemon_pids[-1]
        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return pid

    def cleanup(self) -> None:
        for pid in self.daemon_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if (self.run_dir / "milepost.db").exists():
            store = Store(self.run_dir)
            # The warm standby is in no attempt row yet; left alive it keeps a Ray cluster running.
            standby = store.offset("standby_pid")
            for pid in [a["pid"] for a in store.attempts()] + ([standby] if standby else []):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
            store.close()

    # -- reading --------------------------------------------------------------
    def store(self) -> Store:
        return Store(self.run_dir)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        store = self.store()
        try:
            return store.events(kind=kind, limit=100000)
        finally:
            store.close()

    def status(self) -> dict[str, Any]:
        store = self.store()
        try:
            run = store.run() or {}
            last = store.last_step()
            return {
                "state": run.get("state"),
                "reason": run.get("reason"),
                "step": last["step"] if last else 0,
            }
        finally:
            store.close()

    def wait(self, what: str, pred: Callable[[], Any], timeout: float = 180.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = pred()
            except (DaemonError, OSError, KeyError):
                value = None
            if value:
                return value
            time.sleep(0.3)
        raise AssertionError(
            f"timed out after {timeout:.0f}s waiting for {what}; status {self.status()}; "
            f"events {[(e['kind'], e['message'][:120]) for e in self.events()][-15:]}"
        )

    def wait_steps_written(self, more: int, what: str, timeout: float = 60.0) -> None:
        """Waits for ``more`` steps past those in steps.jsonl now: the driver writes them, daemon or not."""
        steps_file = self.run_dir / "steps.jsonl"
        before = len(steps_file.read_text().splitlines())
        self.wait(what, lambda: len(steps_file.read_text().splitlines()) >= before + more, timeout)

    def wait_state(self, *states: str, timeout: float = 240.0) -> dict[str, Any]:
        return self.wait(f"state in {states}", lambda: (s := self.status())["state"] in states and s, timeout)

    def wait_step(self, step: int, timeout: float = 180.0) -> dict[str, Any]:
        return self.wait(f"step >= {step}", lambda: (s := self.status())["step"] >= step and s, timeout)
