"""Alert state: pending -> firing -> resolved, inhibition, silences, routing and grouping.

`advance(state, conditions, now, cfg)` moves every alert through its life: a new
condition is pending until it has held for its `for`, then firing; a firing alert whose
condition is gone is resolved (a pending one is dropped). `notifications(state, now, cfg)`
then groups what is not muted by route, receiver and `group_by` labels and says what to
send, Alertmanager's way: a new group waits `group_wait_s` to gather, a changed group is
sent at most every `group_interval_s`, an unchanged firing group again every
`repeat_interval_s`. Each notification's key (receiver, group, sequence) is stable, so a
daemon that crashes after enqueueing and before persisting the state enqueues the same
key again, and the outbox drops it. Muted: silenced (an active silence matches) or
inhibited (a firing source alert of an `InhibitRule` with the same `equal` labels).
"""

from __future__ import annotations

import urllib.parse

from milepost.alerts.model import (
    Alert,
    AlertStatus,
    Condition,
    Matcher,
    Notification,
    Silence,
    dumps,
    matches_all,
    severity_at_least,
)
from milepost.engine.contract.config.alerts import AlertsConfig, RouteConfig
from pydantic import BaseModel, ConfigDict, Field


class GroupState(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receiver: str
    group_key: str
    labels: dict[str, str]
    first_seen: float
    last_sent: float | None = None
    seq: int = 0
    sent: dict[str, AlertStatus] = Field(default_factory=dict)  # fingerprint -> status last sent


class AlertState(BaseModel):
    """All alert state of one run, JSON-serialisable (`model_dump(mode="json")`)."""

    model_config = ConfigDict(extra="forbid")
    alerts: dict[str, Alert] = Field(default_factory=dict)
    groups: dict[str, GroupState] = Field(default_factory=dict)
    silences: dict[str, Silence] = Field(default_factory=dict)


def generator_url(cfg: AlertsConfig, cond: Condition) -> str:
    query = urllib.parse.urlencode({"run": cond.labels.get("run", ""), "alert": cond.alertname})
    return f"{cfg.dashboard_url.rstrip('/')}/{cond.view}?{query}"


def _annotations(cond: Condition, url: str) -> dict[str, str]:
    notes = {
        "summary": cond.summary,
        "description": cond.description,
        "evidence": cond.evidence,
        "action": cond.action,
        "dashboard": url,
    }
    return {k: v for k, v in notes.items() if v}


def advance(state: AlertState, conditions: list[Condition], now: float, cfg: AlertsConfig) -> list[Alert]:
    """Apply the conditions true at `now`; returns the alerts whose status changed."""
    changed: list[Alert] = []
    active = {c.fingerprint: c for c in conditions}
    for fp, cond in active.items():
        url = generator_url(cfg, cond)
        alert = state.alerts.get(fp)
        if alert is None or alert.status == AlertStatus.RESOLVED:
            alert = Alert(
                fingerprint=fp,
                labels=cond.all_labels(),
                annotations=_annotations(cond, url),
                status=AlertStatus.PENDING,
                for_s=cond.for_s,
                active_since=now,
                last_seen=now,
                generator_url=url,
            )
            state.alerts[fp] = alert
            changed.append(alert)
        else:
            alert.annotations, alert.last_seen = _annotations(cond, url), now  # the newest evidence wins
        if alert.status == AlertStatus.PENDING and now - alert.active_since >= alert.for_s:
            alert.status, alert.fired_at = AlertStatus.FIRING, now
            if alert not in changed:
                changed.append(alert)
    for fp, alert in list(state.alerts.items()):
        if fp in active:
            continue
        if alert.status == AlertStatus.PENDING:
            del state.alerts[fp]
        elif alert.status == AlertStatus.FIRING:
            alert.status, alert.resolved_at = AlertStatus.RESOLVED, now
            changed.append(alert)
        elif alert.resolved_at is not None and now - alert.resolved_at > cfg.resolved_keep_s:
            del state.alerts[fp]
            for group in state.groups.values():
                group.sent.pop(fp, None)
    for sid, sil in list(state.silences.items()):
        if now - sil.ends_at > cfg.resolved_keep_s:
            del state.silences[sid]
    return changed


def silenced_by(state: AlertState, alert: Alert, now: float) -> list[str]:
    return [s.id for s in state.silences.values() if s.mutes(alert.labels, now)]


def inhibited_by(state: AlertState, alert: Alert, cfg: AlertsConfig) -> list[str]:
    """Fingerprints of firing alerts that inhibit this one."""
    out = []
    for rule in cfg.inhibit_rules:
        if alert.alertname not in rule.targets:
            continue
        for src in state.alerts.values():
            if (
                src.status == AlertStatus.FIRING
                and src.alertname == rule.source
                and src.fingerprint != alert.fingerprint
                and all(src.labels.get(k, "") == alert.labels.get(k, "") for k in rule.equal)
            ):
                out.append(src.fingerprint)
    return out


def muted(state: AlertState, alert: Alert, now: float, cfg: AlertsConfig) -> bool:
    return bool(silenced_by(state, alert, now) or inhibited_by(state, alert, cfg))


def route_receivers(routes: tuple[RouteConfig, ...], labels: dict[str, str]) -> list[str]:
    """Walk the routes in order: the first match wins unless it says `continue`."""
    out: list[str] = []
    severity = labels.get("severity", "info")
    for route in routes:
        if not severity_at_least(severity, route.min_severity):
            continue
        if route.severities and severity not in route.severities:
            continue
        if not matches_all([Matcher.parse(t) for t in route.matchers], labels):
            continue
        out.extend(r for r in route.receivers if r not in out)
        if not route.continue_:
            break
    return out


def notifications(state: AlertState, now: float, cfg: AlertsConfig) -> list[Notification]:
    """What to send at `now`; marks it sent in `state` (enqueue before persisting the state)."""
    members: dict[str, list[Alert]] = {}
    for alert in sorted(state.alerts.values(), key=lambda a: (a.active_since, a.fingerprint)):
        if alert.status == AlertStatus.PENDING:
            continue
        if muted(state, alert, now, cfg):
            alert.muted_firing = alert.muted_firing or alert.status == AlertStatus.FIRING
            continue
        if (
            alert.status == AlertStatus.RESOLVED
            and alert.muted_firing
            and not any(alert.fingerprint in g.sent for g in state.groups.values())
        ):
            continue  # inhibited or silenced while it fired, never sent: one page per incident
        glabels = {k: alert.labels[k] for k in cfg.group_by if k in alert.labels}
        for receiver in route_receivers(cfg.routes, alert.labels):
            gid = f"{receiver}|{dumps(glabels)}"
            group = state.groups.get(gid)
            if group is None:
                # A resolved alert may open a group: one that fired and cleared within group_wait
                # (a hang restarted in seconds) is still news, sent once as resolved.
                group = GroupState(
                    receiver=receiver, group_key=dumps(glabels), labels=glabels, first_seen=now
                )
                state.groups[gid] = group
            members.setdefault(gid, []).append(alert)
    out: list[Notification] = []
    for gid, group in list(state.groups.items()):
        send_resolved = cfg.receiver(group.receiver).send_resolved
        batch = [
            a
            for a in members.get(gid, [])
            if a.status == AlertStatus.FIRING or group.sent.get(a.fingerprint) != AlertStatus.RESOLVED
        ]
        changed = [a for a in batch if group.sent.get(a.fingerprint) != a.status]
        firing = [a for a in batch if a.status == AlertStatus.FIRING]
        if not send_resolved and not firing:
            changed = []
        due = (
            (group.last_sent is None and changed and now - group.first_seen >= cfg.group_wait_s)
            or (group.last_sent is not None and changed and now - group.last_sent >= cfg.group_interval_s)
            or (group.last_sent is not None and firing and now - group.last_sent >= cfg.repeat_interval_s)
        )
        if due:
            shown = batch if send_resolved else firing
            group.seq += 1
            out.append(
                Notification(
                    key=f"{gid}|{group.seq}",
                    receiver=group.receiver,
                    group_key=group.group_key,
                    group_labels=group.labels,
                    status=AlertStatus.FIRING if firing else AlertStatus.RESOLVED,
                    alerts=[a.model_copy(deep=True) for a in shown],
                    external_url=cfg.dashboard_url,
                    created_at=now,
                )
            )
            group.last_sent = now
            for a in batch:
                group.sent[a.fingerprint] = a.status  # resolved ones stay until the alert is forgotten
        if not group.sent and not batch:
            del state.groups[gid]
    return out


def alert_views(state: AlertState, now: float, cfg: AlertsConfig) -> list[dict[str, object]]:
    """The alerts for the API and the dashboard: each with what mutes it."""
    out = []
    for a in sorted(state.alerts.values(), key=lambda a: (-a.active_since, a.fingerprint)):
        row = a.model_dump(mode="json")
        row["silenced_by"] = silenced_by(state, a, now)
        row["inhibited_by"] = inhibited_by(state, a, cfg)
        out.append(row)
    return out


def counts(state: AlertState) -> dict[tuple[str, str], int]:
    """(alertname, state) -> number, for `milepost_alerts{alertname,state}`."""
    out: dict[tuple[str, str], int] = {}
    for a in state.alerts.values():
        key = (a.alertname, str(a.status))
        out[key] = out.get(key, 0) + 1
    return out
