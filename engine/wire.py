"""Builds a rank's report, the contract's Report (milepost.engine.contract.wire), as a plain dict.

A rank's reporter POSTs ``{"reports": [report, ...]}`` to ``/api/v1/ingest`` with the
run's bearer token. Each report is a snapshot of the rank: heartbeat, step, phase, open
collectives, last-step timings and metrics, and a per-rank sequence number so the daemon
can deduplicate replays and count gaps. The response carries the run's desired control
state (pause/stop/checkpoint requests) and faults to inject. The dict is built by hand, not
validated: reporting never costs the training side more than it must (the daemon validates).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from .contract.enums import RankStatus
from .contract.wire import WIRE_VERSION
from .instrument import RankState


def make_report(
    state: RankState,
    *,
    attempt: int,
    seq: int,
    timings: dict[str, float] | None = None,
    metrics: dict[str, float] | None = None,
    counters: dict[str, int] | None = None,
    status: str = RankStatus.RUNNING,
) -> dict[str, Any]:
    return {
        "v": WIRE_VERSION,
        "attempt": attempt,
        "role": state.role,
        "rank": state.rank,
        "seq": seq,
        "ts": time.time(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "step": state.step,
        "phase": state.phase,
        "state": status,
        "open_collectives": [
            {
                "op": c.op,
                "group": c.group,
                "seq": c.seq,
                "nbytes": c.nbytes,
                "dtype": c.dtype,
                "enter_ts": c.enter_ts,
            }
            for c in list(state.open_collectives.values())
        ],
        "coll_entered": dict(state.entered),
        "coll_completed": dict(state.completed),
        "collectives": {
            f"{op}|{group}": {
                "count": o.count,
                "seconds": o.seconds,
                "bytes": o.nbytes,
                "world": o.world,
                "p99_s": o.p99(),
            }
            for (op, group), o in list(state.ops.items())
        },
        "recent_collectives": [
            [c.group, c.seq, c.op, c.enter_ts, (c.exit_ts or 0.0) - c.enter_ts]
            for c in list(state.recent)[-32:]
        ],
        "compute": dict(state.compute),
        "compute_hist": [[s, c] for s, c in list(state.compute_hist)],
        "timings": dict(timings or {}),
        "metrics": dict(metrics or {}),
        "counters": dict(counters or {}),
    }


def lower_thread_priority(nice: int) -> None:
    """Raises the calling thread's niceness by ``nice`` (Linux threads are scheduled one by one).

    Threads it creates afterwards inherit it. Best effort: elsewhere, or where it is refused,
    nothing changes.
    """
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError):
        pass
