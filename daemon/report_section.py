"""ReportSection: the base of the metric collectors that each take one dict section of a rank report."""

from __future__ import annotations

import threading
import time
from typing import Any


class ReportSection:
    """Takes the dict under ``section`` of every report it is given; anything else there is skipped."""

    section: str

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def ingest(self, rep: dict[str, Any], now: float | None = None) -> None:
        part = rep.get(self.section)
        if isinstance(part, dict):
            self._take(rep, part, time.time() if now is None else now)

    def _take(self, rep: dict[str, Any], part: dict[str, Any], now: float) -> None:
        raise NotImplementedError
