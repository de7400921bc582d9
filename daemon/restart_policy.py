"""What to do when an attempt ends (pure logic: no store, no clock, no processes).

``decide(outcome, state, config, target_steps)`` returns a ``Decision``: how the attempt
ended and whether the run finishes or restarts. The verdicts:

- the attempt finished cleanly (it said ``attempt_finished`` and exited 0, or is gone) ->
  the run is STOPPED when the attempt was stopped on request or ended before the target
  step, else SUCCEEDED;
- otherwise the attempt FAILED, with the daemon's detection, the attempt's own word, or
  its exit code as the reason, and then:
  - a resume whose state checksum did not match its manifest (``ExitCode.RESUME_MISMATCH`` or the event)
    -> the run FAILED: a restart would load the same state again;
  - a stop was requested -> the run STOPPED;
  - the restart cap (``max_restarts``) is reached -> the run FAILED;
  - ``no_progress_restarts`` attempts in a row made no new step -> the run FAILED;
  - else restart from the newest verified checkpoint after an exponential backoff:
    ``min(backoff_max_s, backoff_initial_s x 2^(failures in a row - 1))``, where an attempt
    that made progress starts the count again at 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from milepost.engine.contract.config import SupervisorConfig
from milepost.engine.contract.enums import AttemptState, RunState
from milepost.engine.contract.process import ExitCode

GONE = "gone"  # the exit "code" of a re-attached attempt that ended: not our child, no code


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as the supervisor saw it."""

    attempt: int
    code: int | str  # its exit code, or GONE
    step: int  # the newest step in the store
    start_step: int  # the newest step when it was launched
    detected: str | None = None  # the daemon's detection that ended it
    finished: dict[str, Any] | None = None  # its attempt_finished event
    failed: dict[str, Any] | None = None  # its attempt_failed event
    resume_mismatch: bool = False
    stop_requested: bool = False  # the run is STOPPING

    @property
    def progressed(self) -> bool:
        return self.step > self.start_step


@dataclass(frozen=True)
class PolicyState:
    failures_in_row: int = 0
    no_progress: int = 0  # attempts in a row without a new step
    restarts: int = 0  # restarts scheduled so far in this run


@dataclass(frozen=True)
class Decision:
    attempt_state: AttemptState  # how the attempt ended: SUCCEEDED, STOPPED or FAILED
    failure: str  # why it failed ("" for a clean end)
    run_state: RunState | None  # SUCCEEDED, STOPPED or FAILED: the run finishes; None: it restarts
    reason: str  # the run's reason: why it finishes, or why it restarts
    delay_s: float = 0.0  # before the restart
    state: PolicyState = PolicyState()  # the policy state after this decision

    @property
    def restart(self) -> bool:
        return self.run_state is None


def failure_reason(o: Outcome) -> str:
    if o.detected is not None:
        return o.detected
    if o.failed is not None:
        return str(o.failed["message"])
    if o.code == GONE:
        return f"attempt {o.attempt} (pid) vanished without a word (killed?)"
    return f"attempt {o.attempt} driver exited with code {o.code} without reporting a cause"


def decide(o: Outcome, state: PolicyState, cfg: SupervisorConfig, target_steps: int) -> Decision:
    if o.detected is None and o.finished is not None and o.code in (0, GONE):
        stopped = bool(o.finished.get("data", {}).get("stopped"))
        ended = AttemptState.STOPPED if stopped else AttemptState.SUCCEEDED
        if stopped:
            return Decision(ended, "", RunState.STOPPED, f"stopped on request at step {o.step}", state=state)
        if o.step >= target_steps:
            return Decision(ended, "", RunState.SUCCEEDED, f"reached step {o.step}", state=state)
        return Decision(
            ended,
            "",
            RunState.STOPPED,
            f"attempt ended at step {o.step} before the target {target_steps}",
            state=state,
        )
    reason = failure_reason(o)
    if o.code == ExitCode.RESUME_MISMATCH or o.resume_mismatch:
        return Decision(
            AttemptState.FAILED, reason, RunState.FAILED, f"resume verification failed: {reason}", state=state
        )
    if o.stop_requested:
        return Decision(
            AttemptState.FAILED,
            reason,
            RunState.STOPPED,
            f"stopped on request; the attempt ended: {reason}",
            state=state,
        )
    after = PolicyState(
        failures_in_row=1 if o.progressed else state.failures_in_row + 1,
        no_progress=0 if o.progressed else state.no_progress + 1,
        restarts=state.restarts,
    )
    if state.restarts >= cfg.max_restarts:
        why = f"restart cap reached ({state.restarts} restarts); last failure: {reason}"
        return Decision(AttemptState.FAILED, reason, RunState.FAILED, why, state=after)
    if after.no_progress >= cfg.no_progress_restarts:
        why = f"{after.no_progress} attempts in a row made no progress; last failure: {reason}"
        return Decision(AttemptState.FAILED, reason, RunState.FAILED, why, state=after)
    delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (after.failures_in_row - 1))
    after = PolicyState(after.failures_in_row, after.no_progress, state.restarts + 1)
    return Decision(AttemptState.FAILED, reason, None, reason, delay_s=delay, state=after)
