"""Alert data: labels, fingerprints, conditions, alert records, silences and notifications.

Everything here is plain data (pydantic models): the daemon persists it as JSON in its
store (``model_dump(mode="json")``) and restores it with ``model_validate`` after a restart.
A *condition* is what a rule says is true now; an *alert* is a condition's life through
pending -> firing -> resolved; a *notification* is one group of alerts for one receiver.
"""

from __future__ import annotations

import hashlib
import json
import re
from enum import StrEnum
from typing import Annotated, Any

from milepost.engine.contract.config.alerts import MatchOp, parse_matcher
from milepost.engine.contract.enums import Severity
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The labels an alert may carry besides alertname and severity; bounded so no label is a step id.
LABEL_NAMES = ("run", "attempt", "role", "rank", "group", "op", "gpu", "node")
SEVERITY_ORDER = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2, Severity.CRITICAL: 3}


class AlertStatus(StrEnum):
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


def fingerprint(labels: dict[str, str]) -> str:
    """A stable 16-hex-digit hash of the sorted labels (the alert's identity across restarts)."""
    blob = json.dumps(sorted(labels.items()), separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Data):
    """What one rule says holds now: the alert it would raise, before `for` and state."""

    alertname: str
    severity: Severity
    labels: dict[str, str] = Field(default_factory=dict)
    for_s: float = 0.0
    summary: str
    description: str = ""
    evidence: str = ""
    action: str = ""
    view: str = "overview"  # the dashboard page that shows it (path under the dashboard URL)

    def all_labels(self) -> dict[str, str]:
        return {**self.labels, "alertname": self.alertname, "severity": str(self.severity)}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.all_labels())


class Alert(_Data):
    """One alert's state; `active_since` is when its condition became true (pending from then)."""

    fingerprint: str
    labels: dict[str, str]
    annotations: dict[str, str]
    status: AlertStatus
    for_s: float = 0.0
    active_since: float
    fired_at: float | None = None
    resolved_at: float | None = None
    last_seen: float
    generator_url: str = ""
    muted_firing: bool = False  # muted at some tick while firing: its resolve alone is no news

    @property
    def alertname(self) -> str:
        return self.labels.get("alertname", "")


class Matcher(_Data):
    """One label matcher, as Alertmanager spells it: `name op value`; regexes are anchored."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    op: MatchOp = "="
    value: str = ""

    @model_validator(mode="after")
    def _regex_compiles(self) -> Matcher:
        if self.op in ("=~", "!~"):
            parse_matcher(f"{self.name}{self.op}{self.value}")  # a ValueError naming the value
        return self

    @classmethod
    def parse(cls, text: str) -> Matcher:
        """`severity=~"error|critical"` -> Matcher(name="severity", op="=~", value="error|critical")."""
        name, op, value = parse_matcher(text)
        return cls(name=name, op=op, value=value)

    def matches(self, labels: dict[str, str]) -> bool:
        got = labels.get(self.name, "")
        if self.op == "=":
            return got == self.value
        if self.op == "!=":
            return got != self.value
        hit = re.fullmatch(self.value, got) is not None
        return hit if self.op == "=~" else not hit


def matches_all(matchers: list[Matcher] | tuple[Matcher, ...], labels: dict[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


class Silence(_Data):
    """Mutes every alert whose labels match all matchers between starts_at and ends_at."""

    id: str
    matchers: Annotated[list[Matcher], Field(min_length=1)]
    starts_at: float
    ends_at: float
    created_by: str = ""
    comment: str = ""

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def mutes(self, labels: dict[str, str], now: float) -> bool:
        return self.active(now) and matches_all(self.matchers, labels)


class Notification(_Data):
    """One group's alerts for one receiver; `key` makes the outbox idempotent."""

    key: str
    receiver: str
    group_key: str
    group_labels: dict[str, str]
    status: AlertStatus  # firing when any alert in it fires
    alerts: list[Alert]
    external_url: str = ""
    created_at: float


def severity_at_least(severity: str, floor: str) -> bool:
    return SEVERITY_ORDER.get(Severity(severity), 0) >= SEVERITY_ORDER.get(Severity(floor), 0)


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
