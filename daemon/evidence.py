"""Evidence of a diagnosed hang, saved in ``<run_dir>/diagnostics/diagnosis_N/``.

Stacks of every rank of the attempt (``py-spy dump``, non-blocking for a stopped rank; one
thread per rank, all at once so the stacks are of the same moment), and the list of the flight-recorder dumps the ranks
wrote for that attempt (``diagnostics/fr_attempt<N>_*.json``).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from milepost.engine.contract.layout import RunDir, stack_file_name
from milepost.engine.contract.stacks import PY_SPY_TIMEOUT_S, dump_stacks

JOIN_TIMEOUT_S = 15.0


def collect(
    run_dir: Path, diag_id: int, attempt: int, ranks: list[dict[str, Any]], *, stacks: bool
) -> dict[str, Any]:
    """``ranks``: the store's rank rows; those of ``attempt`` with a pid are dumped when ``stacks``."""
    out = RunDir(run_dir).diagnosis(diag_id)
    out.mkdir(parents=True, exist_ok=True)
    evidence: dict[str, Any] = {"dir": str(out), "stacks": {}, "flight_recorder": []}
    if stacks:
        threads = []
        for r in ranks:
            if r["attempt"] != attempt or not r["data"].get("pid"):
                continue
            name, dest = f"{r['role']}{r['rank']}", out / stack_file_name(r["role"], r["rank"])
            t = threading.Thread(target=py_spy, args=(int(r["data"]["pid"]), dest), daemon=True)
            t.start()
            threads.append((name, dest, t))
        for name, dest, t in threads:
            t.join(timeout=JOIN_TIMEOUT_S)
            evidence["stacks"][name] = str(dest)
    evidence["flight_recorder"] = [str(p) for p in RunDir(run_dir).flight_recorder_dumps(attempt)]
    return evidence


def py_spy(pid: int, dest: Path) -> None:
    """Writes the stacks of ``pid`` (or why none could be read) to ``dest``."""
    dest.write_text(dump_stacks(pid, timeout_s=PY_SPY_TIMEOUT_S))
