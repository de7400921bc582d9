"""Is the running attempt alive and making progress? (pure logic: the clock is passed in.)

``check(...)`` looks at the ranks' newest reports, the newest step's time and the
attempt's start, at ``now``, and returns a ``Verdict`` that ends the attempt, or None:

Every age is on the daemon's clock: a rank's heartbeat is when its newest report arrived
(the store's ``received_at``), never the rank's own ``ts``, so a node whose clock runs behind
or ahead is judged by what the daemon saw; ``on_daemon_clock`` moves a report's own times
(``ts``, open collectives' ``enter_ts``) onto the daemon's clock for the hang detector.

- ``heartbeat_lost``: a rank of the attempt (not one that said it exited) sent no report
  for longer than its role's timeout (``heartbeat_timeout_<role>_s``; 30 s for an unknown
  role). Ages count from the later of the report and the attempt's (or daemon's) start, so
  a restarted daemon does not blame ranks for the time it was down;
- ``progress_stalled`` before the first step: none came within ``startup_grace_s`` of the
  attempt's start;
- ``progress_stalled`` after it: no step for longer than the adaptive bound
  ``max(progress_floor_s, progress_factor x median of the recent step times)``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any, NamedTuple

from milepost.engine.contract.config import SupervisorConfig
from milepost.engine.contract.enums import RankStatus, Role
from milepost.engine.contract.events import EventKind


class Verdict(NamedTuple):
    kind: EventKind
    message: str
    data: dict[str, Any]


def progress_bound(recent_step_s: Iterable[float], cfg: SupervisorConfig) -> float:
    """How long a step may take: max(floor, factor x the median of the recent step times)."""
    recent = list(recent_step_s)
    median = statistics.median(recent) if recent else 0.0
    return max(cfg.progress_floor_s, cfg.progress_factor * median)


def heartbeat_timeouts(cfg: SupervisorConfig) -> dict[str, float]:
    return {
        Role.DRIVER: cfg.heartbeat_timeout_driver_s,
        Role.TRAINER: cfg.heartbeat_timeout_trainer_s,
        Role.ROLLOUT: cfg.heartbeat_timeout_rollout_s,
    }


def phases(ranks: Iterable[dict[str, Any]]) -> str:
    return ", ".join(f"{r['role']} {r['rank']}: {r['data'].get('phase')}" for r in ranks)


def heartbeat_at(row: dict[str, Any]) -> float:
    """When the daemon received the rank's newest report (its own ``ts`` for a row without it)."""
    received = row.get("received_at")
    return float(received) if received else float(row["data"].get("ts", 0))


def on_daemon_clock(row: dict[str, Any]) -> dict[str, Any]:
    """The rank's newest report with its times shifted by (receive time - its own ts): the rank's clock offset."""
    d = row["data"]
    received = row.get("received_at")
    if not received:
        return d
    offset = float(received) - float(d.get("ts", received))
    moved = [{**c, "enter_ts": float(c["enter_ts"]) + offset} for c in d.get("open_collectives") or []]
    return {**d, "ts": float(received), "open_collectives": moved}


def check(
    ranks: list[dict[str, Any]],
    *,
    attempt: int,
    now: float,
    attempt_started: float,
    daemon_started: float,
    last_step_ts: float,
    recent_step_s: Iterable[float],
    cfg: SupervisorConfig,
) -> Verdict | None:
    """``ranks``: the store's rank rows (role, rank, attempt, received_at, data: the newest report)."""
    timeouts = heartbeat_timeouts(cfg)
    floor = max(daemon_started, attempt_started)
    for r in ranks:
        d = r["data"]
        if r["attempt"] != attempt or d.get("state") == RankStatus.EXITED:
            continue
        age = now - max(heartbeat_at(r), floor)
        if age > timeouts.get(r["role"], 30.0):
            return Verdict(
                EventKind.HEARTBEAT_LOST,
                f"{r['role']} {r['rank']} (pid {d.get('pid')} on {d.get('host')}) sent no heartbeat for "
                f"{age:.0f}s (limit {timeouts[r['role']]:.0f}s); last seen at step {d.get('step')} in phase "
                f"{d.get('phase')}",
                {"role": r["role"], "rank": r["rank"], "pid": d.get("pid"), "phase": d.get("phase")},
            )
    if last_step_ts <= attempt_started:
        waited = now - max(attempt_started, daemon_started)
        if waited > cfg.startup_grace_s:
            return Verdict(
                EventKind.PROGRESS_STALLED,
                f"attempt {attempt} took no step in {waited:.0f}s after start "
                f"(startup grace {cfg.startup_grace_s:.0f}s)",
                {"waited_s": waited},
            )
        return None
    bound = progress_bound(recent_step_s, cfg)
    waited = now - max(last_step_ts, daemon_started)
    if waited > bound:
        return Verdict(
            EventKind.PROGRESS_STALLED,
            f"no step for {waited:.0f}s (bound {bound:.0f}s = max(floor, {cfg.progress_factor:g} x median "
            f"step time)); ranks' phases: {phases(ranks)}",
            {"waited_s": waited, "bound_s": bound},
        )
    return None
