"""The one place every step boundary, phase and collective of a rank passes through.

Training code calls ``inst.step(n)``, ``inst.phase("train")`` and
``inst.collective("all_reduce", group="dp", nbytes=...)``; observers plugged in here
(reporter to the daemon, tracing, hang and straggler detection) see them all. The
instrument keeps the rank's live state (step, phase, open collectives) so a reporter
thread can read it without touching the training thread.

Observer errors are counted and swallowed: reporting must never hurt training.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class CollectiveRecord:
    op: str
    group: str
    seq: int
    nbytes: int
    dtype: str
    enter_ts: float
    exit_ts: float | None = None


@dataclass
class PhaseRecord:
    name: str
    step: int
    start_ts: float
    end_ts: float | None = None


@dataclass
class RankState:
    role: str
    rank: int
    step: int = 0
    phase: str = "startup"
    open_collectives: dict[tuple[str, int], CollectiveRecord] = field(default_factory=dict)


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
        self._seq: dict[str, itertools.count[int]] = {}
        self._lock = threading.Lock()

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
        self.state.phase = name
        try:
            yield rec
        finally:
            rec.end_ts = time.time()
            self.state.phase = prev
            self._notify("on_phase_end", rec)

    def set_phase(self, name: str) -> None:
        self.state.phase = name

    @contextmanager
    def collective(
        self, op: str, *, group: str, nbytes: int = 0, dtype: str = ""
    ) -> Iterator[CollectiveRecord]:
        with self._lock:
            seq = next(self._seq.setdefault(group, itertools.count(1)))
            rec = CollectiveRecord(
                op=op, group=group, seq=seq, nbytes=nbytes, dtype=dtype, enter_ts=time.time()
            )
            self.state.open_collectives[(group, seq)] = rec
        self._notify("on_collective_begin", rec)
        try:
            yield rec
        finally:
            rec.exit_ts = time.time()
            with self._lock:
                self.state.open_collectives.pop((group, seq), None)
            self._notify("on_collective_end", rec)
