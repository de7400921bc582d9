"""The dashboard as a child of the daemon (``milepost run --dashboard``, what ``make run`` uses).

Started by module name in a fresh interpreter: the daemon never imports the dashboard (nor
Streamlit), it only owns the child's lifetime and stops it when it stops.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

from milepost.engine.contract.layout import RunDir

DASHBOARD_MODULE = "milepost.dashboard.cli"


def start(run_dir: Path, port: int, host: str = "127.0.0.1") -> tuple[subprocess.Popen[bytes], str]:
    """Starts ``milepost dashboard`` on ``run_dir``; its output goes to <run_dir>/dashboard.log."""
    cmd = [
        sys.executable,
        "-m",
        DASHBOARD_MODULE,
        "--run-dir",
        str(run_dir),
        "--runs-root",
        str(run_dir.resolve().parent),
        "--port",
        str(port),
        "--host",
        host,
    ]
    log = RunDir(run_dir).dashboard_log.open("ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()  # the child holds its own descriptor
    return proc, f"http://{host}:{port}"


def stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``: the dashboard must not outlive its daemon."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=timeout_s)
