"""What each receiver is sent, as pure functions of a notification (no I/O, no secrets).

- `webhook_payload`: Alertmanager's webhook body, version "4", exactly its fields.
- `slack_payload`: a Slack incoming-webhook message in Block Kit (header, one section per
  alert, a dashboard button), within Slack's limits (50 blocks, 3000 chars a section).
- `pagerduty_events`: Events API v2, one trigger or resolve per alert, dedup_key = fingerprint.
- `alertmanager_alerts`: the body of Alertmanager's `POST /api/v2/alerts`.
- `email_message`: a plain-text mail, subject like Alertmanager's `[FIRING:2] ...`.
"""

from __future__ import annotations

import datetime as dt
from email.message import EmailMessage
from typing import Any

from milepost.alerts.model import Alert, AlertStatus, Notification

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert that has not ended
MAX_SLACK_ALERTS = 20
_PD_SEVERITY = {"critical": "critical", "error": "error", "warning": "warning", "info": "info"}


def rfc3339(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _starts(a: Alert) -> str:
    return rfc3339(a.fired_at if a.fired_at is not None else a.active_since)


def _ends(a: Alert) -> str:
    return (
        rfc3339(a.resolved_at)
        if a.status == AlertStatus.RESOLVED and a.resolved_at is not None
        else ZERO_TIME
    )


def _common(maps: list[dict[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    return {k: v for k, v in maps[0].items() if all(m.get(k) == v for m in maps[1:])}


def webhook_payload(n: Notification) -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": n.group_key,
        "truncatedAlerts": 0,
        "receiver": n.receiver,
        "status": str(n.status),
        "alerts": [
            {
                "status": str(a.status),
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": _starts(a),
                "endsAt": _ends(a),
                "generatorURL": a.generator_url,
                "fingerprint": a.fingerprint,
            }
            for a in n.alerts
        ],
        "groupLabels": n.group_labels,
        "commonLabels": _common([a.labels for a in n.alerts]),
        "commonAnnotations": _common([a.annotations for a in n.alerts]),
        "externalURL": n.external_url,
    }


def _title(n: Notification) -> str:
    firing = sum(a.status == AlertStatus.FIRING for a in n.alerts)
    status = f"FIRING:{firing}" if n.status == AlertStatus.FIRING else "RESOLVED"
    labels = " ".join(f"{k}={v}" for k, v in sorted(n.group_labels.items()))
    return f"[{status}] {labels}".strip()


def _line(a: Alert) -> str:
    where = ", ".join(
        f"{k}={a.labels[k]}"
        for k in ("attempt", "role", "rank", "group", "op", "node", "gpu")
        if k in a.labels
    )
    return f"{a.alertname} ({a.labels.get('severity', '')}{', ' + where if where else ''}) {a.status}"


def slack_payload(n: Notification) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _title(n)[:150]}}
    ]
    for a in n.alerts[:MAX_SLACK_ALERTS]:
        text = f"*{_line(a)}*\n{a.annotations.get('summary', '')}"
        for key in ("evidence", "action"):
            if a.annotations.get(key):
                text += f"\n_{key}_: {a.annotations[key]}"
        if a.generator_url:
            text += f"\n<{a.generator_url}|open in the dashboard>"
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}})
    if len(n.alerts) > MAX_SLACK_ALERTS:
        more = f"and {len(n.alerts) - MAX_SLACK_ALERTS} more alerts"
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": more}]})
    if n.external_url:
        button = {
            "type": "button",
            "text": {"type": "plain_text", "text": "Dashboard"},
            "url": n.external_url,
        }
        blocks.append({"type": "actions", "elements": [button]})
    return {"text": _title(n), "blocks": blocks}


def pagerduty_events(n: Notification, routing_key: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for a in n.alerts:
        if a.status == AlertStatus.RESOLVED:
            out.append({"routing_key": routing_key, "event_action": "resolve", "dedup_key": a.fingerprint})
            continue
        event: dict[str, Any] = {
            "routing_key": routing_key,
            "event_action": "trigger",
            "dedup_key": a.fingerprint,
            "payload": {
                "summary": f"{a.alertname}: {a.annotations.get('summary', '')}"[:1024],
                "source": a.labels.get("run", "milepost"),
                "severity": _PD_SEVERITY.get(a.labels.get("severity", ""), "error"),
                "timestamp": _starts(a),
                "component": a.labels.get("role", ""),
                "group": a.labels.get("group", ""),
                "class": a.alertname,
                "custom_details": {"labels": a.labels, "annotations": a.annotations},
            },
            "client": "milepost",
        }
        if a.generator_url:
            event["client_url"] = a.generator_url
            event["links"] = [{"href": a.generator_url, "text": "milepost dashboard"}]
        out.append(event)
    return out


def alertmanager_alerts(n: Notification, horizon_s: float) -> list[dict[str, Any]]:
    """A firing alert ends `horizon_s` after this push (we push again before: repeat interval)."""
    out = []
    for a in n.alerts:
        ends = (
            a.resolved_at
            if a.status == AlertStatus.RESOLVED and a.resolved_at is not None
            else n.created_at + horizon_s
        )
        out.append(
            {
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": _starts(a),
                "endsAt": rfc3339(ends),
                "generatorURL": a.generator_url,
            }
        )
    return out


def email_message(n: Notification, from_addr: str, to: tuple[str, ...]) -> EmailMessage:
    msg = EmailMessage()
    msg["Subject"] = _title(n)
    msg["From"] = from_addr
    msg["To"] = ", ".join(to)
    lines = []
    for a in n.alerts:
        lines.append(_line(a))
        lines.extend(f"  {k}: {v}" for k, v in a.annotations.items())
        lines.append(
            f"  since {_starts(a)}" + (f", resolved {_ends(a)}" if a.status == AlertStatus.RESOLVED else "")
        )
        lines.append("")
    if n.external_url:
        lines.append(f"Dashboard: {n.external_url}")
    msg.set_content("\n".join(lines))
    return msg
