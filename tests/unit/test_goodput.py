"""The goodput ledger: productive time, badput buckets, redone steps counted once."""

from __future__ import annotations

from milepost.daemon.goodput import GoodputLedger


def step(n: int, attempt: int, end: float, step_s: float = 1.0, ckpt: float = 0.0) -> dict:
    return {"step": n, "attempt": attempt, "ts": end, "step_s": step_s, "phases": {"checkpoint": ckpt}}


def test_buckets_of_a_run_with_one_restart() -> None:
    ledger = GoodputLedger()
    # attempt 0: created at 0, first step starts at 10; steps 1..4 end at 11..14; step 2 saves (0.5 s).
    a0 = [step(n, 0, 10.0 + n, ckpt=0.5 if n == 2 else 0.0) for n in range(1, 5)]
    for s in a0:
        ledger.add(s)
    # attempt 1 resumes from step 2 at 20: steps 3 and 4 are redone (their first run is lost).
    ledger.add(step(3, 1, 21.0), replaces=a0[2])
    ledger.add(step(4, 1, 22.0), replaces=a0[3])
    attempts = [{"number": 0}, {"number": 1}]
    out = ledger.summary(created_at=0.0, end=22.0, attempts=attempts, lost_s=2.0)
    assert out["productive_s"] == 4.0 - 0.5  # four steps stand; the save's stall is not productive
    b = out["badput"]
    assert b["startup_s"] == 10.0 and b["checkpoint_stall_s"] == 0.5 and b["lost_progress_s"] == 2.0
    assert b["recovery_s"] == 20.0 - 14.0  # the last step of attempt 0 to the first of attempt 1
    assert abs(out["goodput"] - 3.5 / 22.0) < 1e-9
    assert b["other_s"] == 0.0


def test_ledger_of_steps_equals_the_running_one() -> None:
    recs = [step(n, 0, 5.0 + n) for n in range(1, 50)]
    running = GoodputLedger()
    for r in recs:
        running.add(r)
    assert GoodputLedger.of(recs).summary(
        created_at=0.0, end=60.0, attempts=[{"number": 0}], lost_s=0.0
    ) == running.summary(created_at=0.0, end=60.0, attempts=[{"number": 0}], lost_s=0.0)
