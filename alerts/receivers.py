"""Receivers: one small class per kind behind the `Receiver` protocol.

`send(batch, timeout_s) -> Outcome` never raises: it answers ok, retry (the outbox backs
off and sends again: a timeout, a refused connection, HTTP 408/429/5xx, SMTP 4xx) or fail
(a permanent refusal: other HTTP 4xx, SMTP 5xx, a missing secret). Secrets (a Slack URL,
a routing key, a password, a header) are read from the environment once, held in
`Secret`, which never prints, and scrubbed from every reason an Outcome carries.
"""

from __future__ import annotations

import logging
import os
import smtplib
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import httpx
from milepost.alerts.model import Notification
from milepost.alerts.payloads import (
    alertmanager_alerts,
    email_message,
    pagerduty_events,
    slack_payload,
    webhook_payload,
)
from milepost.engine.contract.config.alerts import AlertsConfig, ReceiverConfig

log = logging.getLogger("milepost.alerts")


@dataclass(frozen=True)
class Outcome:
    status: Literal["ok", "retry", "fail"]
    reason: str = ""
    answer: str = ""  # what the receiver said (status line, body head): for `milepost alerts test`

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Receiver(Protocol):
    """Delivers one notification; must return within about `timeout_s` and never raise."""

    name: str

    def send(self, batch: Notification, timeout_s: float) -> Outcome: ...


class Secret:
    """A value that never shows in a repr, a log line or an f-string."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


class MissingSecret(ValueError):
    pass


def _env(env: Mapping[str, str], var: str | None, where: str) -> Secret:
    value = env.get(var or "", "")
    if not value:
        raise MissingSecret(f"{where}: environment variable {var} is not set or empty")
    return Secret(value)


def _scrub(text: str, secrets: list[Secret]) -> str:
    for s in secrets:
        if s.reveal():
            text = text.replace(s.reveal(), "***")
    return text[:300]


@dataclass
class HttpPost:
    """POSTs JSON bodies and classifies the answers; shared by the HTTP receivers."""

    url: Secret
    headers: dict[str, Secret] = field(default_factory=dict)
    secrets: list[Secret] = field(default_factory=list)

    def post(self, body: object, timeout_s: float) -> Outcome:
        headers = {k: v.reveal() for k, v in self.headers.items()}
        hidden = [self.url, *self.headers.values(), *self.secrets]
        try:
            resp = httpx.post(self.url.reveal(), json=body, headers=headers, timeout=timeout_s)
        except httpx.HTTPError as e:  # timeouts, refused connections, resets
            return Outcome("retry", _scrub(f"{type(e).__name__}: {e}", hidden))
        answer = _scrub(f"HTTP {resp.status_code} {resp.text[:200]}".strip(), hidden)
        if resp.is_success:
            return Outcome("ok", "", answer)
        if resp.status_code in (408, 425, 429) or resp.status_code >= 500:
            return Outcome("retry", answer, answer)
        return Outcome("fail", answer, answer)


@dataclass
class PostReceiver:
    """One POST per batch, its body made by ``payload`` (a webhook's or Slack's)."""

    name: str
    http: HttpPost
    payload: Callable[[Notification], object]

    def send(self, batch: Notification, timeout_s: float) -> Outcome:
        return self.http.post(self.payload(batch), timeout_s)


@dataclass
class PagerDutyReceiver:
    """One Events v2 call per alert; a retried batch repeats them, harmless by dedup_key."""

    name: str
    http: HttpPost
    routing_key: Secret

    def send(self, batch: Notification, timeout_s: float) -> Outcome:
        last = Outcome("ok")
        for event in pagerduty_events(batch, self.routing_key.reveal()):
            last = self.http.post(event, timeout_s)
            if not last.ok:
                return last
        return last


@dataclass
class AlertmanagerReceiver:
    name: str
    http: HttpPost
    horizon_s: float

    def send(self, batch: Notification, timeout_s: float) -> Outcome:
        return self.http.post(alertmanager_alerts(batch, self.horizon_s), timeout_s)


@dataclass
class EmailReceiver:
    """SMTP with STARTTLS when the server offers it (and `starttls` is on), login when a user is set."""

    name: str
    host: str
    port: int
    from_addr: str
    to: tuple[str, ...]
    username: str = ""
    password: Secret | None = None
    starttls: bool = True

    def send(self, batch: Notification, timeout_s: float) -> Outcome:
        hidden = [self.password] if self.password else []
        try:
            with smtplib.SMTP(self.host, self.port, timeout=timeout_s) as smtp:
                smtp.ehlo()
                if self.starttls and smtp.has_extn("starttls"):
                    smtp.starttls(context=ssl.create_default_context())
                    smtp.ehlo()
                if self.username and self.password is not None:
                    smtp.login(self.username, self.password.reveal())
                refused = smtp.send_message(email_message(batch, self.from_addr, self.to))
        except smtplib.SMTPAuthenticationError as e:
            return Outcome("fail", _scrub(f"SMTP authentication refused: {e.smtp_code}", hidden))
        except smtplib.SMTPResponseException as e:
            status: Literal["retry", "fail"] = "retry" if 400 <= e.smtp_code < 500 else "fail"
            return Outcome(status, _scrub(f"SMTP {e.smtp_code} {e.smtp_error!r}", hidden))
        except smtplib.SMTPRecipientsRefused as e:
            return Outcome("fail", f"SMTP refused every recipient: {sorted(e.recipients)}")
        except (OSError, smtplib.SMTPException) as e:
            return Outcome("retry", _scrub(f"{type(e).__name__}: {e}", hidden))
        if refused:
            return Outcome("fail", f"SMTP refused recipients {sorted(refused)}")
        return Outcome("ok", "", f"accepted for {len(self.to)} recipient(s)")


@dataclass
class LogReceiver:
    name: str = "log"
    logger: logging.Logger = field(default_factory=lambda: log)

    def send(self, batch: Notification, timeout_s: float) -> Outcome:
        for a in batch.alerts:
            self.logger.warning(
                "alert %s %s %s: %s", a.status, a.alertname, a.labels, a.annotations.get("summary", "")
            )
        return Outcome("ok", "", f"logged {len(batch.alerts)} alert(s)")


def build_receiver(rc: ReceiverConfig, cfg: AlertsConfig, env: Mapping[str, str] | None = None) -> Receiver:
    """The receiver a config names; raises MissingSecret naming the variable when one is unset."""
    env = os.environ if env is None else env
    where = f"alerts.receivers[{rc.name}]"
    headers = {h: _env(env, var, f"{where}.headers_env[{h}]") for h, var in rc.headers_env.items()}

    def url() -> Secret:
        return _env(env, rc.url_env, f"{where}.url_env") if rc.url_env else Secret(rc.url)

    if rc.type == "webhook":
        return PostReceiver(rc.name, HttpPost(url(), headers), webhook_payload)
    if rc.type == "slack":
        return PostReceiver(rc.name, HttpPost(url(), headers), slack_payload)
    if rc.type == "pagerduty":
        key = _env(env, rc.routing_key_env, f"{where}.routing_key_env")
        pd_url = url() if (rc.url or rc.url_env) else Secret("https://events.pagerduty.com/v2/enqueue")
        return PagerDutyReceiver(rc.name, HttpPost(pd_url, headers, [key]), key)
    if rc.type == "alertmanager":
        base = url()
        full = Secret(base.reveal().rstrip("/") + "/api/v2/alerts")
        return AlertmanagerReceiver(
            rc.name, HttpPost(full, headers, [base]), horizon_s=2 * cfg.repeat_interval_s
        )
    if rc.type == "email":
        host, _, port = rc.smarthost.rpartition(":")
        password = _env(env, rc.password_env, f"{where}.password_env") if rc.password_env else None
        return EmailReceiver(
            rc.name, host, int(port), rc.from_addr, rc.to, rc.username, password, rc.starttls
        )
    return LogReceiver(rc.name)


def build_receivers(
    cfg: AlertsConfig, env: Mapping[str, str] | None = None
) -> tuple[dict[str, Receiver], dict[str, str]]:
    """Every configured receiver that can be built, and why the others cannot (name -> reason)."""
    built: dict[str, Receiver] = {}
    broken: dict[str, str] = {}
    for rc in cfg.receivers:
        try:
            built[rc.name] = build_receiver(rc, cfg, env)
        except (MissingSecret, ValueError) as e:
            broken[rc.name] = str(e)
    return built, broken
