"""Tailing the attempt's JSON-lines files (``events.jsonl``, ``steps.jsonl``) from an offset.

Only whole lines are read (a line still being written waits for the next read); a
malformed line is skipped with a warning. Each file's offset lives in the store, so a
restarted daemon goes on where it stopped. ``read`` returns the records with the offset
they end at, and ``commit`` stores it: today the supervisor commits right after reading,
before it stores the records; storing both in one transaction needs only ``commit`` moved.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Offsets(Protocol):
    def offset(self, name: str) -> int: ...
    def set_offset(self, name: str, value: int) -> None: ...


@dataclass(frozen=True)
class Batch:
    name: str  # the file's name in the run dir, also its offset's key
    records: list[dict[str, Any]]
    end: int  # the offset just past the last whole line read


class Tailer:
    def __init__(self, run_dir: Path, offsets: Offsets) -> None:
        self.run_dir, self.offsets = run_dir, offsets

    def read(self, name: str) -> Batch | None:
        """The whole lines written since the committed offset; None when there are none."""
        path = self.run_dir / name
        if not path.exists():
            return None
        offset = self.offsets.offset(name)
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return None
        out: list[dict[str, Any]] = []
        for line in data[: end + 1].splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping a malformed line in %s", name)
        return Batch(name, out, offset + end + 1)

    def commit(self, batch: Batch) -> None:
        self.offsets.set_offset(batch.name, batch.end)

    def read_new(self, name: str) -> list[dict[str, Any]]:
        """Reads and commits at once (the supervisor's behaviour today)."""
        batch = self.read(name)
        if batch is None:
            return []
        self.commit(batch)
        return batch.records
