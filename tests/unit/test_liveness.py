"""Liveness verdicts as a pure function of the ranks' rows and a clock passed in."""

from __future__ import annotations

from typing import Any

from milepost.daemon.liveness import check, progress_bound
from milepost.engine.contract.config import SupervisorConfig

CFG = SupervisorConfig(
    heartbeat_timeout_trainer_s=20.0, startup_grace_s=60.0, progress_floor_s=30.0, progress_factor=8.0
)
T0 = 1000.0


def rank(role: str = "trainer", n: int = 0, ts: float = T0, attempt: int = 1, **data: Any) -> dict[str, Any]:
    d = {"ts": ts, "pid": 42, "host": "h", "step": 3, "phase": "train", **data}
    return {"role": role, "rank": n, "attempt": attempt, "data": d}


def verdict(ranks: list[dict[str, Any]], now: float, **kw: Any) -> Any:
    args: dict[str, Any] = {
        "attempt": 1,
        "attempt_started": T0,
        "daemon_started": T0 - 100,
        "last_step_ts": T0 + 10,
        "recent_step_s": [1.0, 2.0, 3.0],
        "cfg": CFG,
    }
    args.update(kw)
    return check(ranks, now=now, **args)


def test_heartbeat_loss_per_role() -> None:
    assert verdict([rank(ts=T0 + 5)], now=T0 + 25) is None  # 20 s old: at the limit
    v = verdict([rank(ts=T0 + 5)], now=T0 + 26)
    assert v.kind == "heartbeat_lost" and v.data == {
        "role": "trainer",
        "rank": 0,
        "pid": 42,
        "phase": "train",
    }
    assert v.message.startswith("trainer 0 (pid 42 on h) sent no heartbeat for 21s (limit 20s)")
    assert verdict([rank("rollout", ts=T0 + 5)], now=T0 + 26) is None  # rollout: 30 s
    assert verdict([rank(ts=T0, state="exited")], now=T0 + 50, last_step_ts=T0 + 45) is None
    assert verdict([rank(ts=T0, attempt=0)], now=T0 + 50, last_step_ts=T0 + 45) is None  # older attempt


def test_ages_count_from_the_later_of_report_and_start() -> None:
    # A daemon restarted at T0+40 does not blame ranks for the time it was down.
    assert verdict([rank(ts=T0)], now=T0 + 55, daemon_started=T0 + 40, last_step_ts=T0 + 50) is None


def test_startup_grace_before_the_first_step() -> None:
    assert verdict([], now=T0 + 60, last_step_ts=0.0) is None
    v = verdict([], now=T0 + 61, last_step_ts=0.0)
    assert v.kind == "progress_stalled" and v.data == {"waited_s": 61.0}
    assert v.message == "attempt 1 took no step in 61s after start (startup grace 60s)"


def test_adaptive_progress_bound() -> None:
    assert progress_bound([], CFG) == 30.0
    assert progress_bound([1.0, 5.0, 9.0], CFG) == 40.0
    now = T0 + 10 + 41
    v = verdict([rank(ts=now)], now=now, recent_step_s=[1.0, 5.0, 9.0])
    assert v.kind == "progress_stalled" and v.data == {"waited_s": 41.0, "bound_s": 40.0}
    assert "bound 40s = max(floor, 8 x median step time)" in v.message and "trainer 0: train" in v.message
    assert verdict([rank(ts=now)], now=now - 2, recent_step_s=[1.0, 5.0, 9.0]) is None
