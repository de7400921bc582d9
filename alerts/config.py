"""The `[alerts]` config: rule thresholds, routes, receivers and timing (pydantic v2, frozen).

Secrets never live in the file: a receiver names the environment variable that holds its
URL, routing key or password (`url_env`, `routing_key_env`, `password_env`), and the value
is read only when the receiver is built. The lead moves these models into the contract's
config later; nothing here imports the daemon.
"""

from __future__ import annotations

from typing import Annotated, Literal

from milepost.alerts.model import InhibitRule, Matcher
from milepost.engine.contract.enums import Severity
from pydantic import BaseModel, ConfigDict, Field, model_validator

PosFloat = Annotated[float, Field(gt=0)]
EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RulesConfig(_Frozen):
    """Thresholds of the built-in rules (seconds, ratios, counts)."""

    restart_loop_count: Annotated[int, Field(ge=2)] = 5  # NVRx restart_storm: >= 5 cycles in 30 min
    restart_loop_window_s: PosFloat = 1800.0
    no_progress_s: PosFloat = 600.0
    checkpoint_interval_s: PosFloat = 1800.0
    checkpoint_stale_factor: PosFloat = 3.0
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


class RouteConfig(_Frozen):
    """`[[alerts.routes]]`: alerts at or above `min_severity` whose labels match go to `receivers`."""

    receivers: Annotated[tuple[str, ...], Field(min_length=1)]
    min_severity: Severity = Severity.INFO
    severities: tuple[Severity, ...] = ()  # when set, only these severities
    matchers: tuple[str, ...] = ()  # Alertmanager spelling: 'alertname=~"Gpu.*"', 'role!=rollout'
    continue_: bool = Field(False, alias="continue")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _matchers_parse(self) -> RouteConfig:
        for text in self.matchers:
            Matcher.parse(text)  # raises a ValueError that names the matcher
        return self

    def parsed_matchers(self) -> tuple[Matcher, ...]:
        return tuple(Matcher.parse(t) for t in self.matchers)


ReceiverType = Literal["webhook", "slack", "pagerduty", "alertmanager", "email", "log"]
PAGERDUTY_URL = "https://events.pagerduty.com/v2/enqueue"


class ReceiverConfig(_Frozen):
    """`[[alerts.receivers]]`: where notifications go; secrets only by environment variable name."""

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
    to: tuple[str, ...] = ()
    username: str = ""
    password_env: EnvName | None = None
    starttls: bool = True  # used when the server offers it

    @model_validator(mode="after")
    def _fields_for_type(self) -> ReceiverConfig:
        where = f"alerts.receivers[{self.name}]"
        if self.type in ("webhook", "alertmanager") and not (self.url or self.url_env):
            raise ValueError(f"{where}: type {self.type} needs url or url_env")
        if self.type == "slack" and not self.url_env:
            raise ValueError(f"{where}: type slack needs url_env (a Slack webhook URL is a secret)")
        if self.type == "pagerduty" and not self.routing_key_env:
            raise ValueError(f"{where}: type pagerduty needs routing_key_env")
        if self.type == "email":
            host, _, port = self.smarthost.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{where}: smarthost must be host:port, got {self.smarthost!r}")
            if not self.from_addr or not self.to:
                raise ValueError(f"{where}: type email needs from_addr and to")
        for field in ("url",):
            value = getattr(self, field)
            if value and not value.startswith(("http://", "https://")):
                raise ValueError(f"{where}: {field} must start with http:// or https://, got {value!r}")
        return self


def default_inhibit_rules() -> tuple[InhibitRule, ...]:
    """RunFailed explains everything else in its run; a hang explains stalls and stragglers."""
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
            targets=("NoProgress", "Straggler", "ThroughputDrop", "HeartbeatLost"),
            equal=("run", "attempt"),
        ),
        InhibitRule(source="RestartLoop", targets=("AttemptFailed",), equal=("run",)),
        InhibitRule(
            source="WorkerDown", targets=("HeartbeatLost",), equal=("run", "attempt", "role", "rank")
        ),
        InhibitRule(source="NonFiniteLoss", targets=("LossSpike",), equal=("run",)),
    )


class AlertsConfig(_Frozen):
    """`[alerts]`: the whole alerting config; validated once, on creation."""

    enabled: bool = True
    dashboard_url: str = "http://127.0.0.1:8501"
    group_by: tuple[str, ...] = ("run", "alertname")
    group_wait_s: Annotated[float, Field(ge=0)] = 10.0
    group_interval_s: Annotated[float, Field(ge=0)] = 60.0
    repeat_interval_s: PosFloat = 4 * 3600.0
    resolved_keep_s: PosFloat = 3600.0  # a resolved alert is forgotten after this
    rules: RulesConfig = RulesConfig()
    disabled_rules: tuple[str, ...] = ()
    routes: tuple[RouteConfig, ...] = (RouteConfig.model_validate({"receivers": ["log"]}),)
    receivers: tuple[ReceiverConfig, ...] = (ReceiverConfig(name="log", type="log"),)
    inhibit_rules: tuple[InhibitRule, ...] = Field(default_factory=default_inhibit_rules)
    backoff_base_s: PosFloat = 1.0
    backoff_max_s: PosFloat = 300.0
    outbox_max_age_s: PosFloat = 7 * 24 * 3600.0  # a notification older than this is dropped, counted

    @model_validator(mode="after")
    def _routes_name_receivers(self) -> AlertsConfig:
        names = [r.name for r in self.receivers]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"alerts.receivers: duplicate name(s) {sorted(dup)}")
        for i, route in enumerate(self.routes):
            unknown = [n for n in route.receivers if n not in names]
            if unknown:
                raise ValueError(
                    f"alerts.routes[{i}].receivers: unknown receiver(s) {unknown}; known {names}"
                )
        if not self.dashboard_url.startswith(("http://", "https://")):
            raise ValueError(
                f"alerts.dashboard_url must start with http:// or https://, got {self.dashboard_url!r}"
            )
        return self

    def receiver(self, name: str) -> ReceiverConfig:
        for r in self.receivers:
            if r.name == name:
                return r
        raise KeyError(
            f"alerts.receivers: no receiver named {name!r}; known {[r.name for r in self.receivers]}"
        )
