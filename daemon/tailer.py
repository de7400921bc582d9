"""Tailing the attempt's JSON-lines files (``events.jsonl``, ``steps.jsonl``) from an offset.

Only whole lines are read (a line still being written waits for the next read); a
malformed line is skipped with a warning. Each file's offset lives in the store, so a
restarted daemon goes on where it stopped. ``read`` returns the records with the offset
they end at, and ``commit`` stores it: the caller commits inside the same store
transaction as the records (``Store.transaction``), so a crash or an SQLite error between
the two loses nothing and stores nothing twice: the batch is read again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 4 << 20  # one read's bound: a backlog of days is taken in slices, not at once


class Offsets(Protocol):
    def offset(self, name: str) -> int: ...
    def set_offset(self, name: str, value: int) -> None: ...


@dataclass(frozen=True)
class Batch:
    name: str  # the file's name in the run dir, also its offset's key
    records: list[dict[str, Any]]
    end: int  # the offset just past the last whole line read
    more: bool  # the file holds more after ``end`` than this read took


class Tailer:
    def __init__(self, run_dir: Path, offsets: Offsets, max_bytes: int = MAX_BATCH_BYTES) -> None:
        self.run_dir, self.offsets, self.max_bytes = run_dir, offsets, max_bytes

    def read(self, name: str) -> Batch | None:
        """The whole lines written since the committed offset (at most ``max_bytes``); None when none."""
        path = self.run_dir / name
        if not path.exists():
            return None
        offset = self.offsets.offset(name)
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read(self.max_bytes)
            if len(data) == self.max_bytes and b"\n" not in data:
                return self._skip_long_line(name, f, offset)
            more = len(data) == self.max_bytes
        end = data.rfind(b"\n")
        if end < 0:
            return None
        out: list[dict[str, Any]] = []
        for line in data[: end + 1].splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a malformed line in %s", name)
        return Batch(name, out, offset + end + 1, more)

    def _skip_long_line(self, name: str, f: Any, offset: int) -> Batch | None:
        # A line longer than a whole read is no record of ours: step over it rather than stall on it.
        pos = offset + self.max_bytes
        while chunk := f.read(self.max_bytes):
            if (i := chunk.find(b"\n")) >= 0:
                log.warning("skipping a line of over %d bytes in %s", self.max_bytes, name)
                return Batch(name, [], pos + i + 1, True)
            pos += len(chunk)
        return None  # still being written

    def commit(self, batch: Batch) -> None:
        """Stores the batch's end offset; call it inside the transaction that stores its records."""
        self.offsets.set_offset(batch.name, batch.end)
