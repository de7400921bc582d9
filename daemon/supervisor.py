"""The supervisor: launches attempts, ingests what ranks report, detects failures, recovers.

An attempt is one engine driver process (``milepost engine ... --attempt N``) in a session
of its own, so it outlives the daemon. The supervisor tails the run's ``events.jsonl`` and
``steps.jsonl`` into the store (offsets persisted: nothing is lost across a daemon crash),
takes heartbeats over HTTP, and on each tick decides:

- driver exit: success, stop, or failure with the cause the attempt wrote;
- heartbeat loss of a rank (per-role threshold) and missing step progress (an adaptive
  bound: max(floor, factor x recent median step time)) -> end the attempt;
- recovery: restart from the newest verified checkpoint after an exponential backoff,
  with a cap on restarts and a stop when restarts make no progress;
- a resume whose state checksum does not match its manifest -> FAILED, no restart.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from milepost.engine.contract.config import OpsView
from milepost.engine.events import EVENTS_FILE

from .detect import Diagnosis, HangDetector, StragglerDetector
from .goodput import GoodputLedger
from .metrics import RunMetrics
from .store import Store

log = logging.getLogger(__name__)

STEPS_FILE = "steps.jsonl"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_RESUME_MISMATCH = 3  # mirrors milepost.engine.cli (not imported: it pulls in torch)
_ROLES = ("driver", "trainer", "rollout")


def pid_alive(pid: int) -> bool:
    """True for a live, non-zombie process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def pid_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


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
    ) -> None:
        self.job, self.run_dir, self.ops, self.store = job, run_dir, ops, store
        self.sup = ops.supervisor
        self.token, self.api_url, self.ray_address = token, api_url, ray_address
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.attempt_pid: int | None = None
        self.attempt_no = -1
        self.attempt_started = 0.0
        self.attempt_outcome: dict[str, Any] = {}
        self.next_launch_at: float | None = None
        self.failures_in_row = 0
        self.no_progress = 0
        self.best_step_at_launch = 0
        self.last_failure = ""
        self.controls: list[dict[str, Any]] = []
        self._control_id = int(time.time() * 1000)
        self.started_at = time.time()
        self.report_stats: dict[
            tuple[int, str, int], list[int]
        ] = {}  # (attempt, role, rank) -> [max seq, received]
        self.last_step_ts = 0.0
        self.done = threading.Event()
        self.metrics = metrics or RunMetrics(run_info=store.run)
        self.standby: dict[str, Any] | None = None
        self.hang = HangDetector(ops.detection)
        self.stragglers = StragglerDetector(ops.detection)
        self.ledger = GoodputLedger.of(store.iter_steps())
        self.faults: list[dict[str, Any]] = []  # injected through the API, delivered in ingest responses
        self._fault_id = int(time.time() * 1000)
        self._reported_hangs: set[tuple[int, str, int]] = set()
        # A child inherits the niceness of the thread that forks it, and the supervisor's own
        # thread may run at the telemetry niceness (daemon.main): attempts are forked by this
        # thread instead, made here, at the priority of the thread that builds the supervisor.
        self._launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="milepost-launcher")
        self._launcher.submit(lambda: None).result()

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        """Re-attaches to a running attempt recorded in the store, or launches the first one."""
        run = self.store.ensure_run(
            run_id=self.run_dir.resolve().name + "-" + hex(abs(hash(str(self.run_dir.resolve()))))[2:8],
            name=self.ops.run.name,
            job=self.job,
            run_dir=str(self.run_dir),
            target_steps=self.ops.run.steps,
        )
        self._tail()
        orphan = self.store.offset("standby_pid")
        if orphan and pid_alive(orphan) and "--standby-dir" in pid_cmdline(orphan):
            # A standby of the previous daemon: it waits for a go file that no one will write.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(orphan, signal.SIGKILL)
        last = self.store.last_attempt()
        if run["state"] in TERMINAL:
            self.event("daemon_started", f"run already {run['state']}: {run['reason']}")
            self.done.set()
            return
        alive = bool(last and last["state"] == "RUNNING" and last["pid"] and pid_alive(last["pid"]))
        if last and alive and "milepost" in pid_cmdline(last["pid"]):
            self.attempt_no, self.attempt_pid = last["number"], last["pid"]
            self.attempt_started = last["started_at"]
            self.best_step_at_launch = last["start_step"] or 0
            self.last_step_ts = time.time()
            if run["state"] == "PAUSED":
                self._queue_control("pause")
            self.event(
                "daemon_reattached",
                f"re-attached to running attempt {last['number']} (pid {last['pid']}); no new attempt",
                attempt=last["number"],
            )
            return
        if last and last["state"] == "RUNNING":
            self.store.update_attempt(
                last["number"], state="LOST", ended_at=time.time(), reason="daemon restarted"
            )
            self.event("attempt_lost", f"attempt {last['number']} ended while the daemon was down", "warning")
            self.attempt_no = last["number"]
        self.event("daemon_started", f"supervising {self.job}")
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
        self._launcher.shutdown(wait=False)

    def event(self, kind: str, message: str, severity: str = "info", **data: Any) -> None:
        attempt = data.pop("attempt", self.attempt_no if self.attempt_no >= 0 else None)
        step = data.pop("step", None)
        log.info("%s: %s", kind, message)
        self.store.add_event(
            {
                "kind": kind,
                "message": message,
                "severity": severity,
                "attempt": attempt,
                "role": "daemon",
                "step": step,
                "data": data,
            }
        )
        self.metrics.on_event(
            {"kind": kind, "message": message, "severity": severity, "attempt": attempt, "data": data}
        )

    # -- attempts -------------------------------------------------------------
    def _spawn(self, n: int, standby_dir: Path | None = None) -> subprocess.Popen[bytes]:
        logs = self.run_dir / "attempts"
        logs.mkdir(exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "milepost.engine.cli",
            "engine",
            self.job,
            "--run-dir",
            str(self.run_dir),
            "--attempt",
            str(n),
            "--daemon-url",
            self.api_url,
            "--elastic",
            "--no-progress",
        ]
        if self.ray_address:
            cmd += ["--ray-address", self.ray_address]
        if standby_dir is not None:
            cmd += ["--standby-dir", str(standby_dir)]
        env = {
            **os.environ,
            "MILEPOST_TOKEN": self.token,
            "PYTHONUNBUFFERED": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MILEPOST_RUN_ID": str((self.store.run() or {}).get("id", "")),  # a trace resource attribute
        }
        env.setdefault("RAY_AUTH_MODE", "disabled")
        with (logs / f"attempt_{n}.log").open("ab") as out:
            # A session of its own: the attempt outlives the daemon (separate failure domains).
            return self.popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=os.getcwd()
            )

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """``subprocess.Popen`` from the launcher thread: the child gets the supervisor's own
        priority, whatever the niceness of the calling thread."""

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(cmd, **kwargs)

        return self._launcher.submit(start).result()

    def _spawn_standby(self) -> None:
        """Starts the next attempt as a warm standby (imports done, Ray up), waiting for its go file."""
        n = self.attempt_no + 1
        where = self.run_dir / "attempts" / f"standby_{n}"
        if where.exists():
            shutil.rmtree(where, ignore_errors=True)
        self.standby = {"attempt": n, "dir": where, "proc": self._spawn(n, where)}
        self.store.set_offset("standby_pid", self.standby["proc"].pid)

    def _drop_standby(self) -> None:
        if self.standby is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.standby["proc"].pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.standby["proc"].wait(timeout=10)
            self.standby = None
            self.store.set_offset("standby_pid", 0)

    def _launch(self) -> None:
        with self._lock:
            n = self.attempt_no + 1
            sb = self.standby
            warm = bool(
                sb is not None
                and sb["attempt"] == n
                and sb["proc"].poll() is None
                and (sb["dir"] / "ready").exists()
            )
            if warm and sb is not None:
                (sb["dir"] / "go").touch()
                self.proc, self.standby = sb["proc"], None
            else:
                self._drop_standby()
                self.proc = self._spawn(n)
            self.attempt_no = n
            self.attempt_pid = self.proc.pid
            self.stragglers = StragglerDetector(self.ops.detection)
            self.faults = []
            self.attempt_started = time.time()
            self.attempt_outcome = {}
            self.last_step_ts = 0.0
            last = self.store.last_step()
            self.best_step_at_launch = last["step"] if last else 0
            self.store.add_attempt(n, pid=self.proc.pid, world_size=self.ops.trainer.world_size)
            self.store.update_attempt(n, start_step=self.best_step_at_launch)
            self.store.clear_ranks()
            run = self.store.run()
            self.controls = []
            if run and run["state"] == "PAUSED":
                self._queue_control("pause")
            else:
                self.store.set_run_state("RUNNING" if n == 0 else "RECOVERING")
            self.next_launch_at = None
            how = "from its warm standby" if warm else "cold"
            self.event(
                "attempt_launched",
                f"attempt {n} launched {how} (pid {self.proc.pid})",
                attempt=n,
                pid=self.proc.pid,
                warm=warm,
            )

    def _kill_attempt(self, reason: str | None) -> None:
        """SIGKILLs the attempt's process group; ``reason`` None: quietly, it is exiting anyway."""
        pid = self.attempt_pid
        if pid is None:
            return
        if reason is not None:
            self.event("attempt_killed", f"ending attempt {self.attempt_no} (pid {pid}): {reason}", "warning")
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("attempt %d did not exit after SIGKILL", self.attempt_no)

    def _attempt_exit_code(self) -> int | None | str:
        """Exit code of our child, "gone" for a re-attached attempt that ended, None while alive."""
        if self.proc is not None:
            return self.proc.poll()
        if self.attempt_pid is not None and not pid_alive(self.attempt_pid):
            return "gone"
        return None

    def _on_attempt_end(self, code: int | str, detected: str | None = None) -> None:
        n = self.attempt_no
        outcome = self.attempt_outcome
        finished = outcome.get("finished")
        failed = outcome.get("failed")
        last = self.store.last_step()
        step = last["step"] if last else 0
        self.attempt_pid, self.proc = None, None
        if detected is None and finished is not None and code in (0, "gone"):
            stopped = bool(finished.get("data", {}).get("stopped"))
            self.store.update_attempt(
                n,
                state="STOPPED" if stopped else "SUCCEEDED",
                ended_at=time.time(),
                exit_code=0 if code == "gone" else code,
                last_step=step,
            )
            if stopped:
                self._finish("STOPPED", f"stopped on request at step {step}")
            elif step >= self.ops.run.steps:
                self._finish("SUCCEEDED", f"reached step {step}")
            else:
                self._finish(
                    "STOPPED", f"attempt ended at step {step} before the target {self.ops.run.steps}"
                )
            return
        if detected is not None:
            reason = detected
        elif failed is not None:
            reason = failed["message"]
        elif code == "gone":
            reason = f"attempt {n} (pid) vanished without a word (killed?)"
        else:
            reason = f"attempt {n} driver exited with code {code} without reporting a cause"
        self.store.update_attempt(
            n,
            state="FAILED",
            ended_at=time.time(),
            reason=reason,
            last_step=step,
            exit_code=code if isinstance(code, int) else None,
        )
        self.event(
            "attempt_ended",
            f"attempt {n} failed at step {step}: {reason}",
            "error",
            exit_code=code if isinstance(code, int) else None,
            cause=(failed or {}).get("data", {}),
        )
        if code == EXIT_RESUME_MISMATCH or outcome.get("resume_mismatch"):
            self._finish("FAILED", f"resume verification failed: {reason}")
            return
        run = self.store.run() or {}
        if run.get("state") == "STOPPING":
            self._finish("STOPPED", f"stopped on request; the attempt ended: {reason}")
            return
        self._schedule_restart(reason, progressed=step > self.best_step_at_launch)

    def _schedule_restart(self, reason: str, *, progressed: bool) -> None:
        self.last_failure = reason
        self.failures_in_row = 1 if progressed else self.failures_in_row + 1
        self.no_progress = 0 if progressed else self.no_progress + 1
        restarts = self.store.count_events("restart_scheduled")
        if restarts >= self.sup.max_restarts:
            self._finish("FAILED", f"restart cap reached ({restarts} restarts); last failure: {reason}")
            return
        if self.no_progress >= self.sup.no_progress_restarts:
            self._finish(
                "FAILED",
                f"{self.no_progress} attempts in a row made no progress; last failure: {reason}",
            )
            return
        delay = min(self.sup.backoff_max_s, self.sup.backoff_initial_s * 2 ** (self.failures_in_row - 1))
        self.next_launch_at = time.time() + delay
        self.store.set_run_state("RECOVERING", reason)
        self.event(
            "restart_scheduled",
            f"restarting from the newest verified checkpoint in {delay:.1f}s (restart {restarts + 1}, "
            f"{self.no_progress} without progress): {reason}",
            "warning",
            delay_s=delay,
            reason=reason,
        )

    def _finish(self, state: str, reason: str) -> None:
        self._drop_standby()
        self.store.set_run_state(state, reason)
        self.event(
            f"run_{state.lower()}", f"run {state}: {reason}", "info" if state != "FAILED" else "critical"
        )
        self.done.set()

    # -- ticks ----------------------------------------------------------------
    def tick(self) -> None:
        self._tail()
        run = self.store.run() or {}
        if run.get("state") in TERMINAL:
            self.done.set()
            return
        if self.attempt_pid is None:
            if run.get("state") == "STOPPING":
                self._finish("STOPPED", "stopped on request between attempts")
            elif self.next_launch_at is not None and time.time() >= self.next_launch_at:
                self._launch()
            return
        if self.attempt_outcome.get("resume_mismatch"):
            self._kill_attempt("resume verification failed")
            self._on_attempt_end(EXIT_RESUME_MISMATCH)
            return
        code = self._attempt_exit_code()
        if code is None and self.attempt_outcome.get("failed") is not None:
            # It said why, after its actors were gone and any save in flight had landed: its own
            # Ray teardown (seconds) is not worth waiting for before the next attempt starts.
            self._kill_attempt(None)
            code = 1
        if code is not None:
            self._tail()  # the attempt's last words may have landed since the tick began
            self._on_attempt_end(code)
            return
        if run.get("state") in ("RECOVERING",) and self.last_step_ts > self.attempt_started:
            self.store.set_run_state("RUNNING")
        if self.sup.standby and self.standby is None and self.last_step_ts > self.attempt_started:
            self._spawn_standby()
        if self.ops.detection.enabled:
            self._check_stragglers()
            diag = self._check_hang()
            if diag is not None and self.ops.detection.action == "restart":
                self._kill_attempt(f"{diag.kind} diagnosed")
                self._on_attempt_end(-9, detected=diag.message)
                return
        problem = self._detect()
        if problem is not None:
            kind, message, data = problem
            self.event(kind, message, "error", **data)
            self._kill_attempt(message)
            self._on_attempt_end(-9, detected=message)

    def _detect(self) -> tuple[str, str, dict[str, Any]] | None:
        now = time.time()
        run = self.store.run() or {}
        if run.get("state") == "PAUSED":
            return None
        timeouts = {
            "driver": self.sup.heartbeat_timeout_driver_s,
            "trainer": self.sup.heartbeat_timeout_trainer_s,
            "rollout": self.sup.heartbeat_timeout_rollout_s,
        }
        floor = max(self.started_at, self.attempt_started)
        for r in self.store.ranks():
            d = r["data"]
            if r["attempt"] != self.attempt_no or d.get("state") == "exited":
                continue
            age = now - max(float(d.get("ts", 0)), floor)
            if age > timeouts.get(r["role"], 30.0):
                return (
                    "heartbeat_lost",
                    f"{r['role']} {r['rank']} (pid {d.get('pid')} on {d.get('host')}) sent no heartbeat for "
                    f"{age:.0f}s (limit {timeouts[r['role']]:.0f}s); last seen at step {d.get('step')} in phase "
                    f"{d.get('phase')}",
                    {"role": r["role"], "rank": r["rank"], "pid": d.get("pid"), "phase": d.get("phase")},
                )
        if self.last_step_ts <= self.attempt_started:
            waited = now - max(self.attempt_started, self.started_at)
            if waited > self.sup.startup_grace_s:
                return (
                    "progress_stalled",
                    f"attempt {self.attempt_no} took no step in {waited:.0f}s after start "
                    f"(startup grace {self.sup.startup_grace_s:.0f}s)",
                    {"waited_s": waited},
                )
            return None
        bound = self.progress_bound()
        waited = now - max(self.last_step_ts, self.started_at)
        if waited > bound:
            return (
                "progress_stalled",
                f"no step for {waited:.0f}s (bound {bound:.0f}s = max(floor, {self.sup.progress_factor:g} x median "
                f"step time)); ranks' phases: {self._phases()}",
                {"waited_s": waited, "bound_s": bound},
            )
        return None

    def _current_reports(self) -> dict[tuple[str, int], dict[str, Any]]:
        return {
            (r["role"], r["rank"]): r["data"] for r in self.store.ranks() if r["attempt"] == self.attempt_no
        }

    def _check_hang(self) -> Diagnosis | None:
        run = self.store.run() or {}
        if run.get("state") == "PAUSED":
            return None
        if time.time() - self.started_at < 2 * self.ops.detection.stale_heartbeat_s:
            return None  # a (re)started daemon: the ranks' buffered reports are still arriving
        diag = self.hang.check(self._current_reports(), time.time(), self.best_step_at_launch)
        if diag is None:
            return None
        key = (self.attempt_no, diag.group, diag.seq)
        if key in self._reported_hangs:
            return None
        self._reported_hangs.add(key)
        action = "restart from checkpoint" if self.ops.detection.action == "restart" else "report only"
        diag_id = self.store.add_diagnosis(
            {
                "attempt": self.attempt_no,
                "kind": diag.kind,
                "culprit_ranks": [list(k) for k in diag.culprits],
                "group": diag.group,
                "seq": diag.seq,
                "op": diag.op,
                "onset_at": diag.onset_at,
                "detected_at": diag.detected_at,
                "action": action,
                "message": diag.message,
                "phases": diag.phases,
            }
        )
        self.event(
            "CollectiveHang",
            diag.message,
            "critical",
            diagnosis_id=diag_id,
            diagnosis=diag.kind,
            culprit_ranks=[list(k) for k in diag.culprits],
            group=diag.group,
            seq=diag.seq,
            op=diag.op,
            onset_at=diag.onset_at,
            detection_s=round(diag.detected_at - diag.onset_at, 3),
        )
        self.store.update_diagnosis(diag_id, evidence=self._collect_evidence(diag_id))
        return diag

    def _collect_evidence(self, diag_id: int) -> dict[str, Any]:
        """Stacks of every rank (py-spy) and the ranks' flight-recorder dumps, saved in the run dir."""
        out = self.run_dir / "diagnostics" / f"diagnosis_{diag_id}"
        out.mkdir(parents=True, exist_ok=True)
        evidence: dict[str, Any] = {"dir": str(out), "stacks": {}, "flight_recorder": []}
        if self.ops.detection.stacks:
            ranks = [
                r for r in self.store.ranks() if r["attempt"] == self.attempt_no and r["data"].get("pid")
            ]
            threads = []
            for r in ranks:
                name = f"{r['role']}{r['rank']}"
                t = threading.Thread(
                    target=self._py_spy, args=(int(r["data"]["pid"]), out / f"stack_{name}.txt"), daemon=True
                )
                t.start()
                threads.append((name, t))
            for name, t in threads:
                t.join(timeout=15)
                evidence["stacks"][name] = str(out / f"stack_{name}.txt")
        prefix = f"fr_attempt{self.attempt_no}_"
        evidence["flight_recorder"] = sorted(
            str(p) for p in (self.run_dir / "diagnostics").glob(prefix + "*.json")
        )
        return evidence

    @staticmethod
    def _py_spy(pid: int, dest: Path) -> None:
        exe = Path(sys.executable).with_name("py-spy")
        cmd = [str(exe) if exe.exists() else "py-spy", "dump", "--pid", str(pid)]
        text = ""
        for _ in range(2):  # py-spy sometimes misses the interpreter on its first look
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            except (OSError, subprocess.TimeoutExpired) as e:
                text = f"py-spy failed: {e!r}"
                continue
            text = res.stdout or res.stderr
            if res.returncode == 0:
                break
        dest.write_text(text)

    def _check_stragglers(self) -> None:
        for flag in self.stragglers.evaluate():
            self.event(
                "Straggler",
                flag.message,
                "warning",
                role="trainer",
                rank=flag.rank,
                relative_score=round(flag.relative, 3),
                individual_score=round(flag.individual, 3),
                lateness_s=round(flag.lateness_s, 4),
            )
        setter = getattr(self.metrics, "set_straggler_score", None)
        if setter is not None:
            for rank, score in self.stragglers.scores.items():
                setter(rank, score)

    def progress_bound(self) -> float:
        recent = [s["step_s"] for s in self.store.recent_steps(20) if "step_s" in s]
        median = statistics.median(recent) if recent else 0.0
        return max(self.sup.progress_floor_s, self.sup.progress_factor * median)

    def _phases(self) -> str:
        return ", ".join(f"{r['role']} {r['rank']}: {r['data'].get('phase')}" for r in self.store.ranks())

    # -- tailing the attempt's files ------------------------------------------
    def _tail(self) -> None:
        for ev in self._read_new(EVENTS_FILE):
            self.store.add_event(ev)
            self._react(ev)
            self.metrics.on_event(ev)
        for rec in self._read_new(STEPS_FILE):
            prev = [s for s in self.store.steps(since=rec["step"] - 1, limit=1) if s["step"] == rec["step"]]
            if prev and prev[0].get("attempt") != rec.get("attempt"):
                lost = self.store.offset("lost_progress_ms") + int(1000 * prev[0].get("step_s", 0.0))
                self.store.set_offset("lost_progress_ms", lost)
            self.store.add_step(rec)
            self.ledger.add(rec, replaces=prev[0] if prev else None)
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
            self.metrics.on_step(rec)
            if rec.get("attempt") == self.attempt_no:
                self.last_step_ts = max(self.last_step_ts, float(rec.get("ts", time.time())))
                self.no_progress = 0

    def _read_new(self, name: str) -> list[dict[str, Any]]:
        path = self.run_dir / name
        if not path.exists():
            return []
        offset = self.store.offset(name)
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        out: list[dict[str, Any]] = []
        for line in data[: end + 1].splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a malformed line in %s", name)
        self.store.set_offset(name, offset + end + 1)
        return out

    def _react(self, ev: dict[str, Any]) -> None:
        kind, data, attempt = ev.get("kind"), ev.get("data") or {}, ev.get("attempt")
        if kind == "checkpoint_committed":
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
            for c in self.store.checkpoints():
                if c["status"] == "committed" and c["path"] and not Path(c["path"]).exists():
                    self.store.upsert_checkpoint(c["step"], status="pruned", reason="retention (keep_last)")
        elif kind == "checkpoint_skipped":
            self.store.upsert_checkpoint(ev["step"], status="skipped", reason=ev.get("message", ""))
        elif kind == "attempt_started" and attempt is not None:
            self.store.update_attempt(attempt, world_size=data.get("world_size"))
        elif kind == "resume_verified" and attempt is not None:
            self.store.update_attempt(attempt, verified=1, resumed_from=ev.get("step"))
        elif kind == "resume_verification_failed" and attempt == self.attempt_no:
            self.store.update_attempt(attempt, verified=0, resumed_from=ev.get("step"))
            self.attempt_outcome["resume_mismatch"] = ev
        elif kind == "attempt_finished" and attempt == self.attempt_no:
            self.attempt_outcome["finished"] = ev
        elif kind == "attempt_failed" and attempt == self.attempt_no:
            self.attempt_outcome["failed"] = ev
        elif kind == "run_paused":
            self.store.set_run_state("PAUSED")

    # -- the API's controller -------------------------------------------------
    def _queue_control(self, action: str) -> dict[str, Any]:
        self._control_id += 1
        cmd = {"id": self._control_id, "action": action}
        self.controls.append(cmd)
        return cmd

    def control(self, action: str) -> dict[str, Any]:
        with self._lock:
            run = self.store.run() or {}
            state = run.get("state", "")
            allowed = {
                "pause": ("RUNNING", "RECOVERING"),
                "resume": ("PAUSED",),
                "stop": ("RUNNING", "RECOVERING", "PAUSED", "STARTING"),
                "checkpoint": ("RUNNING",),
            }[action]
            if state not in allowed:
                raise ValueError(f"cannot {action} a run in state {state}; allowed in {', '.join(allowed)}")
            self._queue_control(action)
            new_state = {"pause": "PAUSED", "resume": "RUNNING", "stop": "STOPPING"}.get(action, state)
            self.store.set_run_state(
                new_state, f"{action} requested" if action != "checkpoint" else run["reason"]
            )
            self.event(f"control_{action}", f"{action} requested through the API")
            if action == "resume":
                self.last_step_ts = max(self.last_step_ts, time.time())  # paused time is not a stall
            return {"action": action, "accepted": True, "state": new_state}

    def ingest(self, batch: dict[str, Any]) -> dict[str, Any]:
        accepted = 0
        driver_seen = False
        latest: dict[tuple[int, str, int], dict[str, Any]] = {}
        for rep in batch.get("reports", []):
            key = (int(rep["attempt"]), str(rep["role"]), int(rep["rank"]))
            stats = self.report_stats.setdefault(key, list(self.store.seen_seq(*key)))
            if rep["seq"] <= stats[0]:
                continue  # a replay of what we already have
            stats[0] = rep["seq"]
            stats[1] += 1
            accepted += 1
            latest[key] = rep
            self.metrics.on_report(rep)
            if key[0] == self.attempt_no:
                driver_seen = driver_seen or key[1] == "driver"
                if key[1] == "trainer":
                    self.stragglers.add_report(key[2], rep)
        # A replayed backlog is many snapshots of the same ranks: write each rank's newest once.
        for key, rep in latest.items():
            stats = self.report_stats[key]
            self.store.set_seen_seq(*key, stats[0], stats[1])
            if key[0] == self.attempt_no:
                self.store.upsert_rank(key[1], key[2], key[0], rep)
        return {
            "accepted": accepted,
            "control": list(self.controls) if driver_seen else [],
            "faults": list(self.faults),
        }

    def inject(self, fault: dict[str, Any]) -> dict[str, Any]:
        """Queues a fault for a rank of the running attempt (``milepost inject``)."""
        from milepost.engine.contract.config import FaultSpec

        with self._lock:
            if self.attempt_pid is None:
                raise ValueError("no attempt is running: nothing to inject into")
            spec = FaultSpec(
                kind=fault["kind"],
                role=fault.get("role", "trainer"),
                rank=int(fault.get("rank", 0)),
                step=int(fault.get("step", 0)),
                factor=float(fault.get("factor", 1.5)),
            )
            self._fault_id += 1
            entry = {"id": self._fault_id, **spec.__dict__}
            self.faults.append(entry)
            self.event(
                "fault_requested", f"fault {spec.kind} requested for {spec.role} {spec.rank}", fault=entry
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
                    "heartbeat_age_seconds": max(0.0, now - float(d.get("ts", now))),
                    "open_collectives": d.get("open_collectives", []),
                    "timings": d.get("timings", {}),
                }
            )
        return out

    def status(self) -> dict[str, Any]:
        run = self.store.run() or {}
        last = self.store.last_step()
        attempt = self.store.last_attempt() or {}
        gp = self.goodput()
        return {
            "run_id": run.get("id", ""),
            "name": run.get("name", ""),
            "state": run.get("state", "STARTING"),
            "reason": run.get("reason", ""),
            "step": last["step"] if last else 0,
            "target_steps": run.get("target_steps", self.ops.run.steps),
            "attempt": attempt.get("number", 0),
            "world_size": attempt.get("world_size") or self.ops.trainer.world_size,
            "goodput": gp["goodput"],
            "restarts": self.store.count_events("restart_scheduled"),
            "started_at": run.get("created_at", 0.0),
            "updated_at": run.get("updated_at", 0.0),
            "reward_mean": last.get("reward_mean") if last else None,
            "last_step_at": last.get("ts") if last else None,
            "progress_bound_s": self.progress_bound(),
            "reports_lost": sum(max(0, g["lost"]) for g in self.store.report_gaps()),
        }

    def goodput(self) -> dict[str, Any]:
        return compute_goodput(self.store, ledger=self.ledger)


def compute_goodput(
    store: Store, now: float | None = None, ledger: GoodputLedger | None = None
) -> dict[str, Any]:
    """Productive time over wall time, and where the rest went (``ledger``: the daemon's running one)."""
    run = store.run() or {}
    now = now or time.time()
    start = run.get("created_at") or now
    end = now if run.get("state") not in TERMINAL else (run.get("updated_at") or now)
    ledger = ledger or GoodputLedger.of(store.iter_steps())
    return ledger.summary(
        created_at=start, end=end, attempts=store.attempts(), lost_s=store.offset("lost_progress_ms") / 1000.0
    )
