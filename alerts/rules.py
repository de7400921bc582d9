"""The alert rules: observations in, conditions out, with the clock passed in.

The daemon feeds `Observations` with events (`observe_event`), step records
(`observe_step`), rank reports (`observe_report`) and the run dir's disk
(`observe_disk`); `evaluate(obs, now, cfg)` returns every condition true now. Nothing
here sends, sleeps or reads a clock; `Observations` is plain data the daemon persists.

Event-made alerts are *latched*: the event opens them and a later event closes them
(`LATCHES` names which), or they close `event_hold_s` after the last event when nothing
does (a straggler streak, a daemon restart). The rest are computed from state:

- RestartLoop: >= restart_loop_count `restart_scheduled` in restart_loop_window_s.
- NoProgress: the running attempt took no step for no_progress_s (or `progress_stalled`);
  a paused run is not stalled, and its pause does not count.
- CheckpointStale: no committed checkpoint for checkpoint_stale_factor x interval, the interval
  being the median gap of the last commits (checkpoint_interval_s until two were seen), and
  never under checkpoint_stale_min_s (a restart must not make seconds-apart commits "stale").
- WorkerDown: a rank of the running attempt reports `failed`/`dead`, or nothing for worker_down_s.
- NonFiniteLoss / LossSpike (robust z of the newest loss over a window) / RewardCollapse
  (reward_std ~ 0 over a window, or its mean fell below reward_drop_ratio of the window before)
  / ThroughputDrop (tokens/s of a window below throughput_drop_ratio of the one before).
- DiskLow, GpuOverheat, GpuXid, GpuEccUncorrected (new errors in gpu_error_hold_s).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from milepost.alerts.catalog import condition
from milepost.alerts.model import Condition, fingerprint
from milepost.engine.contract.config.alerts import AlertsConfig, RulesConfig
from pydantic import BaseModel, ConfigDict, Field

Event = dict[str, Any]


class Latched(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alertname: str
    labels: dict[str, str]
    ts: float
    attempt: int
    message: str = ""
    data: dict[str, Any] = Field(default_factory=dict)


class GpuSeen(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: str
    index: int
    role: str = ""
    rank: str = ""
    temperature_c: float | None = None
    xid: dict[str, int] = Field(default_factory=dict)
    ecc: dict[str, int] = Field(default_factory=dict)
    xid_new_at: float | None = None
    xid_new: list[str] = Field(default_factory=list)
    ecc_new_at: float | None = None


class Observations(BaseModel):
    """What the rules know about one run; JSON-serialisable for the daemon's store."""

    # A diverged loss is NaN; as JSON it must come back as NaN, not null (strict JSON has no NaN).
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="strings")
    run: str
    attempt: int = 0
    attempt_running: bool = False
    attempt_started_at: float | None = None
    run_terminal: bool = False
    paused: bool = False
    daemon_starts: int = 0
    latched: dict[str, Latched] = Field(default_factory=dict)
    restarts: list[float] = Field(default_factory=list)
    last_step_ts: float | None = None
    steps: list[dict[str, float]] = Field(default_factory=list)
    last_checkpoint_ts: float | None = None
    commits: list[float] = Field(default_factory=list)  # the last few commit times
    ranks: dict[str, dict[str, Any]] = Field(default_factory=dict)
    gpus: dict[str, GpuSeen] = Field(default_factory=dict)
    disk: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class LatchSpec:
    alertname: str
    labels: tuple[str, ...]  # from the event: attempt/role/rank, or data keys group/op
    resolved_by: frozenset[str]
    hold: bool = False  # resolves event_hold_s after the last event when nothing resolves it


_NEXT_ATTEMPT = frozenset({"attempt_started", "run_succeeded", "run_stopped"})
LATCHES: dict[str, LatchSpec] = {
    "collective_hang": LatchSpec("CollectiveHang", ("attempt", "group", "op"), _NEXT_ATTEMPT),
    "straggler": LatchSpec("Straggler", ("attempt", "role", "rank"), _NEXT_ATTEMPT, hold=True),
    "heartbeat_lost": LatchSpec("HeartbeatLost", ("attempt", "role", "rank"), _NEXT_ATTEMPT),
    "progress_stalled": LatchSpec("NoProgress", ("attempt",), _NEXT_ATTEMPT | {"step"}),
    "attempt_ended": LatchSpec("AttemptFailed", ("attempt",), _NEXT_ATTEMPT),
    "run_failed": LatchSpec("RunFailed", (), _NEXT_ATTEMPT),
    "resume_verification_failed": LatchSpec(
        "ResumeMismatch", ("attempt",), _NEXT_ATTEMPT | {"checkpoint_committed"}
    ),
    "checkpoint_failed": LatchSpec(
        "CheckpointFailed",
        (),
        frozenset({"checkpoint_committed", "run_succeeded", "run_stopped"}),
    ),
    "daemon_reattached": LatchSpec("DaemonRestarted", (), frozenset(), hold=True),
}
_TERMINAL = {"run_failed", "run_succeeded", "run_stopped"}


def _s(v: Any) -> str:
    return "" if v is None else str(v)


# Spellings of today's daemon (CamelCase detector kinds, attempt_launched) -> the contract's.
_ALIASES = {"attempt_launched": "attempt_started", "hang_detected": "collective_hang"}


def wire_kind(kind: str) -> str:
    """`CollectiveHang` -> `collective_hang`; `attempt_launched` -> `attempt_started`."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()
    return _ALIASES.get(snake, snake)


def observe_event(obs: Observations, ev: Event) -> None:
    """Fold one store event into the observations (events arrive in id order)."""
    kind, ts = wire_kind(str(ev.get("kind", ""))), float(ev.get("ts", 0.0))
    data = ev.get("data") or {}
    for key, latch in list(obs.latched.items()):
        spec = next(s for s in LATCHES.values() if s.alertname == latch.alertname)
        if kind in spec.resolved_by and ts >= latch.ts:
            del obs.latched[key]
    if kind == "attempt_started":
        obs.attempt = int(ev.get("attempt") or obs.attempt + 1)
        obs.attempt_running, obs.attempt_started_at, obs.run_terminal, obs.paused = True, ts, False, False
        obs.ranks.clear()
    elif kind in ("control_pause", "run_paused"):
        obs.paused = True
    elif kind == "control_resume":
        obs.paused = False
        obs.last_step_ts = max(obs.last_step_ts or ts, ts)  # paused time is not a stall
    elif kind == "attempt_ended":
        obs.attempt_running = False
    elif kind in _TERMINAL:
        obs.run_terminal, obs.attempt_running = True, False
    elif kind == "restart_scheduled":
        obs.restarts.append(ts)
    elif kind == "checkpoint_committed":
        obs.last_checkpoint_ts = ts
        obs.commits = [*obs.commits[-9:], ts]
    elif kind == "daemon_started":
        obs.daemon_starts += 1
        if obs.daemon_starts > 1:
            kind = "daemon_reattached"
    if kind == "attempt_ended" and ev.get("severity") not in ("error", "critical"):
        return
    opened = LATCHES.get(kind)
    if opened is None:
        return
    labels = {"run": obs.run}
    for name in opened.labels:
        value = data[name] if data.get(name) is not None else ev.get(name)
        if value is not None and value != "":
            labels[name] = _s(value)
    latch = Latched(
        alertname=opened.alertname,
        labels=labels,
        ts=ts,
        attempt=int(ev.get("attempt") or obs.attempt),
        message=str(ev.get("message", "")),
        data=dict(data),
    )
    obs.latched[f"{opened.alertname}:{fingerprint(labels)}"] = latch


def observe_step(obs: Observations, rec: dict[str, Any], keep: int) -> None:
    """Fold one step record (engine/driver.py's keys) into a window of the last `keep` steps."""
    ts = float(rec.get("ts", 0.0))
    obs.last_step_ts = max(obs.last_step_ts or ts, ts)
    for key, latch in list(obs.latched.items()):
        if latch.alertname == "NoProgress" and ts >= latch.ts:
            del obs.latched[key]
    step_s = float(rec.get("step_s") or 0.0)
    tokens = float(rec.get("rollout_tokens") or 0) + float(rec.get("train_tokens") or 0)
    row = {"step": float(rec.get("step", 0)), "ts": ts, "attempt": float(rec.get("attempt", obs.attempt))}
    for k in ("loss", "reward_mean", "reward_std", "grad_norm", "kl"):
        if isinstance(rec.get(k), int | float):
            row[k] = float(rec[k])
    if step_s > 0 and tokens > 0:
        row["tokens_per_s"] = tokens / step_s
    obs.steps.append(row)
    del obs.steps[:-keep]


def observe_report(obs: Observations, report: dict[str, Any]) -> None:
    """Fold one rank report (the wire Report as a dict): liveness and the node's GPU snapshot."""
    role, rank, ts = str(report.get("role", "")), str(report.get("rank", "")), float(report.get("ts", 0.0))
    obs.ranks[f"{role}/{rank}"] = {
        "role": role,
        "rank": rank,
        "attempt": int(report.get("attempt", 0)),
        "ts": ts,
        "state": str(report.get("state", "")),
        "host": str(report.get("host", "")),
    }
    snap = report.get("gpus") or {}
    node = str(snap.get("node") or report.get("host", ""))
    for dev in snap.get("devices") or []:
        key = f"{node}/{dev.get('index', 0)}"
        seen = obs.gpus.get(key) or GpuSeen(node=node, index=int(dev.get("index", 0)), role=role, rank=rank)
        seen.temperature_c = dev.get("temperature_celsius")
        xid = {str(k): int(v) for k, v in (dev.get("xid_errors") or {}).items()}
        new_xid = [k for k, v in xid.items() if v > seen.xid.get(k, 0)]
        if new_xid and key in obs.gpus:  # the first sight is a baseline: old errors are not news
            seen.xid_new_at, seen.xid_new = ts, sorted(new_xid)
        ecc = {str(k): int(v) for k, v in (dev.get("ecc_errors") or {}).items()}
        if ecc.get("uncorrected", 0) > seen.ecc.get("uncorrected", 0) and key in obs.gpus:
            seen.ecc_new_at = ts
        seen.xid, seen.ecc = xid, ecc
        obs.gpus[key] = seen


def observe_disk(obs: Observations, path: str, free_bytes: int, total_bytes: int) -> None:
    obs.disk = {"path": path, "free": int(free_bytes), "total": int(total_bytes)}


# ----- conditions ------------------------------------------------------------------------------


def _latched_condition(latch: Latched) -> Condition:
    d, evidence = latch.data, ""
    if latch.alertname == "CollectiveHang":
        culprits = ", ".join(f"{r} {k}" for r, k in d.get("culprit_ranks") or [])
        evidence = (
            f"diagnosis {d.get('diagnosis', '?')}; culprit(s) {culprits or 'unknown'}; collective {d.get('op', '?')} "
            f"seq {d.get('seq', '?')} in group {d.get('group', '?')}; stacks in "
            f"diagnostics/diagnosis_{d.get('diagnosis_id', '?')}/; detected in {d.get('detection_s', '?')} s"
        )
    elif latch.alertname == "Straggler":
        evidence = f"rank {d.get('rank', '?')} relative score {d.get('relative_score', '?')}"
    elif latch.alertname == "HeartbeatLost":
        evidence = f"pid {d.get('pid', '?')}, last phase {d.get('phase', '?')}"
    else:  # the event's own data is the evidence (exit code, reason, step, path)
        evidence = ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if isinstance(v, str | int | float))[
            :500
        ]
    return condition(latch.alertname, latch.labels, latch.message or latch.alertname, evidence)


def _robust_z(values: list[float], x: float) -> float:
    med = statistics.median(values)
    mad = statistics.median(abs(v - med) for v in values) or 1e-12
    return (x - med) / (1.4826 * mad)


def _step_rules(obs: Observations, r: RulesConfig, base: dict[str, str]) -> list[Condition]:
    out: list[Condition] = []
    if not obs.steps:
        return out
    last = obs.steps[-1]
    bad = [k for k in ("loss", "grad_norm", "reward_mean") if k in last and not math.isfinite(last[k])]
    if bad:
        vals = ", ".join(f"{k}={last[k]}" for k in bad)
        out.append(
            condition(
                "NonFiniteLoss",
                base,
                f"non-finite {vals} at step {int(last['step'])}",
                f"step record {int(last['step'])} of attempt {int(last['attempt'])}",
            )
        )
    losses = [
        s["loss"] for s in obs.steps[-r.loss_spike_window - 1 : -1] if math.isfinite(s.get("loss", math.nan))
    ]
    if len(losses) >= 5 and math.isfinite(last.get("loss", math.nan)):
        z = _robust_z(losses, last["loss"])
        if z > r.loss_spike_factor:
            out.append(
                condition(
                    "LossSpike",
                    base,
                    f"loss {last['loss']:.4g} at step {int(last['step'])} is {z:.1f} robust sd above the "
                    f"median {statistics.median(losses):.4g} of the last {len(losses)} steps",
                )
            )
    w = r.reward_window
    stds = [s["reward_std"] for s in obs.steps[-w:] if "reward_std" in s]
    if len(stds) >= w and max(abs(v) for v in stds) <= r.reward_std_floor:
        out.append(
            condition(
                "RewardCollapse",
                base,
                f"reward_std <= {r.reward_std_floor:g} for the last {w} steps: every sample scores the same",
            )
        )
    rewards = [s["reward_mean"] for s in obs.steps if math.isfinite(s.get("reward_mean", math.nan))]
    if fell := _fell(rewards, w, r.reward_drop_ratio, statistics.fmean):
        before, now_ = fell
        out.append(
            condition(
                "RewardCollapse",
                base,
                f"mean reward fell from {before:.4g} to {now_:.4g} over the last {w} steps",
            )
        )
    tw = r.throughput_window
    tps = [s["tokens_per_s"] for s in obs.steps if "tokens_per_s" in s]
    if fell := _fell(tps, tw, r.throughput_drop_ratio, statistics.median):
        before, now_ = fell
        out.append(
            condition(
                "ThroughputDrop",
                base,
                f"throughput fell from {before:.4g} to {now_:.4g} tokens/s (median of {tw} steps)",
            )
        )
    return out


def _fell(
    values: list[float], w: int, ratio: float, average: Callable[[list[float]], float]
) -> tuple[float, float] | None:
    """The average of the last ``w`` values and of the ``w`` before, when it fell below ``ratio`` of that."""
    if len(values) < 2 * w:
        return None
    before, now_ = average(values[-2 * w : -w]), average(values[-w:])
    return (before, now_) if before > 0 and now_ < ratio * before else None


def _gpu_rules(obs: Observations, now: float, r: RulesConfig, base: dict[str, str]) -> list[Condition]:
    out: list[Condition] = []
    for g in obs.gpus.values():
        labels = {**base, "node": g.node, "gpu": str(g.index)}
        where = f"GPU {g.index} on {g.node} (seen by {g.role} {g.rank})"
        if g.temperature_c is not None and g.temperature_c >= r.gpu_temperature_c:
            out.append(
                condition(
                    "GpuOverheat",
                    labels,
                    f"{where} at {g.temperature_c:.0f} C (limit {r.gpu_temperature_c:.0f} C)",
                )
            )
        if g.xid_new_at is not None and now - g.xid_new_at < r.gpu_error_hold_s:
            out.append(
                condition(
                    "GpuXid",
                    labels,
                    f"{where} reported new XID error(s) {', '.join(g.xid_new)}",
                    f"counts {g.xid}",
                )
            )
        if g.ecc_new_at is not None and now - g.ecc_new_at < r.gpu_error_hold_s:
            out.append(
                condition(
                    "GpuEccUncorrected",
                    labels,
                    f"{where} reported new uncorrected ECC errors",
                    f"counts {g.ecc}",
                )
            )
    return out


def _state_rules(obs: Observations, now: float, r: RulesConfig, base: dict[str, str]) -> list[Condition]:
    out: list[Condition] = []
    recent = [t for t in obs.restarts if now - t <= r.restart_loop_window_s]
    if len(recent) >= r.restart_loop_count:
        out.append(
            condition(
                "RestartLoop",
                base,
                f"{len(recent)} restarts in the last {r.restart_loop_window_s / 60:.0f} min "
                f"(limit {r.restart_loop_count})",
            )
        )
    if obs.disk and obs.disk.get("total"):
        free, total = obs.disk["free"], obs.disk["total"]
        if free < r.disk_free_bytes or free / total < r.disk_free_ratio:
            out.append(
                condition(
                    "DiskLow",
                    base,
                    f"{free / 2**30:.1f} GiB free ({100 * free / total:.1f}%) on the run dir {obs.disk['path']}",
                )
            )
    if not obs.attempt_running or obs.run_terminal or obs.paused or obs.attempt_started_at is None:
        return out
    att = {**base, "attempt": str(obs.attempt)}
    since = max(obs.last_step_ts or 0.0, obs.attempt_started_at)
    if now - since > r.no_progress_s:
        out.append(
            condition(
                "NoProgress",
                att,
                f"attempt {obs.attempt} took no step for {now - since:.0f} s (limit {r.no_progress_s:.0f} s)",
            )
        )
    ckpt = obs.last_checkpoint_ts or obs.attempt_started_at
    gaps = [b - a for a, b in zip(obs.commits, obs.commits[1:], strict=False) if b > a]
    interval = statistics.median(gaps) if gaps else r.checkpoint_interval_s
    limit = max(r.checkpoint_stale_factor * interval, r.checkpoint_stale_min_s)
    if now - ckpt > limit:
        out.append(
            condition(
                "CheckpointStale",
                base,
                f"no checkpoint committed for {now - ckpt:.0f} s ({r.checkpoint_stale_factor:g} x interval "
                f"{interval:.0f} s)",
            )
        )
    for rk in obs.ranks.values():
        if rk["attempt"] != obs.attempt or rk["state"] == "exited":
            continue
        age = now - rk["ts"]
        if rk["state"] in ("failed", "dead") or age > r.worker_down_s:
            out.append(
                condition(
                    "WorkerDown",
                    {**att, "role": rk["role"], "rank": rk["rank"]},
                    f"{rk['role']} {rk['rank']} on {rk['host']} is {rk['state'] or 'silent'}; last report "
                    f"{age:.0f} s ago (limit {r.worker_down_s:.0f} s)",
                )
            )
    return out


def _hold_expired(latch: Latched, now: float, r: RulesConfig) -> bool:
    spec = next(s for s in LATCHES.values() if s.alertname == latch.alertname)
    return spec.hold and now - latch.ts >= r.event_hold_s


RULES: tuple[Callable[[Observations, float, RulesConfig, dict[str, str]], list[Condition]], ...] = (
    lambda o, n, r, b: _step_rules(o, r, b),
    _gpu_rules,
    _state_rules,
)


def evaluate(obs: Observations, now: float, cfg: AlertsConfig) -> list[Condition]:
    """Every condition true at `now`, one per (alertname, labels); disabled rules left out."""
    base = {"run": obs.run}
    out = [_latched_condition(lt) for lt in obs.latched.values() if not _hold_expired(lt, now, cfg.rules)]
    for rule in RULES:
        out.extend(rule(obs, now, cfg.rules, base))
    seen: dict[str, Condition] = {}
    for c in out:
        if c.alertname not in cfg.disabled_rules:
            seen.setdefault(c.fingerprint, c)
    return list(seen.values())


def prune(obs: Observations, now: float, cfg: AlertsConfig) -> None:
    """Drop what no rule can use any more (old restarts, expired holds), so the state stays small."""
    obs.restarts = [t for t in obs.restarts if now - t <= cfg.rules.restart_loop_window_s]
    for key, latch in list(obs.latched.items()):
        if _hold_expired(latch, now, cfg.rules):
            del obs.latched[key]


def steps_to_keep(r: RulesConfig) -> int:
    return max(r.loss_spike_window + 1, 2 * r.reward_window, 2 * r.throughput_window)
