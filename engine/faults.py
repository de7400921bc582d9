"""Fault injection at chosen steps, shipped with the engine for tests, demos and benchmarks.

Faults come from the job file (``[[faults]]``) or from the daemon's API (``milepost
inject``), delivered in reporter responses. Each fires once, at the first step boundary
at or after its step, after writing a ``fault_injected`` event, so every fault test can
assert that the fault really fired. Kinds that need the rank's internals (skipping a
collective, a NaN loss, corrupting a checkpoint) act through hooks the rank registers.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

from .contract.config import FaultSpec
from .contract.enums import FaultKind, Severity
from .contract.events import EventKind
from .contract.process import ExitCode
from .events import EventSink

# Kinds that act through a hook the rank registers (FaultInjector.hooks); others act here.
HOOKED = (FaultKind.SKIP_COLLECTIVE, FaultKind.NAN, FaultKind.CORRUPT_CHECKPOINT)


def flip_bytes(path: str | os.PathLike[str], nbytes: int = 4096) -> tuple[int, int]:
    """Inverts ``nbytes`` bytes in the middle of ``path`` in place; returns (offset, count).

    Reads and writes only those bytes: a checkpoint shard may be larger than the rank's memory.
    """
    size = os.path.getsize(path)
    count = min(nbytes, size)
    offset = (size - count) // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        block = f.read(count)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in block))
        f.flush()
        os.fsync(f.fileno())
    return offset, count


class InjectedFault(RuntimeError):
    """Raised by an ``exception`` fault."""


class FaultInjector:
    def __init__(
        self, specs: list[FaultSpec], *, role: str, rank: int, attempt: int, events: EventSink
    ) -> None:
        self.role, self.rank, self.events = role, rank, events
        self._lock = threading.Lock()
        self.pending = [
            s for s in specs if s.role == role and s.rank == rank and (s.attempts == "all" or attempt == 0)
        ]
        self.slow_factor = 1.0
        self.slow_until: int | None = None  # last step of a time-limited slow fault
        self.step = 0
        self.hooks: dict[str, Callable[[], None]] = {}

    def add(self, spec: FaultSpec) -> None:
        """Thread-safe: the reporter thread adds faults that arrive from the daemon."""
        if spec.role == self.role and spec.rank == self.rank:
            with self._lock:
                self.pending.append(spec)

    def check(self, step: int) -> None:
        """Fires every pending fault due at ``step``; call at step boundaries."""
        self.step = step
        if self.slow_until is not None and step > self.slow_until:
            self.slow_factor, self.slow_until = 1.0, None
        with self._lock:
            due = [s for s in self.pending if s.step <= step]
            self.pending = [s for s in self.pending if s.step > step]
        for spec in due:
            self._fire(spec, step)

    def _fire(self, spec: FaultSpec, step: int) -> None:
        if spec.kind in HOOKED and spec.kind not in self.hooks:
            self.events.emit(
                EventKind.FAULT_REJECTED,
                f"{spec.kind} cannot be injected into {self.role} {self.rank}",
                severity=Severity.WARNING,
            )
            return
        self.events.emit(
            EventKind.FAULT_INJECTED,
            f"injecting {spec.kind}{f':{spec.factor:g}' if spec.kind == FaultKind.SLOW else ''} into "
            f"{self.role} {self.rank} at step {step}",
            severity=Severity.WARNING,
            step=step,
            fault=spec.kind,
            pid=os.getpid(),
        )
        if spec.kind in (FaultKind.KILL, FaultKind.ROLLOUT_CRASH):
            os.kill(os.getpid(), signal.SIGKILL)
        elif spec.kind == FaultKind.EXIT:
            os._exit(ExitCode.FAULT_EXIT)
        elif spec.kind == FaultKind.EXCEPTION:
            raise InjectedFault(f"injected exception in {self.role} {self.rank} at step {step}")
        elif spec.kind == FaultKind.HANG:
            os.kill(os.getpid(), signal.SIGSTOP)
        elif spec.kind == FaultKind.STALL:
            while True:  # stuck in compute: the reporter thread keeps the heartbeat going
                time.sleep(1.0)
        elif spec.kind == FaultKind.SLOW:
            self.slow_factor = spec.factor
            self.slow_until = step + spec.duration_steps - 1 if spec.duration_steps else None
        else:
            self.hooks[spec.kind]()

    def slow_down(self, elapsed_s: float) -> None:
        """Stretches a compute section by the active ``slow`` factor."""
        if self.slow_factor > 1.0:
            time.sleep(elapsed_s * (self.slow_factor - 1.0))
