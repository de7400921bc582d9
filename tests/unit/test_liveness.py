"""Liveness verdicts as a pure function of the ranks' rows and a clock passed in."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from milepost.daemon.liveness import check, on_daemon_clock, progress_bound
from milepost.daemon.store import Store
from milepost.daemon.supervisor import Supervisor
from milepost.engine.contract.config import OpsView, SupervisorConfig

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


def test_a_rank_whose_clock_runs_behind_is_judged_by_when_its_reports_arrive() -> None:
    behind = rank(ts=T0 - 50)  # the node's clock is 50 s behind; its report arrived just now
    behind["received_at"] = T0 + 20
    assert verdict([behind], now=T0 + 25) is None
    behind["received_at"] = T0 + 2  # and silence is still silence, counted on the daemon's clock
    assert verdict([behind], now=T0 + 25).kind == "heartbeat_lost"


def test_on_daemon_clock_moves_a_reports_own_times_by_its_clock_offset() -> None:
    row = rank(ts=T0 - 5, open_collectives=[{"op": "all_reduce", "group": "g", "seq": 3, "enter_ts": T0 - 6}])
    row["received_at"] = T0
    d = on_daemon_clock(row)
    assert d["ts"] == T0 and d["open_collectives"][0]["enter_ts"] == T0 - 1
    assert row["data"]["ts"] == T0 - 5  # the stored row is left as it was


def test_a_node_5s_behind_is_neither_frozen_nor_lost(tmp_path: Path) -> None:
    """The supervisor's own checks on real store rows: rank 1's clock is 5 s behind, both report live."""
    ops = OpsView()
    assert ops.detection.stale_heartbeat_s < 5  # the skew is over the frozen bound
    store = Store(tmp_path)
    sup = Supervisor(job="job.toml", run_dir=tmp_path, ops=ops, store=store, token="t", api_url="http://x")
    now = time.time()
    sup.started_at = sup.attempt.started = now - 120
    sup.attempt.number, sup.attempt.last_step_ts = 1, now - 1
    for r, skew in ((0, 0.0), (1, -5.0)):
        data = {"ts": now + skew, "pid": 1, "host": "h", "step": 40, "phase": "train", "state": "running"}
        store.upsert_rank("trainer", r, 1, data)
    try:
        assert sup._check_hang() is None
        assert sup._check_liveness() is None
        assert all(r["heartbeat_age_seconds"] < 2 for r in sup.controller.ranks())
    finally:
        sup.shutdown()
        store.close()
