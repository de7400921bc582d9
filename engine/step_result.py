"""What one engine step and one attempt yield: the figures the driver logs to steps.jsonl and returns.

Also the repair of a step record lost to a crash: a checkpoint commits before its step's line
of steps.jsonl is written, so the manifest carries that record (``STEP_RECORD_KEY``), and an
attempt that resumes from it writes the record back if steps.jsonl ends before its step.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .contract.wire import StepFigures

STEP_RECORD_KEY = "step_record"  # the checkpoint manifest's copy of its step's record
_TAIL_BYTES = 1 << 16  # a step record is about 1 kB: the last one is within this of the end


class StepResult(StepFigures):
    """One step's figures as the driver returns them (built with ``model_construct``: no validation cost)."""

    def record(self, attempt: int) -> dict[str, Any]:
        """This step's line of steps.jsonl: the contract's StepRecord, the figures as they were given."""
        return {"attempt": attempt, "ts": time.time(), **dict(self)}


def last_recorded_step(steps_file: Path) -> int | None:
    """The step of the last whole line of ``steps_file`` (reads only its tail); None if it has none."""
    try:
        with steps_file.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except FileNotFoundError:
        return None
    for line in reversed(tail.splitlines()[1 if size > _TAIL_BYTES else 0 :]):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line (the writer died mid-line) or a partial first one
    return None


def restore_step_record(steps_file: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Writes the manifest's step record to ``steps_file`` if the file ends before that step; returns it."""
    record = manifest.get(STEP_RECORD_KEY)
    if not isinstance(record, dict) or "step" not in record:
        return None  # a checkpoint from before records were kept in manifests
    last = last_recorded_step(steps_file)
    if last is not None and last >= int(record["step"]):
        return None
    with steps_file.open("ab") as f:
        if f.tell() and not _ends_with_newline(steps_file):
            f.write(b"\n")  # finish a torn line so the record starts a line of its own
        f.write(json.dumps(record).encode() + b"\n")
    return record


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"


@dataclass
class RunResult:
    start_step: int
    final_step: int
    world_size: int
    resumed_from: int | None
    loaded_checksum: str | None
    final_checksum: str
    steps: list[StepResult]  # the newest ``retention.driver_results`` of this attempt
    steps_run: int = 0  # every step this attempt ran
