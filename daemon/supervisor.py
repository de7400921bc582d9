"""The supervisor: owns the run's parts and calls them, once per tick.

An attempt is one engine driver process (``daemon.launcher``) in a session of its own, so
it outlives the daemon. Each tick the supervisor tails the run's ``events.jsonl`` and
``steps.jsonl`` into the store (``daemon.tailer``) and onto the event bus (``daemon.bus``),
then decides, with pure functions of what it holds and the clock:

- the attempt's end (its exit, its own failure report, a resume mismatch) -> what next,
  by ``daemon.restart_policy``: finish SUCCEEDED / STOPPED / FAILED, or restart from the
  newest verified checkpoint after a backoff;
- hangs and stragglers, by ``daemon.detect`` (with evidence from ``daemon.evidence``);
- heartbeat loss and missing step progress, by ``daemon.liveness`` -> end the attempt.

The HTTP API talks to ``controller`` (``daemon.controller``), not to the supervisor.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from milepost.engine.contract.config import OpsView
from milepost.engine.contract.enums import (
    TERMINAL_RUN_STATES,
    AttemptState,
    ControlAction,
    Role,
    RunState,
    Severity,
)
from milepost.engine.contract.events import EventKind
from milepost.engine.contract.layout import EVENTS_FILE, STEPS_FILE, RunDir
from milepost.engine.contract.process import ExitCode

from . import diagnosis_record, liveness, procs
from .attempt import RunningAttempt
from .bus import EventBus
from .controller import RunController
from .detect import Diagnosis, HangDetector
from .goodput import GoodputLedger
from .launcher import Launcher, WarmStandby
from .metrics import RunMetrics
from .restart_policy import GONE, Outcome, PolicyState, decide
from .retention import Retainer
from .store import Store
from .tailer import Tailer

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)
_LIVE = (RunState.RUNNING, RunState.RECOVERING)  # the states a launch, restart or pause may move from


class Supervisor:
    def __init__(
        self,
        *,
        job: str,
        run_dir: Path,
        ops: OpsView,
        store: Store,
        token: str,
        api_url: str,
        ray_address: str | None = None,
        metrics: RunMetrics | None = None,
        bus: EventBus | None = None,
    ) -> None:
        """``bus``: where events, steps and reports go (a new one feeding ``metrics`` when None)."""
        self.job, self.run_dir, self.ops, self.store = job, run_dir, ops, store
        self.metrics = metrics or RunMetrics(run_info=store.run)
        if bus is None:
            bus = EventBus()
            bus.subscribe(self.metrics)
        self.bus = bus
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.done = threading.Event()
        self.started_at = time.time()
        self.attempt = RunningAttempt()
        self.policy = PolicyState()
        self.next_launch_at: float | None = None
        self.hang = HangDetector(ops.detection)
        self._reported_hangs: set[tuple[int, str, int]] = set()
        self.ledger = GoodputLedger.from_totals(store.step_totals())
        self.tailer = Tailer(run_dir, store)
        self.retainer = Retainer(store, run_dir, ops.retention, clock=time.time)
        # Built by this thread: attempts get its priority, whatever the niceness of the ticking one.
        self.launcher = Launcher(
            job=job,
            run_dir=run_dir,
            token=token,
            api_url=api_url,
            ray_address=ray_address,
            run_id=lambda: str((store.run() or {}).get("id", "")),
        )
        self.standby = WarmStandby(self.launcher, store)
        self.controller = RunController(
            store=store,
            ops=ops,
            bus=bus,
            attempt=self.attempt,
            ledger=self.ledger,
            lock=self._lock,
            emit=self.event,
        )

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Re-attaches to a running attempt recorded in the store, or launches the first one."""
        run = self.store.ensure_run(
            run_id=RunDir(self.run_dir).run_id(),
            name=self.ops.run.name,
            job=self.job,
            run_dir=str(self.run_dir),
            target_steps=self.ops.run.steps,
        )
        self._tail()
        last = self.store.last_attempt()
        record = self.launcher.running_record(last) if run["state"] not in TERMINAL_RUN_STATES else None
        ended = self.launcher.end_orphans(keep=last["number"] if record is not None and last else None)
        if ended:
            log.warning("ended processes of this run dir that no attempt of the store runs: %s", ended)
        if run["state"] in TERMINAL_RUN_STATES:
            self.event(EventKind.DAEMON_STARTED, f"run already {run['state']}: {run['reason']}")
            self.done.set()
            return
        if last and record is not None:
            a = self.attempt
            a.number, a.pid, a.started = last["number"], last["pid"], last["started_at"]
            a.record = record
            a.start_step = last["start_step"] or 0
            a.last_step_ts = time.time()
            if run["state"] == RunState.PAUSED:
                self.controller.queue_control(ControlAction.PAUSE)
            self.event(
                EventKind.DAEMON_REATTACHED,
                f"re-attached to running attempt {last['number']} (pid {last['pid']}); no new attempt",
                attempt=last["number"],
            )
            return
        if last and last["state"] == AttemptState.RUNNING:
            self.store.update_attempt(
                last["number"], state=AttemptState.LOST, ended_at=time.time(), reason="daemon restarted"
            )
            self.event(
                EventKind.ATTEMPT_LOST,
                f"attempt {last['number']} ended while the daemon was down",
                Severity.WARNING,
            )
            self.attempt.number = last["number"]
        self.event(EventKind.DAEMON_STARTED, f"supervising {self.job}")
        self._launch()

    def loop(self, tick_s: float = 0.5) -> None:
        while not self._stop.is_set() and not self.done.is_set():
            try:
                self.tick()
            except Exception:
                # The supervisor must outlive its own bugs: log, keep supervising.
                log.exception("supervisor tick failed")
            self._stop.wait(tick_s)

    def shutdown(self) -> None:
        self._stop.set()
        self.launcher.shutdown()

    def end_all(self, reason: str) -> None:
        """Kills the attempt and the standby now (after ``shutdown``: no tick runs beside this); a
        run that was stopping ends STOPPED. Nothing of the run is left running."""
        with self._lock:
            if self.attempt.pid is not None:
                self._tail()  # its last words: a checkpoint committed, or that it finished
                self._kill_attempt(reason)
                self._tail()
                code = self._attempt_exit_code()
                self._on_attempt_end(-9 if code is None else code)
            self.standby.drop()
            self.next_launch_at = None

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen`` at the supervisor's own priority (``Launcher.popen``)."""
        return self.launcher.popen(cmd, **kwargs)

    def event(self, kind: str, message: str, severity: str = Severity.INFO, **data: Any) -> None:
        """The daemon's own event: stored, then published."""
        attempt = data.pop("attempt", self.attempt.number if self.attempt.number >= 0 else None)
        step = data.pop("step", None)
        log.info("%s: %s", kind, message)
        row = {"kind": kind, "message": message, "severity": severity, "attempt": attempt}
        try:
            self.store.add_event({**row, "role": Role.DAEMON, "step": step, "data": data})
        except diagnosis_record.WRITE_ERRORS as e:
            # A full disk must not silence the daemon: the bus (metrics, alerts) still hears it.
            log.error("event %s not stored: %s", kind, e)
        self.bus.event(
            {"kind": kind, "message": message, "severity": severity, "attempt": attempt, "data": data}
        )

    # -- attempts -------------------------------------------------------------
    def _launch(self) -> None:
        with self._lock:
            if (self.store.run() or {}).get("state") == RunState.STOPPING:
                # A stop that landed after the tick read the state: it wins over the launch.
                self._finish(RunState.STOPPED, "stopped on request between attempts")
                return
            a = self.attempt
            n = a.number + 1
            proc = self.standby.take(n)
            warm = proc is not None
            if proc is None:
                self.standby.drop()
                proc = self.launcher.spawn(n)
            a.number, a.pid, a.proc = n, proc.pid, proc
            a.record = self.launcher.record(n)
            self.controller.new_attempt()
            a.started = time.time()
            a.outcome = {}
            a.last_step_ts = 0.0
            last = self.store.last_step()
            a.start_step = last["step"] if last else 0
            self.store.add_attempt(n, pid=proc.pid, world_size=self.ops.trainer.world_size)
            self.store.update_attempt(n, start_step=a.start_step)
            self.store.clear_ranks()
            run = self.store.run()
            if run and run["state"] == RunState.PAUSED:
                self.controller.queue_control(ControlAction.PAUSE)
            else:
                state = RunState.RUNNING if n == 0 else RunState.RECOVERING
                self.store.set_run_state(state, only_from=(RunState.STARTING, *_LIVE))
            self.next_launch_at = None
            how = "from its warm standby" if warm else "cold"
            self.event(
                EventKind.ATTEMPT_LAUNCHED,
                f"attempt {n} launched {how} (pid {proc.pid})",
                attempt=n,
                pid=proc.pid,
                warm=warm,
            )

    def _kill_attempt(self, reason: str | None) -> None:
        """SIGKILLs the attempt's process group; ``reason`` None: quietly, it is exiting anyway."""
        pid = self.attempt.pid
        if pid is None:
            return
        if reason is not None:
            self.event(
                EventKind.ATTEMPT_KILLED,
                f"ending attempt {self.attempt.number} (pid {pid}): {reason}",
                Severity.WARNING,
            )
        if self.attempt.proc is not None:  # our child, not yet reaped: its pid is not reused
            killed = procs.kill_group(pid, or_process=True)
        else:  # re-attached: only the very process that was recorded
            killed = procs.kill_recorded(self.attempt.record, or_process=True)
        if not killed:
            log.warning("attempt %d (pid %d) was not signalled; going on", self.attempt.number, pid)
        elif self.attempt.proc is not None:
            try:
                self.attempt.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("attempt %d did not exit after SIGKILL", self.attempt.number)

    def _attempt_exit_code(self) -> int | None | str:
        """Exit code of our child, GONE for a re-attached attempt that ended, None while alive."""
        if self.attempt.proc is not None:
            return self.attempt.proc.poll()
        rec = self.attempt.record
        if self.attempt.pid is not None and (rec is None or not rec.is_running()):
            return GONE
        return None

    def _on_attempt_end(self, code: int | str, detected: str | None = None) -> None:
        with self._lock:  # a stop decided on between the read of the state and the restart's write
            self._end_attempt(code, detected)

    def _end_attempt(self, code: int | str, detected: str | None) -> None:
        a = self.attempt
        n, said = a.number, a.outcome
        last = self.store.last_step()
        step = last["step"] if last else 0
        a.pid, a.proc, a.record = None, None, None
        outcome = Outcome(
            attempt=n,
            code=code,
            step=step,
            start_step=a.start_step,
            detected=detected,
            finished=said.get("finished"),
            failed=said.get("failed"),
            resume_mismatch=bool(said.get("resume_mismatch")),
            stop_requested=(self.store.run() or {}).get("state") == RunState.STOPPING,
        )
        policy = replace(self.policy, restarts=self.store.count_events(EventKind.RESTART_SCHEDULED))
        d = decide(outcome, policy, self.ops.supervisor, self.ops.run.steps)
        self.policy = d.state
        failed = d.attempt_state == AttemptState.FAILED
        exit_code = (code if isinstance(code, int) else None) if failed else (0 if code == GONE else code)
        reason = {"reason": d.failure} if failed else {}
        self.store.update_attempt(
            n, state=d.attempt_state, ended_at=time.time(), last_step=step, exit_code=exit_code, **reason
        )
        if failed:
            self.event(
                EventKind.ATTEMPT_ENDED,
                f"attempt {n} failed at step {step}: {d.failure}",
                Severity.ERROR,
                exit_code=exit_code,
                cause=(outcome.failed or {}).get("data", {}),
            )
        if d.run_state is not None:
            self._finish(d.run_state, d.reason)
            return
        if not self.store.set_run_state(
            RunState.RECOVERING, d.reason, only_from=(RunState.STARTING, RunState.PAUSED, *_LIVE)
        ):
            self._finish(RunState.STOPPED, "stopped on request as the attempt ended")
            return
        self.next_launch_at = time.time() + d.delay_s
        self.event(
            EventKind.RESTART_SCHEDULED,
            f"restarting from the newest verified checkpoint in {d.delay_s:.1f}s (restart {d.state.restarts}, "
            f"{d.state.no_progress} without progress): {d.reason}",
            Severity.WARNING,
            delay_s=d.delay_s,
            reason=d.reason,
        )

    def _finish(self, state: RunState, reason: str) -> None:
        with self._lock:
            self.standby.drop()
            self.store.set_run_state(state, reason)
        self.event(
            EventKind.run_ended(state),
            f"run {state}: {reason}",
            Severity.INFO if state != RunState.FAILED else Severity.CRITICAL,
        )
        self.done.set()

    # -- ticks ----------------------------------------------------------------
    def tick(self) -> None:
        self._tail()
        self.retainer.maybe_prune()
        a = self.attempt
        run = self.store.run() or {}
        if run.get("state") in TERMINAL_RUN_STATES:
            self.done.set()
            return
        if a.pid is None:
            if run.get("state") == RunState.STOPPING:
                self._finish(RunState.STOPPED, "stopped on request between attempts")
            elif self.next_launch_at is not None and time.time() >= self.next_launch_at:
                self._launch()
            return
        if a.outcome.get("resume_mismatch"):
            self._kill_attempt("resume verification failed")
            self._on_attempt_end(ExitCode.RESUME_MISMATCH)
            return
        code = self._attempt_exit_code()
        if code is None and a.outcome.get("failed") is not None:
            # It said why, after its actors were gone and any save in flight had landed: its own
            # Ray teardown (seconds) is not worth waiting for before the next attempt starts.
            self._kill_attempt(None)
            code = ExitCode.ERROR
        if code is not None:
            self._tail()  # the attempt's last words may have landed since the tick began
            self._on_attempt_end(code)
            return
        if run.get("state") == RunState.RECOVERING and a.last_step_ts > a.started:
            self.store.set_run_state(RunState.RUNNING, only_from=(RunState.RECOVERING,))
        if self.ops.supervisor.standby and self.standby.held is None and a.last_step_ts > a.started:
            self.standby.spawn(a.number + 1)
        if self.ops.detection.enabled:
            self._check_stragglers()
            diag = self._check_hang()
            if diag is not None and self.ops.detection.action == "restart":
                self._kill_attempt(f"{diag.kind} diagnosed")
                self._on_attempt_end(-9, detected=diag.message)
                return
        problem = self._check_liveness()
        if problem is not None:
            self.event(problem.kind, problem.message, Severity.ERROR, **problem.data)
            self._kill_attempt(problem.message)
            self._on_attempt_end(-9, detected=problem.message)

    def _check_liveness(self) -> liveness.Verdict | None:
        if (self.store.run() or {}).get("state") == RunState.PAUSED:
            return None
        a = self.attempt
        return liveness.check(
            self.store.ranks(),
            attempt=a.number,
            now=time.time(),
            attempt_started=a.started,
            daemon_started=self.started_at,
            last_step_ts=a.last_step_ts,
            recent_step_s=[s["step_s"] for s in self.store.recent_steps(20) if "step_s" in s],
            cfg=self.ops.supervisor,
        )

    def _check_hang(self) -> Diagnosis | None:
        run = self.store.run() or {}
        if run.get("state") == RunState.PAUSED:
            return None
        if time.time() - self.started_at < 2 * self.ops.detection.stale_heartbeat_s:
            return None  # a (re)started daemon: the ranks' buffered reports are still arriving
        n = self.attempt.number
        reports = {
            (r["role"], r["rank"]): liveness.on_daemon_clock(r)
            for r in self.store.ranks()
            if r["attempt"] == n
        }
        diag = self.hang.check(reports, time.time(), self.attempt.start_step)
        if diag is None:
            return None
        key = (n, diag.group, diag.seq)
        if key in self._reported_hangs:
            return None
        self._reported_hangs.add(key)
        action = "restart from checkpoint" if self.ops.detection.action == "restart" else "report only"
        # Decided: whatever of the record fails to be written (disk full), the hang is acted on.
        diagnosis_record.record(
            diag,
            store=self.store,
            run_dir=self.run_dir,
            attempt=n,
            action=action,
            stacks=self.ops.detection.stacks,
            emit=self.event,
        )
        return diag

    def _check_stragglers(self) -> None:
        stragglers = self.controller.stragglers
        for flag in stragglers.evaluate(time.time()):
            self.event(
                EventKind.STRAGGLER,
                flag.message,
                Severity.WARNING,
                role=Role.TRAINER,
                rank=flag.rank,
                relative_score=round(flag.relative, 3),
                individual_score=round(flag.individual, 3),
                lateness_s=round(flag.lateness_s, 4),
            )
        for rank, score in stragglers.scores.items():
            self.metrics.set_straggler_score(rank, score)

    # -- tailing the attempt's files ------------------------------------------
    def _tail(self, max_batches: int = 64) -> None:
        """Each batch of lines goes into the store with its file offset in one transaction; only
        after the commit do the attempt's outcome, the ledger and the bus see it, so a crash or an
        SQLite error replays the batch instead of losing or doubling it."""
        for name in (EVENTS_FILE, STEPS_FILE):
            for _ in range(max_batches):
                batch = self.tailer.read(name)
                if batch is None:
                    break
                with self.store.transaction():
                    if name == EVENTS_FILE:
                        for ev in batch.records:
                            self.store.add_event(ev)
                            self._record(ev)
                    else:
                        replaced = [self._store_step(rec) for rec in batch.records]
                    self.tailer.commit(batch)
                for i, rec in enumerate(batch.records):
                    if name == EVENTS_FILE:
                        self._react(rec)
                        self.bus.event(rec)
                    else:
                        self._step_done(rec, replaced[i])
                if not batch.more:
                    break

    def _store_step(self, rec: dict[str, Any]) -> dict[str, Any] | None:
        """Stores a step record (inside the batch's transaction); returns the record of a redone step."""
        prev = self.store.add_step(rec)
        if prev is not None and prev.get("attempt") != rec.get("attempt"):
            lost = self.store.offset("lost_progress_ms") + int(1000 * prev.get("step_s", 0.0))
            self.store.set_offset("lost_progress_ms", lost)
        return prev

    def _step_done(self, rec: dict[str, Any], prev: dict[str, Any] | None) -> None:
        self.ledger.add(rec, replaces=prev)
        if rec["step"] % 10 == 0 or rec["step"] == self.ops.run.steps:
            log.info(
                "step %d/%d  reward %.3f  loss %+.4f  step %.2fs  (attempt %s)",
                rec["step"],
                self.ops.run.steps,
                rec.get("reward_mean", float("nan")),
                rec.get("loss", float("nan")),
                rec.get("step_s", 0.0),
                rec.get("attempt"),
            )
        self.bus.step(rec)
        a = self.attempt
        if rec.get("attempt") == a.number:
            a.last_step_ts = max(a.last_step_ts, float(rec.get("ts", time.time())))
            self.policy = replace(self.policy, no_progress=0)

    def _record(self, ev: dict[str, Any]) -> None:
        """What a rank's event changes in the store (inside the batch's transaction)."""
        kind, data, attempt = ev.get("kind"), ev.get("data") or {}, ev.get("attempt")
        if kind == EventKind.CHECKPOINT_COMMITTED:
            self.store.upsert_checkpoint(
                ev["step"],
                path=data.get("path"),
                status="committed",
                world_size=data.get("world_size"),
                reason="",
                state_checksum=data.get("state_checksum"),
                committed_at=ev.get("ts"),
                attempt=attempt,
            )
            for c in self.store.checkpoints(status="committed"):
                if c["path"] and not Path(c["path"]).exists():
                    self.store.upsert_checkpoint(c["step"], status="pruned", reason="retention (keep_last)")
        elif kind == EventKind.CHECKPOINT_SKIPPED:
            self.store.upsert_checkpoint(ev["step"], status="skipped", reason=ev.get("message", ""))
        elif kind == EventKind.ATTEMPT_STARTED and attempt is not None:
            self.store.update_attempt(attempt, world_size=data.get("world_size"))
        elif kind == EventKind.RESUME_VERIFIED and attempt is not None:
            self.store.update_attempt(attempt, verified=1, resumed_from=ev.get("step"))
        elif kind == EventKind.RESUME_VERIFICATION_FAILED and attempt == self.attempt.number:
            self.store.update_attempt(attempt, verified=0, resumed_from=ev.get("step"))
        elif kind == EventKind.RUN_PAUSED:
            self.store.set_run_state(RunState.PAUSED, only_from=(RunState.PAUSED, *_LIVE))

    def _react(self, ev: dict[str, Any]) -> None:
        """What a rank's event, once stored, changes in the attempt's outcome."""
        kind, attempt = ev.get("kind"), ev.get("attempt")
        if attempt != self.attempt.number:
            return
        if kind == EventKind.RESUME_VERIFICATION_FAILED:
            self.attempt.outcome["resume_mismatch"] = ev
        elif kind == EventKind.ATTEMPT_FINISHED:
            self.attempt.outcome["finished"] = ev
        elif kind == EventKind.ATTEMPT_FAILED:
            self.attempt.outcome["failed"] = ev
