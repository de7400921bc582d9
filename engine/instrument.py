"""The one place every step boundary, phase and collective of a rank passes through.

Training code calls ``inst.step(n)``, ``inst.phase("train")`` and
``inst.collective("all_reduce", group="world", nbytes=...)`` (or, for async work,
``begin_collective``/``end_collective``); observers plugged in here (reporter to the
daemon, tracing, hang and straggler detection) see them all. The instrument keeps the
rank's live state (step, phase, open collectives, per-group sequence numbers, per-op
summaries) so a reporter thread can read it without touching the training thread.

Observer errors are counted and swallowed: reporting must never hurt training.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

_RECENT = 64  # closed collectives kept for arrival-lateness comparisons across ranks
_DURATIONS = 128  # recent durations kept per (op, group) for the p99


@dataclass
class CollectiveRecord:
    op: str
    group: str
    seq: int
    nbytes: int
    dtype: str
    enter_ts: float
    exit_ts: float | None = None
    world: int = 0


@dataclass
class PhaseRecord:
    name: str
    step: int
    start_ts: float
    end_ts: float | None = None
    collective_s: float = 0.0  # time inside collectives during the phase (waiting, not computing)

    @property
    def compute_s(self) -> float:
        return max(0.0, (self.end_ts or time.time()) - self.start_ts - self.collective_s)


@dataclass
class OpSummary:
    count: int = 0
    seconds: float = 0.0
    nbytes: int = 0
    world: int = 0
    recent: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=_DURATIONS))

    def p99(self) -> float:
        if not self.recent:
            return 0.0
        ordered = sorted(self.recent)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@dataclass
class RankState:
    role: str
    rank: int
    step: int = 0
    phase: str = "startup"
    open_collectives: dict[tuple[str, int], CollectiveRecord] = field(default_factory=dict)
    entered: dict[str, int] = field(default_factory=dict)  # group -> highest seq entered
    completed: dict[str, int] = field(default_factory=dict)  # group -> highest seq completed
    ops: dict[tuple[str, str], OpSummary] = field(default_factory=dict)
    recent: collections.deque[CollectiveRecord] = field(
        default_factory=lambda: collections.deque(maxlen=_RECENT)
    )
    compute: dict[str, float] = field(default_factory=dict)  # phase -> compute seconds of its last run
    compute_hist: collections.deque[tuple[int, float]] = field(
        default_factory=lambda: collections.deque(maxlen=32)
    )  # (step, compute seconds of the "train" phase): the straggler detector's input
    collective_busy_s: float = 0.0


class RankObserver(Protocol):
    def on_step_begin(self, state: RankState, step: int) -> None: ...
    def on_step_end(self, state: RankState, step: int, duration_s: float) -> None: ...
    def on_phase_end(self, state: RankState, rec: PhaseRecord) -> None: ...
    def on_collective_begin(self, state: RankState, rec: CollectiveRecord) -> None: ...
    def on_collective_end(self, state: RankState, rec: CollectiveRecord) -> None: ...


class RankInstrument:
    def __init__(self, role: str, rank: int, observers: list[RankObserver] | None = None) -> None:
        self.state = RankState(role=role, rank=rank)
        self.observers: list[RankObserver] = list(observers or [])
        self.observer_errors = 0
        self._lock = threading.Lock()
        self._local = threading.local()  # depth of explicit collective() records on this thread

    def add_observer(self, obs: RankObserver) -> None:
        self.observers.append(obs)

    def _notify(self, method: str, *args: object) -> None:
        for obs in self.observers:
            try:
                getattr(obs, method)(self.state, *args)
            except Exception:
                # A broken observer must not take the training step down with it.
                self.observer_errors += 1

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        self.state.step = step
        t0 = time.monotonic()
        self._notify("on_step_begin", step)
        try:
            yield
        finally:
            self._notify("on_step_end", step, time.monotonic() - t0)

    @contextmanager
    def phase(self, name: str) -> Iterator[PhaseRecord]:
        prev = self.state.phase
        rec = PhaseRecord(name=name, step=self.state.step, start_ts=time.time())
        busy0 = self.state.collective_busy_s
        self.state.phase = name
        try:
            yield rec
        finally:
            rec.end_ts = time.time()
            rec.collective_s = self.state.collective_busy_s - busy0
            self.state.compute[name] = rec.compute_s
            if name == "train":
                self.state.compute_hist.append((rec.step, rec.compute_s))
            self.state.phase = prev
            self._notify("on_phase_end", rec)

    def set_phase(self, name: str) -> None:
        self.state.phase = name

    # -- collectives ----------------------------------------------------------
    def begin_collective(
        self, op: str, *, group: str, nbytes: int = 0, dtype: str = "", world: int = 0
    ) -> CollectiveRecord:
        with self._lock:
            seq = self.state.entered.get(group, 0) + 1
            self.state.entered[group] = seq
            rec = CollectiveRecord(
                op=op, group=group, seq=seq, nbytes=nbytes, dtype=dtype, enter_ts=time.time(), world=world
            )
            self.state.open_collectives[(group, seq)] = rec
        self._notify("on_collective_begin", rec)
        return rec

    def end_collective(self, rec: CollectiveRecord) -> None:
        """Closes ``rec`` and, since a group's collectives complete in order, any older one still open."""
        now = time.time()
        closed: list[CollectiveRecord] = []
        with self._lock:
            for key, other in list(self.state.open_collectives.items()):
                if other.group == rec.group and other.seq <= rec.seq:
                    del self.state.open_collectives[key]
                    other.exit_ts = now
                    closed.append(other)
            if not closed:
                return
            for c in closed:
                duration = now - c.enter_ts
                s = self.state.ops.setdefault((c.op, c.group), OpSummary())
                s.count += 1
                s.seconds += duration
                s.nbytes += c.nbytes
                s.world = c.world or s.world
                s.recent.append(duration)
                self.state.recent.append(c)
                self.state.collective_busy_s += duration
            self.state.completed[rec.group] = max(self.state.completed.get(rec.group, 0), rec.seq)
        for c in closed:
            self._notify("on_collective_end", c)

    @contextmanager
    def collective(
        self, op: str, *, group: str, nbytes: int = 0, dtype: str = ""
    ) -> Iterator[CollectiveRecord]:
        """An explicit record around collectives torch.distributed does not expose (DTensor's functional
        ones); torch.distributed calls made inside it are not recorded a second time."""
        rec = self.begin_collective(op, group=group, nbytes=nbytes, dtype=dtype)
        self._local.depth = self.explicit_depth() + 1
        try:
            yield rec
        finally:
            self._local.depth -= 1
            self.end_collective(rec)

    def explicit_depth(self) -> int:
        return int(getattr(self._local, "depth", 0))
