"""The daemon's Prometheus metrics: one registry, fed by what the supervisor ingests.

A subscriber of the daemon's event bus (``daemon.bus``): ``on_step`` for every step record
the supervisor tails, ``on_event`` for every event (the ranks' and its own, with the restart
reason ``daemon.causes`` gave), ``on_report`` for every accepted rank report; the supervisor
calls ``set_straggler_score`` with the detector's scores. Scrape-time
families (worker liveness, wall clock, collectives, GPUs, the run dir's disk, the open
conditions of ``daemon.condition_metrics``) are computed when collected.
Every series carries ``run_id``; no label takes step or sample ids, and every label
value comes from a bounded set. A non-finite value never reaches a gauge: it counts in
``milepost_nonfinite_values_total{metric}`` instead. The step and phase histograms
carry the step's trace id as an exemplar (served in the OpenMetrics exposition).
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from milepost.engine.contract.enums import (
    RANK_ROLES,
    TERMINAL_RUN_STATES,
    RankStatus,
    Role,
    RunState,
    Severity,
)
from milepost.engine.contract.events import EventKind
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .causes import HANG_KINDS, RESTART_REASONS, snake
from .collective_metrics import CollectiveMetrics
from .condition_metrics import OpenConditions, run_dir_disk
from .gpu_metrics import GpuMetrics

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PHASE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
PHASES = ("rollout", "reward", "train", "weight_sync", "checkpoint")
ROLES = RANK_ROLES
# The exposition's order (PAUSED before RECOVERING), not RunState's: keep it as it was.
RUN_STATES = (
    RunState.STARTING,
    RunState.RUNNING,
    RunState.PAUSED,
    RunState.RECOVERING,
    RunState.STOPPING,
    RunState.SUCCEEDED,
    RunState.FAILED,
    RunState.STOPPED,
)
SEVERITIES = tuple(Severity)
ALERT_STATES = ("pending", "firing", "resolved")
# Step record key -> (gauge, help, labels): exported once the first finite value arrives.
# The keys are also the values of milepost_nonfinite_values_total{metric}.
LEARNING: dict[str, tuple[str, str, dict[str, str]]] = {
    "reward_mean": ("milepost_reward_mean", "Mean reward of the newest step", {}),
    "reward_std": ("milepost_reward_std", "Reward standard deviation of the newest step", {}),
    "loss": ("milepost_loss", "Training loss of the newest step", {"component": "total"}),
    "grad_norm": ("milepost_grad_norm", "Gradient norm (before clipping) of the newest step", {}),
    "kl": ("milepost_kl_divergence", "KL divergence to the reference policy, newest step", {}),
    "lr": ("milepost_learning_rate", "Learning rate of the newest step", {}),
    "clip_frac": ("milepost_clip_fraction", "Fraction of clipped tokens, newest step", {}),
    "weight_version": ("milepost_weight_version", "Weight version the rollout serves", {}),
}
LEARNING_KEYS = tuple(LEARNING)
_TRACE_ID = re.compile(r"^[0-9a-f]{32}$")
MAX_RANKS = 4096


def _finite(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


@dataclass
class _Rank:
    attempt: int
    node: str
    ts: float  # the rank's own clock
    received: float  # the daemon's clock: liveness never depends on clock skew
    state: str
    step_s: float | None
    in_flight: int


class RunMetrics:
    """The daemon's metrics. ``registry`` is what ``/metrics`` serves."""

    def __init__(
        self,
        *,
        run_info: Callable[[], dict[str, Any] | None] | None = None,
        heartbeat_timeouts: dict[str, float] | None = None,
        gpu: GpuMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``run_info``: the run row (id, state, created_at, updated_at), read at scrape time."""
        self.run_info = run_info or (lambda: None)
        self.timeouts = {
            Role.DRIVER: 30.0,
            Role.TRAINER: 20.0,
            Role.ROLLOUT: 30.0,
            **(heartbeat_timeouts or {}),
        }
        self.clock = clock
        self.collectives = CollectiveMetrics()
        self.conditions = OpenConditions()
        self.gpu = gpu if gpu is not None else GpuMetrics()
        self.registry = CollectorRegistry(auto_describe=True)
        self._extra: list[Any] = []
        self._lock = threading.Lock()
        self._ranks: dict[tuple[str, int], _Rank] = {}
        self._straggler: dict[tuple[str, int], float] = {}
        self._alert_names: set[str] = set()
        self._values: dict[str, float] = {}  # learning gauges: newest finite value
        self._dropped: dict[tuple[int, str, int], int] = {}
        self._attempt = 0
        self._max_step = 0
        self._run_id = ""
        self._started = clock()
        self._define(CollectorRegistry(auto_describe=True))
        self.registry.register(_RunLabelled(self))

    # -- instruments ----------------------------------------------------------
    def _define(self, r: CollectorRegistry) -> None:
        self._inner = r
        self.steps = Counter("milepost_steps", "Steps completed", registry=r)
        self.global_step = Gauge("milepost_global_step", "The newest completed step", registry=r)
        self.last_step_ts = Gauge(
            "milepost_last_step_timestamp_seconds", "Unix time the newest step completed", registry=r
        )
        self.step_duration = Histogram(
            "milepost_step_duration_seconds", "Wall time of a whole step", buckets=STEP_BUCKETS, registry=r
        )
        self.phase_duration = Histogram(
            "milepost_phase_duration_seconds",
            "Wall time of a step's phase, as the driver saw it",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.nonfinite = Counter(
            "milepost_nonfinite_values", "Non-finite (NaN/inf) values seen, by metric", ["metric"], registry=r
        )
        self.rollout_samples = Counter("milepost_rollout_samples", "Samples generated by rollout", registry=r)
        self.rollout_tokens = Counter(
            "milepost_rollout_tokens",
            "Tokens through rollout, by kind (prompt, response)",
            ["kind"],
            registry=r,
        )
        self.train_tokens = Counter("milepost_train_tokens", "Tokens trained on", registry=r)
        self.hangs = Counter("milepost_hangs_detected", "Hung collectives detected", registry=r)
        self.restarts = Counter("milepost_restarts", "Restarts of the run, by cause", ["reason"], registry=r)
        self.productive = Counter(
            "milepost_productive_seconds",
            "Step time that made progress (minus checkpoint stalls); goodput = its increase / wallclock's",
            registry=r,
        )
        self.ckpt_duration = Histogram(
            "milepost_checkpoint_duration_seconds",
            "Checkpoint time: stall (training blocked) and total (until committed)",
            ["kind"],
            buckets=CHECKPOINT_BUCKETS,
            registry=r,
        )
        self.last_ckpt_ts = Gauge(
            "milepost_last_checkpoint_timestamp_seconds",
            "Unix time the newest checkpoint was committed",
            registry=r,
        )
        self.checkpoints = Counter(
            "milepost_checkpoints",
            "Checkpoints by outcome (committed, failed, skipped)",
            ["status"],
            registry=r,
        )
        self.attempt = Gauge("milepost_attempt", "Number of the current attempt", registry=r)
        self.events = Counter("milepost_events", "Run events by severity", ["severity"], registry=r)
        self.last_ckpt_failure_ts = Gauge(
            "milepost_last_checkpoint_failure_timestamp_seconds",
            "Unix time the newest checkpoint failed (0: none); after the newest commit's: still failing",
            registry=r,
        )
        self.daemon_start_ts = Gauge(
            "milepost_daemon_start_timestamp_seconds",
            "Unix time this daemon process started; a change within a run is a daemon restart",
            registry=r,
        )
        self.daemon_start_ts.set(self._started)
        self.reports = Counter(
            "milepost_reports_received", "Rank reports accepted, by role", ["role"], registry=r
        )
        self.reports_dropped = Counter(
            "milepost_reports_dropped",
            "Reports ranks dropped from full buffers, by role",
            ["role"],
            registry=r,
        )
        self.reports_rejected = Counter(
            "milepost_reports_rejected",
            "Rank reports the daemon refused as invalid (the rest of their batch was kept), by role",
            ["role"],
            registry=r,
        )
        self.evidence_write_failures = Counter(
            "milepost_evidence_write_failures",
            "Diagnoses whose row or evidence could not be written (disk full?); detection went on",
            registry=r,
        )
        self.alerts = Gauge(
            "milepost_alerts",
            "Alerts by name and state (pending, firing, resolved)",
            ["alertname", "state"],
            registry=r,
        )
        self.notifications = Counter(
            "milepost_notifications",
            "Alert notification sends by receiver and outcome (ok, retry, fail, expired)",
            ["receiver", "outcome"],
            registry=r,
        )
        # Known label values start at 0, so increase() and alerts work before the first event.
        for ckpt_kind in ("stall", "total"):
            self.ckpt_duration.labels(ckpt_kind)
        for reason in RESTART_REASONS:
            self.restarts.labels(reason)
        for metric in (*LEARNING_KEYS, "straggler_score"):
            self.nonfinite.labels(metric)
        for kind in ("prompt", "response"):
            self.rollout_tokens.labels(kind)
        for status in ("committed", "failed", "skipped"):
            self.checkpoints.labels(status)
        for sev in SEVERITIES:
            self.events.labels(sev)
        for role in ROLES:
            self.reports.labels(role)
            self.reports_dropped.labels(role)
            self.reports_rejected.labels(role)
        for phase in PHASES:
            self.phase_duration.labels(phase)

    def add_collector(self, collector: Any) -> None:
        """Another source of families (anything with ``collect()``), served with ``run_id`` too."""
        self._extra.append(collector)

    # -- seeding after a daemon restart ----------------------------------------
    def seed(self, steps: Iterable[dict[str, Any]]) -> None:
        """Counts the steps already in the store, so totals survive a daemon restart."""
        for rec in steps:
            step = int(rec.get("step", 0))
            self.steps.inc()
            self._productive(rec, step)
            self.global_step.set(max(step, self._max_step))
            if (ts := _finite(rec.get("ts"))) is not None:
                self.last_step_ts.set(ts)

    def seed_totals(self, totals: dict[str, Any]) -> None:
        """``seed`` from the store's totals (``Store.step_totals``): its rows may be pruned, its totals are not."""
        self.steps.inc(int(totals["steps"]))
        self._max_step = max(self._max_step, int(totals["max_step"]))
        self.productive.inc(max(0.0, float(totals["step_s"]) - float(totals["stall_s"])))
        self.global_step.set(self._max_step)
        if (ts := _finite(totals.get("last_ts"))) is not None and ts > 0:
            self.last_step_ts.set(ts)

    # -- hooks ------------------------------------------------------------------
    def on_step(self, rec: dict[str, Any]) -> None:
        """A step record (engine StepResult + attempt, ts) tailed from steps.jsonl."""
        step = int(rec.get("step", 0))
        self.steps.inc()
        self.global_step.set(step)
        if (ts := _finite(rec.get("ts"))) is not None:
            self.last_step_ts.set(ts)
        trace_id = str(rec.get("trace_id") or "")
        ex = {"trace_id": trace_id} if _TRACE_ID.match(trace_id) else None
        if (step_s := _finite(rec.get("step_s"))) is not None and step_s >= 0:
            self.step_duration.observe(step_s, ex)
        phases = rec.get("phases") or {}
        for phase, seconds in phases.items():
            if phase in PHASES and (s := _finite(seconds)) is not None and s >= 0:
                self.phase_duration.labels(phase).observe(s, ex)
        if (stall := _finite(phases.get("checkpoint"))) is not None and stall >= 0:
            self.ckpt_duration.labels("stall").observe(stall, ex)
        self._learning(rec)
        self._count(self.rollout_samples, rec.get("rollout_samples"))
        self._count(self.rollout_tokens.labels("response"), rec.get("rollout_tokens"))
        self._count(self.rollout_tokens.labels("prompt"), rec.get("prompt_tokens"))
        self._count(self.train_tokens, rec.get("train_tokens"))
        self._productive(rec, step)

    def _productive(self, rec: dict[str, Any], step: int) -> None:
        # A step redone after a restart made no new progress: count each step number once.
        if step <= self._max_step:
            return
        self._max_step = step
        step_s = _finite(rec.get("step_s")) or 0.0
        stall = _finite((rec.get("phases") or {}).get("checkpoint")) or 0.0
        self.productive.inc(max(0.0, step_s - stall))

    def _learning(self, rec: dict[str, Any]) -> None:
        for key in LEARNING_KEYS:
            if rec.get(key) is None:
                continue
            f = _finite(rec[key])
            if f is None:
                self.nonfinite.labels(key).inc()  # the gauge keeps its last finite value
            else:
                self._values[key] = f

    @staticmethod
    def _count(counter: Any, value: Any) -> None:
        if (v := _finite(value)) is not None and v > 0:
            counter.inc(v)

    def on_report(self, rep: dict[str, Any]) -> None:
        """A rank report the supervisor accepted (not a replay)."""
        role, rank, attempt = str(rep.get("role", "")), int(rep.get("rank", 0)), int(rep.get("attempt", 0))
        if role not in ROLES:
            return
        self.reports.labels(role).inc()
        timings = rep.get("timings") or {}
        step_s = _finite(timings.get("step"))
        if step_s is None:
            parts = [f for v in timings.values() if (f := _finite(v)) is not None and f >= 0]
            step_s = sum(parts) if parts else None
        now = self.clock()
        with self._lock:
            if attempt > self._attempt:
                self._new_attempt(attempt)
            held = self._ranks.get((role, rank))
            if (held is None and len(self._ranks) < MAX_RANKS) or (
                held is not None and attempt >= held.attempt
            ):
                self._ranks[(role, rank)] = _Rank(
                    attempt=attempt,
                    node=str(rep.get("host", ""))[:128],
                    ts=_finite(rep.get("ts")) or now,
                    received=now,
                    state=str(rep.get("state", "")),
                    step_s=step_s if step_s is not None else (held.step_s if held else None),
                    in_flight=len(rep.get("open_collectives") or []),
                )
            dropped = int((rep.get("counters") or {}).get("reports_dropped", 0) or 0)
            prev = self._dropped.get((attempt, role, rank), 0)
            self._dropped[(attempt, role, rank)] = max(prev, dropped)
        if dropped > prev:
            self.reports_dropped.labels(role).inc(dropped - prev)
        self.collectives.ingest(rep, now)
        self.gpu.ingest(rep, now)

    def _new_attempt(self, attempt: int) -> None:
        """Under the lock: the ranks and scores of older attempts are gone."""
        self._attempt = attempt
        self.attempt.set(attempt)
        self._ranks = {k: r for k, r in self._ranks.items() if r.attempt >= attempt}
        self._straggler.clear()
        self._dropped = {k: v for k, v in self._dropped.items() if k[0] >= attempt}
        self.collectives.forget_before(attempt)
        self.conditions.new_attempt(attempt)

    def on_event(self, ev: dict[str, Any], restart_reason: str = "") -> None:
        """A run event; ``restart_reason``: the newest restart's, as ``daemon.causes`` classified it."""
        kind = str(ev.get("kind", ""))
        data = ev.get("data") or {}
        sev = str(ev.get("severity", Severity.INFO))
        self.events.labels(sev if sev in SEVERITIES else Severity.INFO).inc()
        if kind == EventKind.ATTEMPT_LAUNCHED and ev.get("attempt") is not None:
            with self._lock:
                self._new_attempt(max(self._attempt, int(ev["attempt"])))
        elif kind == EventKind.RESTART_SCHEDULED:
            self.restarts.labels(restart_reason if restart_reason in RESTART_REASONS else "other").inc()
        elif kind == EventKind.CHECKPOINT_COMMITTED:
            self.checkpoints.labels("committed").inc()
            if (total := _finite(data.get("total_s"))) is not None and total >= 0:
                self.ckpt_duration.labels("total").observe(total)
            self.last_ckpt_ts.set(_finite(ev.get("ts")) or self.clock())
        elif kind in (EventKind.CHECKPOINT_FAILED, EventKind.CHECKPOINT_SKIPPED):
            self.checkpoints.labels(kind.removeprefix("checkpoint_")).inc()
            if kind == EventKind.CHECKPOINT_FAILED:
                self.last_ckpt_failure_ts.set(_finite(ev.get("ts")) or self.clock())
        elif kind == EventKind.EVIDENCE_WRITE_FAILED:
            self.evidence_write_failures.inc()
        self.conditions.on_event(kind, ev)
        if snake(kind) in HANG_KINDS:
            self.hangs.inc()

    def set_straggler_score(self, rank: int, score: float, role: str = Role.TRAINER) -> None:
        """The detector's score of a rank (1 = typical); a non-finite score is counted, not shown."""
        f = _finite(score)
        if f is None:
            self.nonfinite.labels("straggler_score").inc()
            return
        with self._lock:
            self._straggler[(role, int(rank))] = f

    def set_alerts(self, counts: dict[tuple[str, str], int], names: Iterable[str] = ()) -> None:
        """The alert manager's view: (alertname, state) -> alerts; every known name shows 0 otherwise."""
        self._alert_names.update(names)
        self._alert_names.update(name for name, _ in counts)
        for name in self._alert_names:
            for state in ALERT_STATES:
                self.alerts.labels(name, state).set(counts.get((name, state), 0))

    def on_notification(self, receiver: str, outcome: str) -> None:
        """One send of the outbox's dispatcher (receiver names come from the job file: bounded)."""
        self.notifications.labels(receiver, outcome).inc()

    # -- scrape-time families ----------------------------------------------------
    def run_id(self) -> str:
        if not self._run_id:
            info = self._info()
            self._run_id = str(info.get("id") or "")
        return self._run_id

    def _info(self) -> dict[str, Any]:
        try:
            return dict(self.run_info() or {})
        except Exception:  # a locked or closed store must not fail a scrape
            return {}

    def live(self) -> Iterator[Metric]:
        info = self._info()
        now = self.clock()
        state = str(info.get("state") or RunState.STARTING)
        created = _finite(info.get("created_at")) or self._started
        end = (_finite(info.get("updated_at")) or now) if state in TERMINAL_RUN_STATES else now
        wall = CounterMetricFamily(
            "milepost_wallclock_seconds",
            "Wall time since the run was created (stops when it ends); goodput = productive's increase / this",
        )
        wall.add_metric([], max(0.0, end - created))
        states = GaugeMetricFamily("milepost_run_state", "1 for the run's current state", labels=["state"])
        for s in RUN_STATES:
            states.add_metric([s], 1.0 if s == state else 0.0)
        yield from (wall, states)
        yield from self.conditions.collect()
        yield from run_dir_disk(str(info["run_dir"]) if info.get("run_dir") else None)
        for key, (name, doc, labels) in LEARNING.items():
            fam = GaugeMetricFamily(name, doc, labels=list(labels))
            if (value := self._values.get(key)) is not None:
                fam.add_metric(list(labels.values()), value)
            yield fam
        yield from self._workers(now)
        yield from self.collectives.collect()
        yield from self.gpu.collect()

    def _workers(self, now: float) -> Iterator[Metric]:
        labels = ["role", "rank", "node", "attempt"]
        up = GaugeMetricFamily(
            "milepost_worker_up", "1 while a rank of the current attempt heartbeats", labels=labels
        )
        hb = GaugeMetricFamily(
            "milepost_worker_heartbeat_timestamp_seconds",
            "Unix time, on the daemon's clock, a rank's newest report arrived (skewed node clocks do not show)",
            labels=labels,
        )
        rank_step = GaugeMetricFamily(
            "milepost_rank_step_duration_seconds",
            "A rank's own time in its newest step (trainer: train; rollout: generate; driver: the step)",
            labels=["role", "rank", "attempt"],
        )
        in_flight = GaugeMetricFamily(
            "milepost_collectives_in_flight",
            "Collectives a rank is inside right now",
            labels=["role", "rank", "attempt"],
        )
        lost = GaugeMetricFamily(
            "milepost_worker_heartbeat_lost",
            "1 while a rank that has not exited sends nothing within its role's heartbeat timeout",
            labels=["role", "rank", "attempt"],
        )
        straggler = GaugeMetricFamily(
            "milepost_straggler_score",
            "How much slower than its peers a rank is (1 = typical)",
            labels=["role", "rank"],
        )
        with self._lock:
            ranks = sorted(self._ranks.items())
            scores = sorted(self._straggler.items())
            attempt = self._attempt
        for (role, rank), r in ranks:
            if r.attempt != attempt:
                continue
            silent = now - r.received > self.timeouts.get(role, 30.0)
            exited = r.state == RankStatus.EXITED
            values = [role, str(rank), r.node, str(r.attempt)]
            up.add_metric(values, 0.0 if silent or exited else 1.0)
            # An exited rank is down, not lost: a run's normal end must not page.
            lost.add_metric([role, str(rank), str(r.attempt)], 1.0 if silent and not exited else 0.0)
            hb.add_metric(values, r.received)
            if r.step_s is not None:
                rank_step.add_metric([role, str(rank), str(r.attempt)], r.step_s)
            in_flight.add_metric([role, str(rank), str(r.attempt)], float(r.in_flight))
        for (role, rank), score in scores:
            straggler.add_metric([role, str(rank)], score)
        yield from (up, hb, rank_step, in_flight, lost, straggler)


class _RunLabelled:
    """Serves the inner registry, the scrape-time families and extra collectors, each sample
    with ``run_id`` added (the Python client has no constant labels), without ``_created``."""

    def __init__(self, m: RunMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        run_id = self.m.run_id()
        sources: list[Iterable[Metric]] = [self.m._inner.collect(), self.m.live()]
        sources += [c.collect() for c in self.m._extra]
        for source in sources:
            for fam in source:
                out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                out.samples = [
                    s._replace(labels={"run_id": run_id, **s.labels})
                    for s in fam.samples
                    if not (s.name.endswith("_created") and fam.type in ("counter", "histogram"))
                    and not (isinstance(s.value, float) and math.isnan(s.value))
                ]
                yield out
