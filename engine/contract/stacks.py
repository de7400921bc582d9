"""A process's Python stacks as text (``py-spy dump``), for the evidence of a hang.

Both sides run it: the per-node stack helper on the Ray node of each rank
(``engine.stack_helper``) and the daemon for ranks on its own host. It must work on a
SIGSTOPped process, the culprit an operator needs most: py-spy's default (blocking)
mode attaches with ptrace and fails there ("Failed to suspend process", only its two
header lines on stdout), while ``--nonblocking`` reads the stopped process's memory and
gives every thread's frames (checked with py-spy 0.4.3 on these machines).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PY_SPY_TIMEOUT_S = 10.0


def py_spy_exe() -> str:
    """The py-spy beside this interpreter (a venv's), else the one on PATH."""
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else "py-spy"


def is_stopped(pid: int) -> bool:
    """True for a process stopped by a signal (state T) or a tracer (t)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state follows the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rfind(")") + 2 :].split()
    return bool(fields) and fields[0] in ("T", "t")


def dump_stacks(pid: int, *, timeout_s: float = PY_SPY_TIMEOUT_S) -> str:
    """``py-spy dump`` of ``pid``: non-blocking for a stopped process, or when the blocking dump
    fails; the text says why when none worked."""
    modes = [["--nonblocking"]] if is_stopped(pid) else [[], [], ["--nonblocking"]]
    text = ""
    for extra in modes:  # py-spy sometimes misses the interpreter on its first look: retry
        cmd = [py_spy_exe(), "dump", "--pid", str(pid), *extra]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            text = f"py-spy failed: {e!r}"
            continue
        if res.returncode == 0:
            return res.stdout
        text = (res.stdout + "\n" + res.stderr).strip()
    return text
