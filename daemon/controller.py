"""What the HTTP API calls (``daemon.api.Controller``): control, ingest, inject, and reads.

- ``control``: pause / resume / stop / checkpoint, checked against the run's state; the
  command is queued and handed to the driver in the response to its next report batch;
- ``ingest``: the ranks' report batches, deduplicated by (attempt, role, rank, seq) so a
  replayed backlog counts once; each accepted report goes to the bus, the trainers' to the
  straggler detector, and each rank's newest to the store;
- ``inject``: a fault for a rank of the running attempt, handed out like a control;
- ``status``, ``goodput``, ``ranks``, ``diagnoses``: reads of the store.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from milepost.engine.contract.config import OpsView
from milepost.engine.contract.enums import TERMINAL_RUN_STATES, ControlAction, Role, RunState
from milepost.engine.contract.events import EventKind

from . import liveness
from .attempt import RunningAttempt
from .bus import EventBus
from .detect import StragglerDetector
from .goodput import GoodputLedger
from .store import Store

FAULTS_OFF = (
    "fault injection is off for this run: set allow_faults = true in the job's [supervisor] section "
    "(for tests, benchmarks and demos) and restart the daemon"
)


class FaultsDisabled(PermissionError):
    """A fault asked of a run whose job did not opt in (``[supervisor] allow_faults``)."""


# The run states each control action is accepted in.
ALLOWED: dict[str, tuple[RunState, ...]] = {
    ControlAction.PAUSE: (RunState.RUNNING, RunState.RECOVERING),
    ControlAction.RESUME: (RunState.PAUSED,),
    ControlAction.STOP: (RunState.RUNNING, RunState.RECOVERING, RunState.PAUSED, RunState.STARTING),
    ControlAction.CHECKPOINT: (RunState.RUNNING,),
}
# The run's state once an action is accepted (a checkpoint leaves it as it is).
AFTER: dict[str, RunState] = {
    ControlAction.PAUSE: RunState.PAUSED,
    ControlAction.RESUME: RunState.RUNNING,
    ControlAction.STOP: RunState.STOPPING,
}


def compute_goodput(
    store: Store, now: float | None = None, ledger: GoodputLedger | None = None
) -> dict[str, Any]:
    """Productive time over wall time, and where the rest went (``ledger``: the daemon's running one)."""
    run = store.run() or {}
    now = now or time.time()
    start = run.get("created_at") or now
    end = now if run.get("state") not in TERMINAL_RUN_STATES else (run.get("updated_at") or now)
    ledger = ledger or GoodputLedger.from_totals(store.step_totals())
    return ledger.summary(
        created_at=start, end=end, attempts=store.attempts(), lost_s=store.offset("lost_progress_ms") / 1000.0
    )


class RunController:
    def __init__(
        self,
        *,
        store: Store,
        ops: OpsView,
        bus: EventBus,
        attempt: RunningAttempt,
        ledger: GoodputLedger,
        lock: threading.RLock,
        emit: Callable[..., None],
    ) -> None:
        """``emit(kind, message, severity="info", **data)``: the supervisor's event; ``lock``: its lock."""
        self.store, self.ops, self.bus, self.attempt, self.ledger = store, ops, bus, attempt, ledger
        self._lock, self.emit = lock, emit
        self.controls: list[dict[str, Any]] = []  # for the driver of the running attempt
        self._control_id = int(time.time() * 1000)
        self.faults: list[dict[str, Any]] = []  # injected through the API, delivered in ingest responses
        self._fault_id = int(time.time() * 1000)
        self.report_stats: dict[
            tuple[int, str, int], list[int]
        ] = {}  # (attempt, role, rank) -> [max seq, received]
        self.stragglers = StragglerDetector(ops.detection)

    def new_attempt(self) -> None:
        """A new attempt starts: no controls, faults or straggler history carry over."""
        self.controls = []
        self.faults = []
        self.stragglers = StragglerDetector(self.ops.detection)
        # Older attempts' counters live on in the store (a late report re-reads them): bounded memory.
        self.report_stats = {k: v for k, v in self.report_stats.items() if k[0] >= self.attempt.number - 1}

    def queue_control(self, action: str) -> dict[str, Any]:
        self._control_id += 1
        cmd = {"id": self._control_id, "action": action}
        self.controls.append(cmd)
        return cmd

    def control(self, action: str) -> dict[str, Any]:
        with self._lock:
            run = self.store.run() or {}
            state = run.get("state", "")
            allowed = ALLOWED[action]
            new_state = AFTER.get(action, state)
            reason = f"{action} requested" if action != ControlAction.CHECKPOINT else run.get("reason", "")
            # Conditional: the supervisor may have ended the run since the read above.
            if state not in allowed or not self.store.set_run_state(new_state, reason, only_from=allowed):
                state = (self.store.run() or {}).get("state", state)
                raise ValueError(f"cannot {action} a run in state {state}; allowed in {', '.join(allowed)}")
            self.queue_control(action)
            self.emit(EventKind.control(action), f"{action} requested through the API")
            if action == ControlAction.RESUME:
                # Paused time is not a stall.
                self.attempt.last_step_ts = max(self.attempt.last_step_ts, time.time())
            return {"action": action, "accepted": True, "state": new_state}

    def ingest(self, batch: dict[str, Any]) -> dict[str, Any]:
        driver_seen = False
        current = self.attempt.number
        seen: dict[tuple[int, str, int], list[int]] = {}  # [max seq, received] once this batch is stored
        latest: dict[tuple[int, str, int], dict[str, Any]] = {}
        fresh: list[tuple[tuple[int, str, int], dict[str, Any]]] = []
        for rep in batch.get("reports", []):
            key = (int(rep["attempt"]), str(rep["role"]), int(rep["rank"]))
            stats = seen.get(key) or self.report_stats.get(key) or list(self.store.seen_seq(*key))
            if rep["seq"] <= stats[0]:
                continue  # a replay of what we already have
            seen[key] = [rep["seq"], stats[1] + 1]
            latest[key] = rep
            fresh.append((key, rep))
        # A replayed backlog is many snapshots of the same ranks: write each rank's newest once.
        # Counters and reports commit together, and memory moves only after the commit: a failed
        # write leaves the batch unseen, so the rank's resend is taken instead of dropped as a replay.
        with self.store.transaction():
            for key, rep in latest.items():
                self.store.set_seen_seq(*key, *seen[key])
                if key[0] == current:
                    self.store.upsert_rank(key[1], key[2], key[0], rep)
        self.report_stats.update(seen)
        for key, rep in fresh:
            self.bus.report(rep)
            if key[0] == current:
                driver_seen = driver_seen or key[1] == Role.DRIVER
                if key[1] == Role.TRAINER:
                    self.stragglers.add_report(key[2], rep)
        for who in batch.get("heartbeats", []):  # refused reports: the rank is alive all the same
            if who["attempt"] == current:
                self.store.touch_rank(who["role"], who["rank"], who["attempt"])
        return {
            "accepted": len(fresh),
            "control": list(self.controls) if driver_seen else [],
            "faults": list(self.faults),
        }

    def inject(self, fault: dict[str, Any]) -> dict[str, Any]:
        """Queues a fault for a rank of the running attempt (``milepost inject``)."""
        from milepost.engine.contract.config import FaultSpec

        if not self.ops.supervisor.allow_faults:
            raise FaultsDisabled(FAULTS_OFF)
        with self._lock:
            if self.attempt.pid is None:
                raise ValueError("no attempt is running: nothing to inject into")
            spec = FaultSpec(
                kind=fault["kind"],
                role=fault.get("role", Role.TRAINER),
                rank=int(fault.get("rank", 0)),
                step=int(fault.get("step", 0)),
                factor=float(fault.get("factor", 1.5)),
            )
            self._fault_id += 1
            entry = {"id": self._fault_id, **spec.model_dump(mode="json")}
            self.faults.append(entry)
            self.emit(
                EventKind.FAULT_REQUESTED,
                f"fault {spec.kind} requested for {spec.role} {spec.rank}",
                fault=entry,
            )
            return {"accepted": True, **entry}

    def diagnoses(self) -> list[dict[str, Any]]:
        return self.store.diagnoses()

    def ranks(self) -> list[dict[str, Any]]:
        now = time.time()
        out = []
        for r in self.store.ranks():
            d = r["data"]
            out.append(
                {
                    "role": r["role"],
                    "rank": r["rank"],
                    "attempt": r["attempt"],
                    "host": d.get("host", ""),
                    "pid": d.get("pid", 0),
                    "step": d.get("step", 0),
                    "phase": d.get("phase", ""),
                    "state": d.get("state", ""),
                    "heartbeat_age_seconds": max(0.0, now - liveness.heartbeat_at(r)),
                    "open_collectives": d.get("open_collectives", []),
                    "timings": d.get("timings", {}),
                }
            )
        return out

    def progress_bound(self) -> float:
        recent = [s["step_s"] for s in self.store.recent_steps(20) if "step_s" in s]
        return liveness.progress_bound(recent, self.ops.supervisor)

    def status(self) -> dict[str, Any]:
        run = self.store.run() or {}
        last = self.store.last_step()
        attempt = self.store.last_attempt() or {}
        gp = self.goodput()
        return {
            "run_id": run.get("id", ""),
            "name": run.get("name", ""),
            "state": run.get("state", RunState.STARTING),
            "reason": run.get("reason", ""),
            "step": last["step"] if last else 0,
            "target_steps": run.get("target_steps", self.ops.run.steps),
            "attempt": attempt.get("number", 0),
            "world_size": attempt.get("world_size") or self.ops.trainer.world_size,
            "goodput": gp["goodput"],
            "restarts": self.store.count_events(EventKind.RESTART_SCHEDULED),
            "started_at": run.get("created_at", 0.0),
            "updated_at": run.get("updated_at", 0.0),
            "reward_mean": last.get("reward_mean") if last else None,
            "last_step_at": last.get("ts") if last else None,
            "progress_bound_s": self.progress_bound(),
            "reports_lost": sum(max(0, g["lost"]) for g in self.store.report_gaps()),
        }

    def goodput(self) -> dict[str, Any]:
        return compute_goodput(self.store, ledger=self.ledger)
