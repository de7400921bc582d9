"""The ``[alerts]`` section: rule thresholds, ``[[alerts.routes]]``, ``[[alerts.receivers]]``, timing.

Secrets never live in the file: a receiver names the environment variable that holds its
URL, routing key, password or header (``url_env``, ``routing_key_env``, ``password_env``,
``headers_env``), and the value is read only when the receiver is built (milepost.alerts).
A matcher is spelled as Alertmanager spells it (``name=value``, ``!=``, ``=~``, ``!~``);
``parse_matcher`` is that spelling's one definition, shared by routes, inhibit rules and silences.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self

from pydantic import ConfigDict, Field, model_validator

from ..enums import Severity
from .base import FieldError, Section

PosFloat = Annotated[float, Field(gt=0)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# TOML gives arrays as lists; the models hold tuples (frozen, hashable).
Names = Annotated[tuple[str, ...], Field(strict=False)]
MatchOp = Literal["=", "!=", "=~", "!~"]
_MATCHER_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*\"?(.*?)\"?\s*$")
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"


def parse_matcher(text: str) -> tuple[str, MatchOp, str]:
    """``severity=~"error|critical"`` -> ("severity", "=~", "error|critical"); ValueError naming the text."""
    m = _MATCHER_RE.match(text)
    if not m:
        raise ValueError(f"matcher {text!r} is not of the form name=value, name!=value, name=~re or name!~re")
    op: MatchOp = m.group(2)  # type: ignore[assignment]
    if op in ("=~", "!~"):
        try:
            re.compile(m.group(3))
        except re.error as e:
            raise ValueError(f"matcher value {m.group(3)!r} is not a valid regular expression: {e}") from e
    return m.group(1), op, m.group(3)


class RulesConfig(Section):
    """``[alerts.rules]``: thresholds of the built-in rules (seconds, ratios, counts)."""

    section = "alerts.rules"

    restart_loop_count: Annotated[int, Field(ge=2)] = 5  # NVRx restart_storm: >= 5 cycles in 30 min
    restart_loop_window_s: PosFloat = 1800.0
    no_progress_s: PosFloat = 600.0
    checkpoint_interval_s: PosFloat = 1800.0
    checkpoint_stale_factor: PosFloat = 3.0
    checkpoint_stale_min_s: Annotated[float, Field(ge=0)] = (
        300.0  # never stale sooner (fast test checkpoints)
    )
    worker_down_s: PosFloat = 120.0
    loss_spike_window: Annotated[int, Field(ge=5)] = 50
    loss_spike_factor: PosFloat = 6.0  # robust z-score (median/MAD) of the newest loss
    reward_window: Annotated[int, Field(ge=3)] = 20
    reward_drop_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.5
    reward_std_floor: Annotated[float, Field(ge=0)] = 1e-6
    throughput_window: Annotated[int, Field(ge=3)] = 20
    throughput_drop_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.5
    disk_free_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.05
    disk_free_bytes: Annotated[int, Field(ge=0)] = 10 * 2**30
    gpu_temperature_c: PosFloat = 90.0
    gpu_error_hold_s: PosFloat = 900.0  # an XID/ECC alert stays this long after the last new error
    event_hold_s: PosFloat = 900.0  # an event-made alert with no resolving event resolves after this


class RouteConfig(Section):
    """``[[alerts.routes]]``: alerts at or above ``min_severity`` whose labels match go to ``receivers``."""

    section = "alerts.routes"
    model_config = ConfigDict(populate_by_name=True)

    receivers: Annotated[tuple[str, ...], Field(min_length=1, strict=False)]
    min_severity: Severity = Field(Severity.INFO, strict=False)
    severities: Annotated[tuple[Severity, ...], Field(strict=False)] = ()  # when set, only these
    matchers: Names = ()  # Alertmanager spelling: 'alertname=~"Gpu.*"', 'role!=rollout'
    continue_: bool = Field(False, alias="continue")

    @model_validator(mode="after")
    def _matchers_parse(self) -> Self:
        for i, text in enumerate(self.matchers):
            try:
                parse_matcher(text)
            except ValueError as e:
                raise FieldError(f"matchers[{i}]", text, str(e)) from None
        return self


ReceiverType = Literal["webhook", "slack", "pagerduty", "alertmanager", "email", "log"]


class ReceiverConfig(Section):
    """``[[alerts.receivers]]``: where notifications go; secrets only by environment variable name."""

    section = "alerts.receivers"

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    type: ReceiverType
    url: str = ""  # a URL that is no secret (an Alertmanager, an internal webhook)
    url_env: EnvName | None = None  # the variable holding a secret URL (a Slack webhook)
    routing_key_env: EnvName | None = None  # PagerDuty integration key
    send_resolved: bool = True
    timeout_s: PosFloat = 10.0
    headers_env: dict[str, EnvName] = Field(default_factory=dict)  # header -> variable (a bearer token)
    # email
    smarthost: str = ""  # host:port
    from_addr: str = ""
    to: Names = ()
    username: str = ""
    password_env: EnvName | None = None
    starttls: bool = True  # used when the server offers it

    @model_validator(mode="after")
    def _fields_for_type(self) -> Self:
        t = self.type
        if t in ("webhook", "alertmanager") and not (self.url or self.url_env):
            raise FieldError("url", self.url, f"type {t} needs url or url_env")
        if t == "slack" and not self.url_env:
            raise FieldError(
                "url_env", self.url_env, "type slack needs url_env (a Slack webhook URL is a secret)"
            )
        if t == "pagerduty" and not self.routing_key_env:
            raise FieldError("routing_key_env", self.routing_key_env, "type pagerduty needs routing_key_env")
        if t == "email":
            host, _, port = self.smarthost.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise FieldError("smarthost", self.smarthost, "smarthost must be host:port")
            if not self.from_addr or not self.to:
                raise FieldError("to", list(self.to), "type email needs from_addr and to")
        if self.url and not self.url.startswith(("http://", "https://")):
            raise FieldError("url", self.url, "must start with http:// or https://")
        return self


class InhibitRule(Section):
    """``[[alerts.inhibit_rules]]``: a firing ``source`` alert mutes ``targets`` with the same ``equal`` labels."""

    section = "alerts.inhibit_rules"

    source: str
    targets: Names
    equal: Names = ("run",)


def default_inhibit_rules() -> tuple[InhibitRule, ...]:
    """One page per incident: the root cause's alert mutes the symptoms it explains.

    RunFailed explains everything else in its run. A hang the supervisor restarts from explains
    the failed attempt, the restart's stalls, stragglers and lost heartbeats of that attempt.
    """
    return (
        InhibitRule(
            source="RunFailed",
            targets=(
                "AttemptFailed",
                "NoProgress",
                "HeartbeatLost",
                "WorkerDown",
                "Straggler",
                "ThroughputDrop",
                "CheckpointStale",
                "CollectiveHang",
                "RestartLoop",
            ),
            equal=("run",),
        ),
        InhibitRule(
            source="CollectiveHang",
            targets=(
                "AttemptFailed",
                "WorkerDown",
                "NoProgress",
                "Straggler",
                "ThroughputDrop",
                "HeartbeatLost",
            ),
            equal=("run", "attempt"),
        ),
        InhibitRule(source="RestartLoop", targets=("AttemptFailed",), equal=("run",)),
        InhibitRule(
            source="WorkerDown", targets=("HeartbeatLost",), equal=("run", "attempt", "role", "rank")
        ),
        InhibitRule(source="NonFiniteLoss", targets=("LossSpike",), equal=("run",)),
    )


class AlertsConfig(Section):
    """``[alerts]``: the whole alerting config; validated once, on creation."""

    section = "alerts"

    enabled: bool = True
    dashboard_url: str = "http://127.0.0.1:8501"  # alert links point at its pages
    group_by: Names = ("run", "alertname")
    group_wait_s: Annotated[float, Field(ge=0)] = 10.0
    group_interval_s: Annotated[float, Field(ge=0)] = 60.0
    repeat_interval_s: PosFloat = 4 * 3600.0
    resolved_keep_s: PosFloat = 3600.0  # a resolved alert is forgotten after this
    rules: RulesConfig = RulesConfig()
    disabled_rules: Names = ()
    routes: Annotated[tuple[RouteConfig, ...], Field(strict=False)] = (
        RouteConfig.model_validate({"receivers": ["log"]}),
    )
    receivers: Annotated[tuple[ReceiverConfig, ...], Field(strict=False)] = (
        ReceiverConfig(name="log", type="log"),
    )
    inhibit_rules: Annotated[tuple[InhibitRule, ...], Field(strict=False)] = Field(
        default_factory=default_inhibit_rules
    )
    backoff_base_s: PosFloat = 1.0
    backoff_max_s: PosFloat = 300.0
    outbox_max_age_s: PosFloat = 7 * 24 * 3600.0  # a notification older than this is dropped, counted
    disk_check_s: PosFloat = 30.0  # how often the daemon reads the run dir's free space

    @model_validator(mode="after")
    def _routes_name_receivers(self) -> Self:
        names = [r.name for r in self.receivers]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise FieldError("receivers", dup, "duplicate receiver name(s)")
        for i, route in enumerate(self.routes):
            unknown = [n for n in route.receivers if n not in names]
            if unknown:
                raise FieldError(f"routes[{i}].receivers", unknown, f"unknown receiver(s); known {names}")
        if not self.dashboard_url.startswith(("http://", "https://")):
            raise FieldError("dashboard_url", self.dashboard_url, "must start with http:// or https://")
        return self

    def receiver(self, name: str) -> ReceiverConfig:
        for r in self.receivers:
            if r.name == name:
                return r
        raise KeyError(
            f"alerts.receivers: no receiver named {name!r}; known {[r.name for r in self.receivers]}"
        )
