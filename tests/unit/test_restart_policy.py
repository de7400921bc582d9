"""The restart policy as a pure function: outcome and policy state in, decision out."""

from __future__ import annotations

from milepost.daemon.restart_policy import GONE, Outcome, PolicyState, decide
from milepost.engine.contract.config import SupervisorConfig

CFG = SupervisorConfig(max_restarts=5, no_progress_restarts=3, backoff_initial_s=0.5, backoff_max_s=4.0)
FINISHED = {"kind": "attempt_finished", "data": {}}


def outcome(**kw: object) -> Outcome:
    base: dict[str, object] = {"attempt": 2, "code": 1, "step": 10, "start_step": 4}
    base.update(kw)
    return Outcome(**base)  # type: ignore[arg-type]


def test_a_clean_end_finishes_the_run() -> None:
    d = decide(outcome(code=0, finished=FINISHED, step=10), PolicyState(), CFG, target_steps=10)
    assert (d.attempt_state, d.run_state, d.reason, d.failure) == (
        "SUCCEEDED",
        "SUCCEEDED",
        "reached step 10",
        "",
    )
    d = decide(outcome(code=GONE, finished=FINISHED, step=7), PolicyState(), CFG, target_steps=10)
    assert (d.run_state, d.reason) == ("STOPPED", "attempt ended at step 7 before the target 10")
    stopped = {"kind": "attempt_finished", "data": {"stopped": True}}
    d = decide(outcome(code=0, finished=stopped, step=7), PolicyState(), CFG, target_steps=10)
    assert (d.attempt_state, d.run_state, d.reason) == ("STOPPED", "STOPPED", "stopped on request at step 7")


def test_failure_reasons_prefer_detection_then_the_attempts_word() -> None:
    failed = {"message": "trainer 1 died", "data": {"cause": "actor_died"}}
    d = decide(outcome(detected="no step for 90s", failed=failed), PolicyState(), CFG, 100)
    assert d.failure == "no step for 90s" and d.restart
    assert decide(outcome(failed=failed), PolicyState(), CFG, 100).failure == "trainer 1 died"
    assert "vanished" in decide(outcome(code=GONE), PolicyState(), CFG, 100).failure
    assert decide(outcome(code=-9), PolicyState(), CFG, 100).failure == (
        "attempt 2 driver exited with code -9 without reporting a cause"
    )
    # A detection overrides a clean finish: the daemon killed it.
    d = decide(outcome(code=0, finished=FINISHED, detected="hang"), PolicyState(), CFG, 100)
    assert d.attempt_state == "FAILED"


def test_resume_mismatch_and_stop_finish_without_restart() -> None:
    d = decide(outcome(code=3), PolicyState(), CFG, 100)
    assert d.run_state == "FAILED" and d.reason.startswith("resume verification failed: ")
    d = decide(outcome(resume_mismatch=True), PolicyState(), CFG, 100)
    assert d.run_state == "FAILED"
    d = decide(outcome(stop_requested=True), PolicyState(), CFG, 100)
    assert d.run_state == "STOPPED" and d.reason.startswith("stopped on request; the attempt ended: ")


def test_backoff_doubles_without_progress_and_resets_with_it() -> None:
    state = PolicyState()
    delays = []
    for _ in range(2):
        d = decide(outcome(step=4), state, CFG, 100)  # no step past the launch's
        assert d.restart
        delays.append(d.delay_s)
        state = d.state
    assert delays == [0.5, 1.0] and state == PolicyState(failures_in_row=2, no_progress=2, restarts=2)
    d = decide(outcome(step=9), state, CFG, 100)
    assert d.delay_s == 0.5 and d.state == PolicyState(failures_in_row=1, no_progress=0, restarts=3)
    capped = decide(outcome(step=4), PolicyState(failures_in_row=9, restarts=1), CFG, 100)
    assert capped.delay_s == CFG.backoff_max_s


def test_caps_end_the_run() -> None:
    d = decide(outcome(), PolicyState(restarts=5), CFG, 100)
    assert d.run_state == "FAILED" and d.reason.startswith("restart cap reached (5 restarts)")
    d = decide(outcome(step=4), PolicyState(no_progress=2, restarts=2), CFG, 100)
    assert d.run_state == "FAILED" and d.reason.startswith("3 attempts in a row made no progress")
