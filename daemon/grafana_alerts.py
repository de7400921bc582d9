"""Grafana-managed alert rules made from milepost's Prometheus rules file, and Grafana's provisioning files.

The alerting rules of ``deploy/prometheus/milepost-rules.yml`` (Prometheus' rule-group format)
become Grafana-managed rules, one per alert, with the same group, ``for``, labels and
annotations. A Prometheus alert fires for every series its expression returns, whatever the
value (``x == 0`` returns 0); Grafana fires on a threshold, so query A is the expression
mapped to 1 per series (``(EXPR) * 0 + 1``), B reduces it to its last value and C fires when
B > 0. No data is OK (no series, no alert), as in Prometheus. Recording rules stay in
Prometheus: the dashboards use raw families only. The same rules serve both paths: the
alerting provisioning file (``deploy/grafana/provisioning/alerting/``) and the HTTP push
(``milepost grafana push``, through Grafana's alerting provisioning API).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from .grafana_dashboards import DATASOURCE_UID

RULES_FILE = Path("deploy/prometheus/milepost-rules.yml")
FOLDER_TITLE = "milepost"
FOLDER_UID = "milepost"
ORG_ID = 1
_DURATION = re.compile(r"^([0-9]+(ms|s|m|h|d|w|y))+$")


class RulesError(ValueError):
    """The rules file cannot be used: names the file, the rule and the field."""


def load_rules(path: Path) -> list[dict[str, Any]]:
    """The rule groups of a Prometheus rules file, checked for the fields used here."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RulesError(f"rules file {str(path)!r}: cannot be read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise RulesError(f"rules file {str(path)!r}: not valid YAML: {e}") from None
    groups = doc.get("groups") if isinstance(doc, dict) else None
    if not isinstance(groups, list):
        raise RulesError(f"rules file {str(path)!r}: groups={groups!r}: expected a list of rule groups")
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or not g.get("name") or not isinstance(g.get("rules"), list):
            raise RulesError(f"rules file {str(path)!r}: groups[{i}]: needs a name and a list of rules")
        for j, r in enumerate(g["rules"]):
            where = f"rules file {str(path)!r}: groups[{i}].rules[{j}]"
            if not isinstance(r, dict) or not isinstance(r.get("expr"), str | int | float):
                raise RulesError(f"{where}: expr={r.get('expr') if isinstance(r, dict) else r!r}: required")
            if "for" in r and not _DURATION.match(str(r["for"])):
                raise RulesError(f"{where}.for={r['for']!r}: not a Prometheus duration")
    return groups


_UNITS_MS = {
    "y": 31_536_000_000,
    "w": 604_800_000,
    "d": 86_400_000,
    "h": 3_600_000,
    "m": 60_000,
    "s": 1000,
    "ms": 1,
}


def duration_ms(text: str) -> int:
    """A Prometheus duration (``1h30m``, ``90s``) in milliseconds."""
    return sum(int(n) * _UNITS_MS[u] for n, u in re.findall(r"([0-9]+)(ms|[ywdhms])", text))


def prom_duration(text: str) -> str:
    """The canonical spelling Grafana answers with (Prometheus' model.Duration): ``90s`` -> ``1m30s``,
    so that a second push compares equal."""
    ms = duration_ms(text)
    if ms == 0:
        return "0s"
    out = ""
    for unit, mult in _UNITS_MS.items():
        if unit in ("y", "w") and ms % mult:
            continue  # years and weeks only when exact
        if ms >= mult:
            out += f"{ms // mult}{unit}"
            ms %= mult
    return out


def rule_uid(group: str, alert: str) -> str:
    """A stable uid (Grafana allows 40 characters): the alert's name, then a hash of group and name."""
    digest = hashlib.sha1(f"{group}/{alert}".encode()).hexdigest()[:8]
    return f"mp-{re.sub(r'[^a-zA-Z0-9_-]', '', alert)[:28]}-{digest}"


def _data(expr: str) -> list[dict[str, Any]]:
    return [
        {
            "refId": "A",
            "relativeTimeRange": {"from": 600, "to": 0},
            "datasourceUid": DATASOURCE_UID,
            "model": {"refId": "A", "expr": f"({expr.strip()}) * 0 + 1", "instant": True, "range": False},
        },
        {
            "refId": "B",
            "relativeTimeRange": {"from": 0, "to": 0},
            "datasourceUid": "__expr__",
            "model": {"refId": "B", "type": "reduce", "expression": "A", "reducer": "last"},
        },
        {
            "refId": "C",
            "relativeTimeRange": {"from": 0, "to": 0},
            "datasourceUid": "__expr__",
            "model": {
                "refId": "C",
                "type": "threshold",
                "expression": "B",
                "conditions": [{"evaluator": {"type": "gt", "params": [0]}}],
            },
        },
    ]


def grafana_rules(groups: list[dict[str, Any]], folder_uid: str = FOLDER_UID) -> list[dict[str, Any]]:
    """Each alerting rule as the body of Grafana's ``POST /api/v1/provisioning/alert-rules``."""
    out = []
    for g in groups:
        for r in g["rules"]:
            if "alert" not in r:
                continue  # a recording rule: Prometheus keeps it
            out.append(
                {
                    "uid": rule_uid(g["name"], str(r["alert"])),
                    "orgID": ORG_ID,
                    "folderUID": folder_uid,
                    "ruleGroup": str(g["name"]),
                    "title": str(r["alert"]),
                    "condition": "C",
                    "data": _data(str(r["expr"])),
                    "noDataState": "OK",
                    "execErrState": "Error",
                    "for": prom_duration(str(r.get("for", "0s"))),
                    "labels": {str(k): str(v) for k, v in (r.get("labels") or {}).items()},
                    "annotations": {str(k): str(v) for k, v in (r.get("annotations") or {}).items()},
                    "isPaused": False,
                }
            )
    return out


def group_intervals(groups: list[dict[str, Any]]) -> dict[str, str]:
    """Each group's evaluation interval (Grafana's default 1m where the file gives none)."""
    return {str(g["name"]): str(g.get("interval", "1m")) for g in groups}


def alerting_provisioning(groups: list[dict[str, Any]], folder: str = FOLDER_TITLE) -> dict[str, Any]:
    """Grafana's alerting provisioning file (``apiVersion: 1``, ``groups``) for the same rules."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for rule in grafana_rules(groups):
        keep = ("uid", "title", "condition", "data", "noDataState", "execErrState", "for")
        item = {k: rule[k] for k in keep} | {"labels": rule["labels"], "annotations": rule["annotations"]}
        by_group.setdefault(rule["ruleGroup"], []).append(item)
    intervals = group_intervals(groups)
    return {
        "apiVersion": 1,
        "groups": [
            {"orgId": ORG_ID, "name": name, "folder": folder, "interval": intervals[name], "rules": rules}
            for name, rules in by_group.items()
        ],
    }


def datasource(url: str) -> dict[str, Any]:
    """The Prometheus datasource the dashboards and rules name (``uid`` milepost-prometheus)."""
    return {
        "uid": DATASOURCE_UID,
        "name": "milepost Prometheus",
        "type": "prometheus",
        "access": "proxy",
        "url": url,
        "isDefault": False,
        "jsonData": {"httpMethod": "POST", "timeInterval": "15s"},
    }


def datasource_provisioning(url: str) -> dict[str, Any]:
    ds = datasource(url)
    return {"apiVersion": 1, "datasources": [{**ds, "orgId": ORG_ID, "editable": False}]}


def dashboard_provisioning(folder: str = FOLDER_TITLE) -> dict[str, Any]:
    """The file provider: Grafana reads the dashboards' JSON from the mounted directory."""
    return {
        "apiVersion": 1,
        "providers": [
            {
                "name": "milepost",
                "orgId": ORG_ID,
                "folder": folder,
                "folderUid": FOLDER_UID,
                "type": "file",
                "disableDeletion": False,
                "allowUiUpdates": False,
                "updateIntervalSeconds": 30,
                "options": {
                    "path": "/var/lib/grafana/dashboards/milepost",
                    "foldersFromFilesStructure": False,
                },
            }
        ],
    }


def to_yaml(doc: dict[str, Any], header: str) -> str:
    return f"# {header}\n" + yaml.safe_dump(doc, sort_keys=False, width=100)
