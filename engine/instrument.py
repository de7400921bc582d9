"""The one place every step boundary, phase and collective of a rank passes through.

Training code calls ``inst.step(n)``, ``inst.phase("train")`` and
``inst.collective("all_reduce", group="world", nbytes=...)`` (or, for async work,
``begin_collective``/``end_collective``). The instrument keeps the rank's live state
(step, phase, open collectives, per-group sequence numbers, per-op summaries, compute
time per phase) so the reporter thread can read it without touching the training thread;
the daemon's hang and straggler detection work from those reports.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

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


class RankInstrument:
    def __init__(self, role: str, rank: int) -> None:
        self.state = RankState(role=role, rank=rank)
        self.observer_errors = 0  # no observers any more; the reporter still sends the counter (always 0)
        self._lock = threading.Lock()
        self._local = threading.local()  # depth of explicit collective() records on this thread

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        self.state.step = step
        yield

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
