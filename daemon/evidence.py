"""Evidence of a diagnosed hang, saved in ``<run_dir>/diagnostics/diagnosis_N/``.

Stacks of every rank of the attempt, read where each rank runs: the daemon writes a stack
request into the diagnosis folder, and the attempt's per-node stack helpers
(``engine.stack_helper``, Ray actors pinned to each node) answer it with one file per rank
(py-spy, non-blocking for a SIGSTOPped rank). A rank they did not answer for is dumped by
the daemon itself when it runs on the daemon's host (one thread per rank, all at once so
the stacks are of the same moment); one on another host gets a file saying why there is
no stack, never a dump of whatever local process has its pid. Also the list of the
flight-recorder dumps the ranks wrote for that attempt (``diagnostics/fr_attempt<N>_*.json``).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from milepost.engine.contract.layout import STACKS_DONE, STACKS_REQUEST, RunDir, stack_file_name
from milepost.engine.contract.stacks import PY_SPY_TIMEOUT_S, dump_stacks

JOIN_TIMEOUT_S = 15.0
HELPER_WAIT_S = 15.0  # the helpers' answer: a py-spy of each rank, on every node at once


def collect(
    run_dir: Path,
    diag_id: int,
    attempt: int,
    ranks: list[dict[str, Any]],
    *,
    stacks: bool,
    helper_wait_s: float = HELPER_WAIT_S,
) -> dict[str, Any]:
    """``ranks``: the store's rank rows; those of ``attempt`` with a pid are dumped when ``stacks``."""
    out = RunDir(run_dir).diagnosis(diag_id)
    out.mkdir(parents=True, exist_ok=True)
    evidence: dict[str, Any] = {"dir": str(out), "stacks": {}, "stacks_from": {}, "flight_recorder": []}
    if stacks:
        wanted = {
            f"{r['role']}{r['rank']}": r for r in ranks if r["attempt"] == attempt and r["data"].get("pid")
        }
        via_helpers = _through_helpers(RunDir(run_dir), out, attempt, list(wanted.values()), helper_wait_s)
        for name, node in via_helpers.items():
            evidence["stacks_from"][name] = f"node {node}"
        here = socket.gethostname()
        threads = []
        for name, r in wanted.items():
            dest = out / stack_file_name(r["role"], r["rank"])
            evidence["stacks"][name] = str(dest)
            if name in via_helpers:
                continue
            host = r["data"].get("host") or here
            if host != here:
                dest.write_text(
                    f"no stacks: the rank runs on {host}, and its node's stack helper did not answer\n"
                )
                evidence["stacks_from"][name] = "none"
                continue
            t = threading.Thread(target=py_spy, args=(int(r["data"]["pid"]), dest), daemon=True)
            t.start()
            threads.append(t)
            evidence["stacks_from"][name] = "daemon host"
        for t in threads:
            t.join(timeout=JOIN_TIMEOUT_S)
    evidence["flight_recorder"] = [str(p) for p in RunDir(run_dir).flight_recorder_dumps(attempt)]
    return evidence


def _through_helpers(
    run_dir: RunDir, out: Path, attempt: int, ranks: list[dict[str, Any]], wait_s: float
) -> dict[str, str]:
    """Asks the attempt's per-node stack helpers, when it has them; returns rank name -> node."""
    if not ranks or not run_dir.stack_helpers(attempt).exists():
        return {}
    request = {
        "attempt": attempt,
        "ranks": [{"role": r["role"], "rank": r["rank"], "pid": int(r["data"]["pid"])} for r in ranks],
    }
    tmp = out / (STACKS_REQUEST + ".tmp")
    tmp.write_text(json.dumps(request))
    tmp.replace(out / STACKS_REQUEST)  # whole, or not at all, for the helpers' poll
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            done = json.loads((out / STACKS_DONE).read_text())
            return {str(k): str(v) for k, v in done.get("collected", {}).items()}
        except (OSError, ValueError):
            time.sleep(0.1)
    return {}


def py_spy(pid: int, dest: Path) -> None:
    """Writes the stacks of ``pid`` (or why none could be read) to ``dest``."""
    dest.write_text(dump_stacks(pid, timeout_s=PY_SPY_TIMEOUT_S))
