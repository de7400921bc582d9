"""Goodput: productive step time over wall time, and where the rest went (badput buckets).

Kept as a running ledger the daemon updates once per step record, so a status read costs
the same at step 100 as at step 1,000,000 (no scan of the steps table).

- productive: the step time of every step that stands (a step redone after a restart
  counts once, its lost first run goes to ``lost_progress_s``), minus checkpoint stalls;
- startup: run creation to the first step of the first attempt;
- recovery: last step of an attempt to the first step of the next;
- lost_progress: step time of work redone after a restart (from its checkpoint on);
- checkpoint_stall: time steps spent blocked in the checkpoint phase;
- other: the remainder (pauses, the tail of a finished run).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class GoodputLedger:
    def __init__(self) -> None:
        self.step_s = 0.0
        self.stall_s = 0.0
        self.first_start: dict[int, float] = {}  # attempt -> start of its first step
        self.last_end: dict[int, float] = {}  # attempt -> end of its last step (redone ones included)

    @classmethod
    def of(cls, steps: Iterable[dict[str, Any]]) -> GoodputLedger:
        ledger = cls()
        for s in steps:
            ledger.add(s)
        return ledger

    @classmethod
    def from_totals(cls, totals: dict[str, Any]) -> GoodputLedger:
        """From the store's totals (``Store.step_totals``): no scan of the steps table at start-up."""
        ledger = cls()
        ledger.step_s, ledger.stall_s = float(totals["step_s"]), float(totals["stall_s"])
        for attempt, (first, last) in totals["spans"].items():
            ledger.first_start[attempt], ledger.last_end[attempt] = first, last
        return ledger

    def add(self, rec: dict[str, Any], replaces: dict[str, Any] | None = None) -> None:
        """One step record; ``replaces``: the stored record of the same step it supersedes."""
        if replaces is not None:
            self.step_s -= float(replaces.get("step_s", 0.0))
            self.stall_s -= _stall(replaces)
        self.step_s += float(rec.get("step_s", 0.0))
        self.stall_s += _stall(rec)
        a = int(rec.get("attempt", 0) or 0)
        end = float(rec.get("ts", 0.0))
        begin = end - float(rec.get("step_s", 0.0))
        self.first_start[a] = min(self.first_start.get(a, begin), begin)
        self.last_end[a] = max(self.last_end.get(a, 0.0), end)

    def summary(
        self, *, created_at: float, end: float, attempts: list[dict[str, Any]], lost_s: float
    ) -> dict[str, Any]:
        wall = max(end - created_at, 1e-9)
        productive = self.step_s - self.stall_s
        startup = recovery = 0.0
        for i, a in enumerate(attempts):
            n = a["number"]
            began = self.first_start.get(n, a.get("ended_at") or end)
            if i == 0:
                startup += max(0.0, began - created_at)
            else:
                prev = attempts[i - 1]
                prev_end = self.last_end.get(prev["number"], prev.get("started_at") or created_at)
                recovery += max(0.0, began - prev_end)
        other = max(0.0, wall - productive - self.stall_s - lost_s - startup - recovery)
        return {
            "goodput": max(0.0, min(1.0, productive / wall)),
            "wall_s": wall,
            "productive_s": productive,
            "badput": {
                "startup_s": startup,
                "recovery_s": recovery,
                "lost_progress_s": lost_s,
                "checkpoint_stall_s": self.stall_s,
                "other_s": other,
            },
        }


def _stall(rec: dict[str, Any]) -> float:
    return float((rec.get("phases") or {}).get("checkpoint", 0.0))
