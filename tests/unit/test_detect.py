"""The hang and straggler detectors on synthetic reports: each kind of hang is told apart."""

from __future__ import annotations

import numpy as np
from milepost.daemon.detect import HangDetector, StragglerDetector
from milepost.engine.contract.config import DetectionConfig

NOW = 1000.0


def rep(
    *,
    step: int = 10,
    phase: str = "train",
    ts: float = NOW - 0.5,
    entered: int = 7,
    open_seq: int | None = None,
    enter_ts: float = NOW - 8.0,
    op: str = "all_gather",
) -> dict:
    r = {"step": step, "phase": phase, "ts": ts, "state": "running", "coll_entered": {"world": entered}}
    r["open_collectives"] = (
        [
            {
                "op": op,
                "group": "world",
                "seq": open_seq,
                "enter_ts": enter_ts,
                "nbytes": 1024,
                "dtype": "float32",
            }
        ]
        if open_seq
        else []
    )
    r["collectives"] = {f"{op}|world": {"count": 50, "seconds": 1.0, "bytes": 1, "world": 3, "p99_s": 0.05}}
    return r


def detector(**kw: float) -> HangDetector:
    return HangDetector(DetectionConfig(**kw))


def test_frozen_rank_is_named() -> None:
    reports = {
        ("trainer", 0): rep(entered=8, open_seq=8),
        ("trainer", 1): rep(entered=7, ts=NOW - 9.0),  # SIGSTOPped before it entered seq 8
        ("trainer", 2): rep(entered=8, open_seq=8),
    }
    d = detector().check(reports, NOW)
    assert d is not None and d.kind == "frozen_rank" and d.culprits == [("trainer", 1)]
    assert (d.group, d.seq, d.op) == ("world", 8, "all_gather")
    assert d.waiting == [("trainer", 0), ("trainer", 2)]
    assert "trainer 1 frozen" in d.message and "trainer 1 train@10" in d.message


def test_a_quiet_rank_is_not_called_compute_stuck_before_it_is_known_frozen() -> None:
    # Rank 0 was already waiting when rank 1 froze: the collective passes its threshold
    # before rank 1's silence reaches the stale window.
    reports = {("trainer", 0): rep(entered=8, open_seq=8), ("trainer", 1): rep(entered=7, ts=NOW - 3.0)}
    assert detector().check(reports, NOW) is None
    d = detector().check(reports, NOW + 1.5)  # silent 4.5 s: frozen
    assert d is not None and d.kind == "frozen_rank" and d.culprits == [("trainer", 1)]


def test_a_rank_frozen_inside_the_collective_is_not_called_collective_stuck() -> None:
    # Rank 1 reported after entering seq 8, then froze: both ranks are "in" the collective,
    # and it passes its threshold before rank 1's silence reaches the stale window.
    reports = {
        ("trainer", 0): rep(entered=8, open_seq=8, enter_ts=NOW - 4.1),
        ("trainer", 1): rep(entered=8, open_seq=8, enter_ts=NOW - 4.0, ts=NOW - 3.5),
    }
    assert detector().check(reports, NOW) is None
    d = detector().check(reports, NOW + 1.0)  # silent 4.5 s: frozen, inside seq 8
    assert d is not None and d.kind == "frozen_rank" and d.culprits == [("trainer", 1)]
    assert (d.group, d.seq) == ("world", 8) and d.waiting == [("trainer", 0)]


def test_skipped_collective_is_a_desync() -> None:
    reports = {
        ("trainer", 0): rep(entered=8, open_seq=8, op="all_reduce"),
        ("trainer", 1): rep(entered=7, phase="idle"),  # left the step without joining seq 8
    }
    d = detector().check(reports, NOW)
    assert d is not None and d.kind == "desync" and d.culprits == [("trainer", 1)]
    assert d.op == "all_reduce" and "skipped it" in d.message


def test_rank_stuck_in_compute_before_the_collective() -> None:
    reports = {("trainer", 0): rep(entered=8, open_seq=8), ("trainer", 1): rep(entered=7)}
    d = detector().check(reports, NOW)
    assert d is not None and d.kind == "compute_stuck" and d.culprits == [("trainer", 1)]


def test_all_entered_none_completes() -> None:
    reports = {("trainer", r): rep(entered=8, open_seq=8) for r in range(3)}
    d = detector().check(reports, NOW)
    assert d is not None and d.kind == "collective_stuck" and d.culprits == []
    assert "all 3 ranks entered it" in d.message


def test_thresholds_floor_history_warmup_and_checkpoint() -> None:
    young = {("trainer", 0): rep(entered=8, open_seq=8, enter_ts=NOW - 3.0), ("trainer", 1): rep(entered=7)}
    assert detector().check(young, NOW) is None  # under the 4 s floor
    slow_op = rep(entered=8, open_seq=8, enter_ts=NOW - 8.0)
    slow_op["collectives"]["all_gather|world"]["p99_s"] = 1.0  # this op's own history: 10 x 1 s
    assert detector().check({("trainer", 0): slow_op, ("trainer", 1): rep(entered=7)}, NOW) is None
    warm = {("trainer", 0): rep(step=1, entered=8, open_seq=8), ("trainer", 1): rep(step=1, entered=7)}
    assert detector().check(warm, NOW, attempt_start_step=0) is None
    ckpt = {("trainer", 0): rep(phase="checkpoint", entered=8, open_seq=8), ("trainer", 1): rep(entered=7)}
    assert detector().check(ckpt, NOW) is None


def test_frozen_rank_during_a_checkpoint_save_names_the_save_collective() -> None:
    waiting = rep(phase="checkpoint", entered=8, open_seq=8, enter_ts=NOW - 5.0)
    waiting["open_collectives"][0]["group"] = "checkpoint"  # its own threshold is minutes
    waiting["coll_entered"] = {"world": 7, "checkpoint": 8}
    reports = {("trainer", 0): waiting, ("trainer", 1): rep(phase="checkpoint", entered=7, ts=NOW - 5.0)}
    d = detector().check(reports, NOW)
    assert d is not None and d.kind == "frozen_rank" and d.culprits == [("trainer", 1)]
    assert (d.group, d.seq, d.op) == ("checkpoint", 8, "all_gather") and d.waiting == [("trainer", 0)]
    reports[("trainer", 1)]["ts"] = NOW - 0.5  # alive: a long save is no hang
    assert detector().check(reports, NOW) is None


def test_frozen_rollout_worker_outside_collectives() -> None:
    reports = {("trainer", 0): rep(entered=7), ("rollout", 0): rep(phase="rollout", ts=NOW - 10.0)}
    d = detector().check(reports, NOW)
    assert d is not None and d.kind == "frozen_rank" and d.culprits == [("rollout", 0)]


def test_healthy_reports_give_nothing() -> None:
    reports = {("trainer", r): rep(entered=8, open_seq=8, enter_ts=NOW - 0.1) for r in range(2)}
    assert detector().check(reports, NOW) is None


def _feed(det: StragglerDetector, compute: np.ndarray, first: int = 1) -> list:
    det.add_matrix(first, compute)
    return det.evaluate()


def test_straggler_flagged_only_when_persistent() -> None:
    rng = np.random.default_rng(0)
    cfg = DetectionConfig(straggler_window_steps=5, straggler_windows=3)
    steps, ranks = 40, 8
    compute = 0.1 * rng.lognormal(0, 0.03, size=(steps, ranks))
    compute[20:, 5] *= 1.25
    det = StragglerDetector(cfg)
    flags = _feed(det, compute)
    assert [f.rank for f in flags] == [5]
    assert flags[0].relative > 1.15 and "trainer 5 is a straggler" in flags[0].message

    blip = 0.1 * rng.lognormal(0, 0.03, size=(40, ranks))
    blip[10:15, 2] *= 1.5  # one slow window: not persistent
    assert _feed(StragglerDetector(cfg), blip) == []


def test_two_ranks_one_becomes_slow() -> None:
    compute = np.full((40, 2), 0.1)
    compute[10:, 1] = 0.15
    flags = _feed(StragglerDetector(DetectionConfig()), compute)
    assert [f.rank for f in flags] == [1]


def test_a_rank_always_a_bit_slower_is_not_a_straggler() -> None:
    compute = np.full((40, 2), 0.1)
    compute[:, 1] = 0.135  # placement, a busier core: slower than its peer from the start, but steady
    assert _feed(StragglerDetector(DetectionConfig()), compute) == []


def test_all_ranks_silent_is_not_blamed_on_them_at_once() -> None:
    starved = {
        ("trainer", 0): rep(entered=8, open_seq=8, ts=NOW - 5.0),
        ("trainer", 1): rep(entered=8, open_seq=8, ts=NOW - 5.0),
    }
    assert detector().check(starved, NOW) is None
    gone = {k: {**v, "ts": NOW - 20.0} for k, v in starved.items()}
    d = detector().check(gone, NOW)
    assert d is not None and d.kind == "frozen_rank" and len(d.culprits) == 2


def test_a_rank_slow_in_only_some_steps_is_not_a_straggler() -> None:
    # Interference hits a rank in bursts: very slow in 2 steps of every 5, normal otherwise.
    compute = np.full((60, 2), 0.1)
    for s in range(0, 60, 5):
        compute[s : s + 2, 1] = 0.3
    assert _feed(StragglerDetector(DetectionConfig()), compute) == []


def test_bursts_alternating_ranks_are_not_stragglers() -> None:
    rng = np.random.default_rng(1)
    compute = 0.1 * rng.lognormal(0, 0.05, size=(200, 2))
    for k, s in enumerate(range(10, 200, 30)):  # 10-step bursts of a 1.5x hog, alternating ranks
        compute[s : s + 10, k % 2] *= 1.5
    det = StragglerDetector(DetectionConfig())
    flags = []
    for i in range(0, 200, 5):  # a window's steps arrive every 0.5 s of daemon time
        det.add_matrix(1 + i, compute[i : i + 5])
        flags += det.evaluate(now=1000.0 + 0.1 * i)
    assert flags == []


def test_a_straggler_is_flagged_once_it_has_lasted() -> None:
    compute = np.full((200, 2), 0.1)
    compute[20:, 0] = 0.125  # 1.25x from step 20 on
    det = StragglerDetector(DetectionConfig())
    flagged_at = None
    for i in range(0, 200, 5):
        t = 1000.0 + 0.3 * i  # 0.3 s a step
        det.add_matrix(1 + i, compute[i : i + 5])
        if det.evaluate(now=t) and flagged_at is None:
            flagged_at = t
    assert flagged_at is not None
    onset = 1000.0 + 0.3 * 20
    assert StragglerDetector.MIN_PERSIST_S <= flagged_at - onset <= 30.0
