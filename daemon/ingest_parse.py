"""Rank report batches, validated one report at a time: one bad report must not cost a rank its heartbeat.

A batch whose envelope is wrong (not JSON, no ``reports`` list, too many reports) is refused
whole. Inside a good envelope each report is validated alone: the valid ones are accepted;
an invalid one whose identity (attempt, role, rank) still reads is kept as a heartbeat of
that rank (the daemon saw it alive) and counted as rejected; one without even that is only
counted. A rank that resent a refused batch forever would go silent and be killed for
``heartbeat_lost`` over one non-finite number.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from milepost.engine.contract.wire import MAX_REPORTS, IngestBatch, NonNegI64, RankRole, Report
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

log = logging.getLogger(__name__)

MAX_ERRORS = 5  # errors named in an answer; the count covers the rest
_REPORT = TypeAdapter(Report)


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore")
    reports: list[dict[str, Any]] = Field(max_length=MAX_REPORTS)


class ReportId(BaseModel):
    """Who sent a report: enough to count it as a heartbeat when the rest of it is refused."""

    model_config = ConfigDict(extra="ignore")
    attempt: NonNegI64
    role: RankRole
    rank: NonNegI64


@dataclass
class ParsedBatch:
    reports: list[dict[str, Any]] = field(default_factory=list)  # valid, as Report.model_dump()
    heartbeats: list[dict[str, Any]] = field(default_factory=list)  # ReportId of each refused one
    rejected: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_ERRORS, loc from "body"
    rejected_roles: list[str] = field(default_factory=list)  # role of each refused report ("unknown")

    @property
    def nothing_usable(self) -> bool:
        return not self.reports and not self.heartbeats


def _errors(e: ValidationError, prefix: tuple[Any, ...]) -> list[dict[str, Any]]:
    return [
        {**err, "loc": [*prefix, *err.get("loc", ())]}
        for err in e.errors(include_url=False, include_context=False, include_input=False)
    ]


def envelope_errors(e: ValidationError) -> list[dict[str, Any]]:
    """A refused envelope's errors, each ``loc`` under "body" (FastAPI's shape), inputs left out."""
    return _errors(e, ("body",))


def parse_batch(body: bytes) -> ParsedBatch:
    """Raises ValidationError when the envelope is wrong; otherwise sorts each report into accepted or refused."""
    try:
        return ParsedBatch(reports=IngestBatch.model_validate_json(body).model_dump()["reports"])
    except ValidationError:
        pass  # the common case is above, in Rust; sort the reports one by one below
    envelope = _Envelope.model_validate_json(body)
    out = ParsedBatch()
    for i, raw in enumerate(envelope.reports):
        try:
            out.reports.append(_REPORT.validate_python(raw).model_dump())
            continue
        except ValidationError as e:
            out.rejected += 1
            if len(out.errors) < MAX_ERRORS:
                out.errors += _errors(e, ("body", "reports", i))[: MAX_ERRORS - len(out.errors)]
        try:
            who = ReportId.model_validate(raw)
        except ValidationError:
            out.rejected_roles.append("unknown")
            continue
        out.heartbeats.append(who.model_dump())
        out.rejected_roles.append(str(who.role))
    return out


class RejectLog:
    """Logs refused reports at most once per ``every_s`` (with the count since), so a flood is one line."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self.total = 0
        self._since = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, parsed: ParsedBatch, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self.total += parsed.rejected
            self._since += parsed.rejected
            if now - self._last < self.every_s:
                return
            count, self._since, self._last = self._since, 0, now
        first = parsed.errors[0] if parsed.errors else {}
        log.warning(
            "refused %d invalid rank report(s) (%d in all); the others of their batch were kept. First: %s at %s",
            count,
            self.total,
            first.get("msg", "?"),
            ".".join(map(str, first.get("loc", ()))),
        )
