"""Shared by the benchmarks: start the real daemon on a variant of the default job, stop it after."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def job_text(overrides: dict[str, dict[str, Any]]) -> str:
    job = tomllib.loads((REPO / "examples" / "tiny-grpo-cpu.toml").read_text())
    for section, values in overrides.items():
        job.setdefault(section, {}).update(values)
    lines = []
    for section, table in job.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def start_detached(job: Path, run_dir: Path) -> int:
    """``milepost run --detach`` (a re-attach when a daemon ran on ``run_dir`` before); the daemon's pid."""
    from milepost.engine.cluster import loopback_env

    cmd = [sys.executable, "-m", "milepost.daemon.cli", "run", str(job), "--run-dir", str(run_dir)]
    subprocess.run(
        [*cmd, "--detach", "--exit-when-done"],
        check=True,
        env={**os.environ, **loopback_env()},
        timeout=120,
        stdout=subprocess.DEVNULL,
    )
    return int(json.loads((run_dir / "daemon.json").read_text())["pid"])


def stop_all(run_dir: Path, daemon_pids: list[int]) -> None:
    """Kills every attempt and standby the store knows of, and the daemons."""
    from milepost.daemon.store import Store

    with contextlib.suppress(Exception):
        store = Store(run_dir)
        pids = [a["pid"] for a in store.attempts()] + [store.offset("standby_pid")]
        store.close()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if pid:
                    os.killpg(pid, signal.SIGKILL)
    for pid in daemon_pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def daemon(overrides: dict[str, dict[str, Any]], prefix: str, extra: str = "") -> Iterator[tuple[Any, Path]]:
    """Yields (client, run_dir) of a detached daemon; kills it and its attempts afterwards.

    ``extra``: TOML text appended to the job (tables of tables, like ``[[alerts.routes]]``)."""
    from milepost.daemon.client import DaemonClient

    tmp = Path(tempfile.mkdtemp(prefix=f"milepost-bench-{prefix}-"))
    (tmp / "job.toml").write_text(job_text(overrides) + extra)
    run_dir = tmp / "run"
    daemon_pid = start_detached(tmp / "job.toml", run_dir)
    try:
        yield DaemonClient.from_run_dir(run_dir), run_dir
    finally:
        stop_all(run_dir, [daemon_pid])


def wait_for(what: str, pred: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if value := pred():
                return value
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
