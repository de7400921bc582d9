"""deploy/prometheus: the rules pass `promtool check rules` and their `promtool test rules` unit
tests, mirror the daemon's alert catalogue (names, severities, `for`, actions, dashboard views),
every rule has tests that fire and that do not, and the example configs are valid.

The promtool tests skip only where promtool is missing (`apt-get install prometheus`); the
catalogue checks need nothing but Python.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from milepost.alerts.catalog import CATALOG
from milepost.alerts.rules import LATCHES
from milepost.engine.contract.config.alerts import default_inhibit_rules

pytestmark = pytest.mark.timeout(60)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULES = DEPLOY / "milepost-rules.yml"
TESTS = sorted((DEPLOY / "tests").glob("*.yml"))
# Alerts whose `for` holds a threshold the daemon's detector holds itself (catalogue `for` 0).
FOR_HOLDS_THRESHOLD = {"WorkerDown": "2m", "NoProgress": "8m", "Straggler": "2m"}
DURATION = re.compile(r"^(\d+)([smh])$")
# The daemon's labels of each alert besides alertname, severity and run (README.md, "Not paging
# twice"): the rules must give the same, with run_id for run, for Alertmanager to merge the two.
DAEMON_LABELS = {
    "CollectiveHang": {"attempt", "group", "op"},
    "Straggler": {"attempt", "role", "rank"},
    "HeartbeatLost": {"attempt", "role", "rank"},
    "WorkerDown": {"attempt", "role", "rank"},
    "AttemptFailed": {"attempt"},
    "NoProgress": {"attempt"},
    "ResumeMismatch": {"attempt"},
    "GpuXid": {"node", "gpu"},
    "GpuEccUncorrected": {"node", "gpu"},
    "GpuOverheat": {"node", "gpu"},
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool missing: apt-get install prometheus")
    return path


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def _seconds(duration: str) -> float:
    m = DURATION.match(duration)
    assert m, f"for: {duration!r} is not a plain duration"
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600}[m.group(2)]


def test_promtool_check_rules() -> None:
    out = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in out.stdout


def test_promtool_test_rules() -> None:
    assert TESTS, f"no promtool tests in {DEPLOY / 'tests'}"
    out = subprocess.run(
        [_promtool(), "test", "rules", *map(str, TESTS)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("SUCCESS") == len(TESTS), out.stdout


def test_promtool_check_example_prometheus_config() -> None:
    out = subprocess.run(
        [_promtool(), "check", "config", str(DEPLOY / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_amtool_check_example_alertmanager_config() -> None:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool missing: apt-get install prometheus-alertmanager")
    out = subprocess.run(
        [amtool, "check-config", str(DEPLOY / "alertmanager.yml")], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_catalogue_alert_is_a_rule_with_its_severity_for_action_and_view() -> None:
    alerts = _alerts()
    assert set(alerts) == set(CATALOG)
    for name, info in CATALOG.items():
        rule = alerts[name]
        assert rule["labels"] == {"severity": str(info.severity)}, name
        notes = rule["annotations"]
        assert set(notes) == {"summary", "description", "action", "dashboard"}, name
        assert notes["action"] == info.action, name
        assert (
            notes["dashboard"]
            == f"http://127.0.0.1:8501/{info.view}?run={{{{ $labels.run_id }}}}&alert={name}"
        )
        got = _seconds(rule["for"]) if "for" in rule else 0.0
        if info.for_s:
            assert got == info.for_s, f"{name}: for {got} s, the catalogue says {info.for_s} s"
        else:
            assert rule.get("for") == FOR_HOLDS_THRESHOLD.get(name), name


def test_every_rule_has_promtool_cases_that_fire_and_that_do_not() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    records: set[str] = set()
    for path in TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../milepost-rules.yml"], path
        for test in doc["tests"]:
            for case in test.get("alert_rule_test", []):
                (fires if case["exp_alerts"] else quiet).add(case["alertname"])
            for case in test.get("promql_expr_test", []):
                records.add(case["expr"])
    alerts = set(_alerts())
    assert alerts - fires == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert {r["record"] for r in _rules() if "record" in r} - records == set(), "recording rules untested"


def test_rules_carry_the_daemon_label_sets_with_run_id_for_run() -> None:
    for spec in LATCHES.values():  # the event-made alerts: the daemon's own latch specs
        assert DAEMON_LABELS.get(spec.alertname, set()) == set(spec.labels), spec.alertname
    seen: set[str] = set()
    for path in TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                for alert in case["exp_alerts"]:
                    name = case["alertname"]
                    want = {"severity", "run_id", *DAEMON_LABELS.get(name, set())}
                    assert set(alert["exp_labels"]) == want, f"{path.name}: {name}"
                    seen.add(name)
    assert seen == set(CATALOG)


def test_alertmanager_example_inhibits_as_the_daemon_does() -> None:
    doc = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    got = set()
    for rule in doc["inhibit_rules"]:
        (source,) = rule["source_matchers"]
        m = re.fullmatch(r'alertname="(\w+)"', source)
        assert m, source
        (target,) = rule["target_matchers"]
        t = re.fullmatch(r'alertname=~?"([\w|]+)"', target)
        assert t, target
        # Each of the daemon's `run` is matched as `run` (pushed by the daemon) and `run_id` (rules).
        equal = tuple(rule["equal"])
        assert equal[:2] == ("run", "run_id"), equal
        got.add((m.group(1), frozenset(t.group(1).split("|")), ("run", *equal[2:])))
    want = {(r.source, frozenset(r.targets), tuple(r.equal)) for r in default_inhibit_rules()}
    assert got == want
