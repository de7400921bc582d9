"""Hang and straggler detection over the ranks' reports (pure logic: no I/O, no clocks of its own).

Hangs. A collective open longer than max(floor, k x that op's recent p99) -- with grace for
an attempt's first steps and for checkpoint saves -- is stuck. Comparing every rank's
per-group sequence numbers, phase, step and heartbeat names the cause:

- ``frozen_rank``: a rank sent no report for ``stale_heartbeat_s`` (its reporter thread is
  frozen too: SIGSTOP, a stuck interpreter, a dead host);
- ``desync``: a rank never entered the collective and has moved on (idle, another phase or
  step): it skipped it;
- ``compute_stuck``: a rank never entered it and is still in the peers' phase and step,
  computing;
- ``collective_stuck``: every rank entered it and none completes (transport, network).

Stragglers. Per step, each trainer rank's compute time (time in collectives excluded) is
compared with the median rank (relative score) and with the rank's own history
(individual score); a rank is flagged only when its relative score stays over the
threshold for several consecutive windows. Arrival lateness at collectives (enter time
minus the earliest rank's) is reported alongside.
"""

from __future__ import annotations

import statistics
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from milepost.engine.contract.config import DetectionConfig
from milepost.engine.contract.enums import RankStatus, Role

Report = dict[str, Any]


@dataclass
class Diagnosis:
    kind: str
    culprits: list[tuple[str, int]]
    group: str
    seq: int
    op: str
    onset_at: float
    detected_at: float
    message: str
    phases: dict[str, str] = field(default_factory=dict)
    waiting: list[tuple[str, int]] = field(default_factory=list)


def _who(key: tuple[str, int]) -> str:
    return f"{key[0]} {key[1]}"


class HangDetector:
    def __init__(self, cfg: DetectionConfig) -> None:
        self.cfg = cfg

    def threshold(self, rep: Report, c: dict[str, Any], attempt_start_step: int) -> float:
        cfg = self.cfg
        if c["group"] == "checkpoint" or rep.get("phase") == "checkpoint":
            return cfg.checkpoint_floor_s
        p99 = 0.0
        summary = (rep.get("collectives") or {}).get(f"{c['op']}|{c['group']}")
        if summary:
            p99 = float(summary.get("p99_s", 0.0))
        bound = max(cfg.hang_floor_s, cfg.hang_factor * p99)
        if rep.get("step", 0) - attempt_start_step <= cfg.warmup_steps:
            bound = max(bound, cfg.warmup_floor_s)
        return bound

    def check(
        self, reports: dict[tuple[str, int], Report], now: float, attempt_start_step: int = 0
    ) -> Diagnosis | None:
        """One tick: ``reports`` holds the latest report of every rank of the current attempt."""
        stuck: tuple[float, str, int, str, tuple[str, int]] | None = None
        for key, rep in reports.items():
            for c in rep.get("open_collectives") or []:
                age = now - float(c["enter_ts"])
                if age > self.threshold(rep, c, attempt_start_step) and (
                    stuck is None or c["enter_ts"] < stuck[0]
                ):
                    stuck = (float(c["enter_ts"]), c["group"], int(c["seq"]), c["op"], key)
        stale = [
            k
            for k, r in reports.items()
            if now - float(r.get("ts", now)) > self.cfg.stale_heartbeat_s
            and r.get("state") != RankStatus.EXITED
        ]
        if stuck is None and stale:
            stuck = self._peer_wait(reports, stale, now)
        if stuck is None:
            return self._frozen_without_collective(reports, stale, now, attempt_start_step)
        onset, group, seq, op, _ = stuck
        members = [
            k for k, r in reports.items() if group in (r.get("coll_entered") or {}) or k[0] == Role.TRAINER
        ]
        members = [
            k for k in members if k[0] == Role.TRAINER or group in (reports[k].get("coll_entered") or {})
        ]
        phases = {_who(k): f"{reports[k].get('phase')}@{reports[k].get('step')}" for k in reports}
        entered = [k for k in members if (reports[k].get("coll_entered") or {}).get(group, 0) >= seq]
        missing = [k for k in members if k not in entered]
        frozen = [k for k in members if k in stale]
        if frozen and len(frozen) == len(members) > 1:
            # Every rank silent at once looks like a starved machine or a slow daemon, not frozen
            # ranks: give the reports a longer chance before naming anyone.
            oldest = min(float(reports[k].get("ts", now)) for k in frozen)
            if now - oldest < 3 * self.cfg.stale_heartbeat_s:
                return None
        quiet = [
            k
            for k in members
            if k not in stale and now - float(reports[k].get("ts", now)) > self.cfg.stale_heartbeat_s / 2
        ]
        if quiet and not frozen:
            # A rank that has not reported for a while may be frozen (its peer entered the
            # collective early, or it froze inside the collective after its last report) or
            # merely slow to report: decide once it reports or goes stale.
            return None
        where = f"{op} (group {group}, seq {seq})"
        if frozen:
            kind, culprits = "frozen_rank", frozen
            why = (
                f"{', '.join(map(_who, frozen))} frozen: no heartbeat for >{self.cfg.stale_heartbeat_s:.0f}s"
            )
        elif missing:
            peers = [reports[k] for k in entered]
            peer_phase = statistics.mode([p.get("phase") for p in peers]) if peers else None
            peer_step = max((p.get("step", 0) for p in peers), default=0)
            desynced = [
                k
                for k in missing
                if reports[k].get("phase") != peer_phase or reports[k].get("step", 0) != peer_step
            ]
            if desynced:
                kind, culprits = "desync", desynced
                why = (
                    f"{', '.join(map(_who, desynced))} skipped it and moved on ("
                    + ", ".join(
                        f"{_who(k)} in {reports[k].get('phase')} at step {reports[k].get('step')}"
                        for k in desynced
                    )
                    + ")"
                )
            else:
                kind, culprits = "compute_stuck", missing
                why = f"{', '.join(map(_who, missing))} never entered it: still computing in {peer_phase}"
        else:
            kind, culprits = "collective_stuck", []
            why = f"all {len(members)} ranks entered it and none completes"
        waiting = [k for k in entered if k not in culprits]
        message = (
            f"{kind}: {where} open for {now - onset:.1f}s; {why}; "
            f"waiting: {', '.join(map(_who, waiting)) or 'none'}; phases: "
            + ", ".join(f"{k} {v}" for k, v in sorted(phases.items()))
        )
        return Diagnosis(kind, culprits, group, seq, op, onset, now, message, phases, waiting)

    def _peer_wait(
        self, reports: dict[tuple[str, int], Report], stale: list[tuple[str, int]], now: float
    ) -> tuple[float, str, int, str, tuple[str, int]] | None:
        """The oldest collective a live rank has waited in for ``stale_heartbeat_s`` while a peer is silent.

        A frozen rank blocks its peers in whatever collective comes next -- a checkpoint save's
        included, whose own threshold is minutes: the silence plus the wait names it sooner.
        """
        waits = [
            (float(c["enter_ts"]), c["group"], int(c["seq"]), c["op"], key)
            for key, rep in reports.items()
            if key not in stale
            for c in rep.get("open_collectives") or []
            if now - float(c["enter_ts"]) > self.cfg.stale_heartbeat_s
        ]
        return min(waits) if waits else None

    def _frozen_without_collective(
        self,
        reports: dict[tuple[str, int], Report],
        stale: list[tuple[str, int]],
        now: float,
        start_step: int,
    ) -> Diagnosis | None:
        """A frozen process outside any collective (e.g. a rollout worker): its peers wait on it elsewhere."""
        floor = self.cfg.hang_floor_s
        frozen = [
            k for k in stale if now - float(reports[k].get("ts", now)) > floor + self.cfg.stale_heartbeat_s
        ]
        if not frozen or any(reports[k].get("step", 0) - start_step < self.cfg.warmup_steps for k in frozen):
            return None
        onset = min(float(reports[k].get("ts", now)) for k in frozen)
        phases = {_who(k): f"{reports[k].get('phase')}@{reports[k].get('step')}" for k in reports}
        message = (
            f"frozen_rank: {', '.join(map(_who, frozen))} sent no heartbeat for {now - onset:.1f}s "
            f"(last phase {', '.join(str(reports[k].get('phase')) for k in frozen)}); phases: "
            + ", ".join(f"{k} {v}" for k, v in sorted(phases.items()))
        )
        return Diagnosis("frozen_rank", frozen, "", 0, "", onset, now, message, phases, [])


@dataclass
class StragglerFlag:
    rank: int
    relative: float
    individual: float
    lateness_s: float
    windows: int
    message: str


class StragglerDetector:
    """Windows of ``window_steps`` steps; a rank is flagged after ``windows`` consecutive bad windows
    that also span ``MIN_PERSIST_S`` of the daemon's clock.

    Noise is brief and hits ranks at random; a straggler is slower in nearly every step and stays
    so. A window counts against a rank only when (1) its median per-step ratio to the step's
    median rank is over the threshold, (2) it is also slower than its own past, and (3) it was
    slower than the step's median in at least ``CONSISTENCY`` of the window's steps. Thread-safe:
    reports are added from the API's thread while the supervisor evaluates.
    """

    CONSISTENCY = 0.6  # share of a window's steps in which the rank must be slower than the median
    MIN_PERSIST_S = 5.0  # a burst of interference shorter than this is not a straggler
    KEEP_STEPS = 64  # per-rank history kept when no window can form (one rank, detection idle)

    def __init__(self, cfg: DetectionConfig) -> None:
        self.cfg = cfg
        self.compute: dict[int, dict[int, float]] = defaultdict(dict)  # rank -> step -> compute seconds
        self.arrivals: dict[tuple[str, int], dict[int, float]] = {}  # (group, seq) -> rank -> enter ts
        self.baseline: dict[int, float] = {}
        self.streak: dict[int, int] = defaultdict(int)
        self.streak_since: dict[int, float] = {}  # rank -> daemon time its current streak began
        self.flagged: set[int] = set()
        self.scores: dict[int, float] = {}
        self.lateness: dict[int, float] = {}
        self.next_window_start: int | None = None
        self._lock = threading.Lock()

    def add_report(self, rank: int, rep: Report) -> None:
        with self._lock:
            for step, seconds in rep.get("compute_hist") or []:
                self.compute[rank][int(step)] = float(seconds)
            for group, seq, _op, enter_ts, _dur in rep.get("recent_collectives") or []:
                self.arrivals.setdefault((group, int(seq)), {})[rank] = float(enter_ts)
            self._bound()

    def add_matrix(self, first_step: int, compute: np.ndarray) -> None:
        """Bulk input (steps x ranks), for simulations at thousands of ranks."""
        with self._lock:
            for j in range(compute.shape[1]):
                d = self.compute[j]
                for i in range(compute.shape[0]):
                    d[first_step + i] = float(compute[i, j])

    def _bound(self) -> None:
        for d in self.compute.values():
            if len(d) > self.KEEP_STEPS:
                for s in sorted(d)[: len(d) - self.KEEP_STEPS]:
                    del d[s]
        if len(self.arrivals) > 4096:
            for k in list(self.arrivals)[:-1024]:
                del self.arrivals[k]

    def evaluate(self, now: float | None = None) -> list[StragglerFlag]:
        """Consumes every complete window; returns ranks newly flagged.

        ``now`` is the daemon's clock; None (simulations fed in bulk) skips the persistence in seconds.
        """
        with self._lock:
            return self._evaluate(now)

    def _evaluate(self, now: float | None) -> list[StragglerFlag]:
        ranks = sorted(self.compute)
        if len(ranks) < 2:
            return []
        common = set.intersection(*(set(self.compute[r]) for r in ranks))
        if not common:
            return []
        if self.next_window_start is None or self.next_window_start < min(common):
            # The first window, or history pruned past the window start: resume at what is common.
            self.next_window_start = min(common)
        w = self.cfg.straggler_window_steps
        new: list[StragglerFlag] = []
        while all(s in common for s in range(self.next_window_start, self.next_window_start + w)):
            steps = range(self.next_window_start, self.next_window_start + w)
            m = np.array([[self.compute[r][s] for s in steps] for r in ranks])  # ranks x steps
            # Per step, the lower median rank (works for 2 ranks) is the yardstick.
            ref_steps = np.maximum(np.sort(m, axis=0)[(len(ranks) - 1) // 2], 1e-9)
            ratios = m / ref_steps  # ranks x steps
            rel = np.median(ratios, axis=1)
            per_rank = np.median(m, axis=1)
            ref = float(np.median(ref_steps))
            slower_share = np.mean(ratios > 1.0 + (self.cfg.straggler_threshold - 1.0) / 2, axis=1)
            self._lateness(ranks)
            for r, score, own, share in zip(ranks, rel, per_rank, slower_share, strict=True):
                base = self.baseline.setdefault(r, float(own))
                self.scores[r] = float(score)
                # Slower than the median rank AND than its own past: a rank that has always been a
                # little slower (placement, a shared core) is not a straggler, one that became slow is.
                own_margin = 1.0 + (self.cfg.straggler_threshold - 1.0) / 2
                bad = (
                    score > self.cfg.straggler_threshold
                    and float(own) / max(base, 1e-9) > own_margin
                    and share >= self.CONSISTENCY
                )
                if bad:
                    self.streak[r] += 1
                    if now is not None:
                        self.streak_since.setdefault(r, now)
                else:
                    self.streak[r] = 0
                    self.streak_since.pop(r, None)
                    if score <= self.cfg.straggler_threshold:
                        # Only a window at the median's pace teaches the baseline: a slow one that
                        # failed the consistency test must not drag it up towards the slowdown.
                        self.baseline[r] = 0.8 * base + 0.2 * float(own)
                lasted = now is None or now - self.streak_since.get(r, now) >= self.MIN_PERSIST_S
                if self.streak[r] >= self.cfg.straggler_windows and lasted and r not in self.flagged:
                    self.flagged.add(r)
                    indiv = float(own) / max(base, 1e-9)
                    late = self.lateness.get(r, 0.0)
                    new.append(
                        StragglerFlag(
                            r,
                            float(score),
                            indiv,
                            late,
                            self.streak[r],
                            f"trainer {r} is a straggler: compute {float(own) * 1000:.0f} ms/step is {score:.2f}x "
                            f"the median rank's ({ref * 1000:.0f} ms) for {self.streak[r]} windows of {w} steps; "
                            f"{indiv:.2f}x its own baseline; arrives {late * 1000:.0f} ms late at collectives",
                        )
                    )
            for s in steps:
                for r in ranks:
                    self.compute[r].pop(s, None)
            self.next_window_start += w
        return new

    def _lateness(self, ranks: list[int]) -> None:
        full = [v for v in self.arrivals.values() if len(v) == len(ranks)]
        if not full:
            return
        late: dict[int, deque[float]] = defaultdict(lambda: deque(maxlen=256))
        for v in full[-256:]:
            first = min(v.values())
            for r, t in v.items():
                late[r].append(t - first)
        self.lateness = {r: float(np.mean(v)) for r, v in late.items()}
