"""Grafana as code: the committed dashboards match the generator and the SDK's own model, and
``milepost grafana push`` against a fake of Grafana's HTTP API (no Grafana server installs here).

``FakeGrafana`` is a fake: a small HTTP server on 127.0.0.1 that keeps folders, datasources,
dashboards, alert rules and rule groups in memory, answers the routes grafana-client calls the
way Grafana does (404 for an unknown uid, 401 for a wrong bearer token) and records every
request, so the tests check what was sent, that a second push sends no write, and the error
on a bad token.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm
from milepost.daemon import grafana_alerts as ga
from milepost.daemon import grafana_push
from milepost.daemon.cli import main as cli_main
from milepost.daemon.grafana_dashboards import DATASOURCE_UID, queries, render

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
FIXTURE_RULES = Path(__file__).parent / "data" / "prom-rules-fixture.yml"
TOKEN = "glsa_test-token"
register_default_plugins()  # panel options and queries parse into their plugins' own types


def _rules_file() -> Path:
    """The real rules file once deploy/prometheus has it, else a fixture in the same format."""
    real = ROOT / ga.RULES_FILE
    return real if real.exists() else FIXTURE_RULES


# -- the committed files ----------------------------------------------------------------
def test_committed_dashboards_are_in_sync_with_the_generator() -> None:
    want = render()
    have = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert sorted(have) == sorted(want), "run `milepost grafana render`"
    for name, text in want.items():
        assert have[name] == text, f"{name} differs from the generator: run `milepost grafana render`"


def test_committed_provisioning_is_in_sync(tmp_path: Path) -> None:
    real = ROOT / ga.RULES_FILE
    written = grafana_push.write_files(
        tmp_path, grafana_push.DEFAULT_PROMETHEUS, real if real.exists() else None
    )
    for path in written:
        committed = GRAFANA / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} missing: run `milepost grafana render`"
        assert committed.read_text() == path.read_text(), (
            f"{committed} differs: run `milepost grafana render`"
        )
    prov = yaml.safe_load((GRAFANA / "provisioning/datasources/milepost.yaml").read_text())
    assert prov["datasources"][0]["uid"] == DATASOURCE_UID
    boards = yaml.safe_load((GRAFANA / "provisioning/dashboards/milepost.yaml").read_text())
    assert boards["providers"][0]["type"] == "file"


@pytest.mark.parametrize("name", sorted(render()))
def test_dashboard_round_trips_through_the_sdk_model(name: str) -> None:
    """The JSON parses into the SDK's Dashboard model and serialises back unchanged; every panel's
    options parse as its plugin's options type and every target as a Prometheus query."""
    doc = json.loads((GRAFANA / "dashboards" / name).read_text())
    model = dm.Dashboard.from_json(doc)
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == doc
    uid_ok = model.uid is not None and model.uid.startswith("milepost-")
    assert uid_ok and model.title
    variables = model.templating.list_val or []
    assert [v.name for v in variables] == ["run_id"], "each dashboard has the run_id variable"
    panels = [p for p in model.panels or [] if isinstance(p, dm.Panel)]
    assert len(panels) >= 5
    ids = [p["id"] for p in doc["panels"]]
    assert len(set(ids)) == len(ids), "panel ids are unique"
    for p in panels:
        assert p.type_val in ("timeseries", "stat", "state-timeline")
        assert type(p.options).__module__.startswith("grafana_foundation_sdk.models."), (p.title, p.options)
        assert p.targets, p.title
        for q in p.targets:
            assert isinstance(q, pm.Dataquery), (p.title, type(q))
            assert q.expr and '$run_id"' in q.expr, (p.title, q.expr)


def test_every_query_names_only_exported_families() -> None:
    from tests.integration.test_deploy_live import EXPORTED, families

    for name, text in render().items():
        for title, expr in queries(json.loads(text)):
            unknown = families(expr) - EXPORTED
            assert not unknown, f"{name} / {title}: {sorted(unknown)} are not exported by the daemon"


# -- alert rules from the Prometheus rules file --------------------------------------------
def test_alert_rules_follow_the_prometheus_rules() -> None:
    groups = ga.load_rules(_rules_file())
    alerts = [(g["name"], r) for g in groups for r in g["rules"] if "alert" in r]
    rules = ga.grafana_rules(groups)
    assert [r["title"] for r in rules] == [r["alert"] for _, r in alerts]
    for rule, (group, src) in zip(rules, alerts, strict=True):
        assert rule["ruleGroup"] == group and rule["folderUID"] == ga.FOLDER_UID
        assert rule["for"] == ga.prom_duration(src.get("for", "0s")) and rule["labels"] == src.get(
            "labels", {}
        )
        a, _, c = rule["data"]
        assert a["datasourceUid"] == DATASOURCE_UID and src["expr"].strip() in a["model"]["expr"]
        assert rule["condition"] == c["refId"] == "C" and len(rule["uid"]) <= 40
    prov = ga.alerting_provisioning(groups)
    assert sum(len(g["rules"]) for g in prov["groups"]) == len(rules)


@pytest.mark.parametrize(
    ("given", "canonical"), [("0s", "0s"), ("90s", "1m30s"), ("5m", "5m"), ("1h30m", "1h30m"), ("14d", "2w")]
)
def test_for_is_spelled_as_grafana_answers(given: str, canonical: str) -> None:
    """Grafana answers ``for`` in Prometheus' canonical form: compared as sent, 90s would differ forever."""
    assert ga.prom_duration(given) == canonical


def test_a_bad_rules_file_names_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "r.yml"
    bad.write_text(
        "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up\n        for: soon\n"
    )
    with pytest.raises(ga.RulesError, match=r"groups\[0\]\.rules\[0\]\.for='soon'"):
        ga.load_rules(bad)


# -- push against a fake Grafana -----------------------------------------------------------
class FakeGrafana:
    """A fake of Grafana's HTTP API: the routes grafana-client uses for a push, in memory."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.requests: list[tuple[str, str, Any]] = []
        self.folders: dict[str, dict[str, Any]] = {}
        self.datasources: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.rules: dict[str, dict[str, Any]] = {}
        self.groups: dict[tuple[str, str], int] = {}

    def writes(self) -> list[tuple[str, str, Any]]:
        return [r for r in self.requests if r[0] != "GET"]

    def handle(self, method: str, path: str, body: Any, auth: str) -> tuple[int, Any]:
        self.requests.append((method, path, body))
        if auth != f"Bearer {self.token}":
            return 401, {"message": "invalid API key", "messageId": "api-key.invalid"}
        routes: list[tuple[str, str, Any]] = [
            ("GET", r"/api/folders/([^/]+)", lambda m: self._get(self.folders, m[1])),
            ("POST", r"/api/folders", lambda m: self._put(self.folders, body["uid"], body)),
            ("PUT", r"/api/folders/([^/]+)", lambda m: self._put(self.folders, m[1], {**body, "uid": m[1]})),
            ("GET", r"/api/datasources/uid/([^/]+)", lambda m: self._get(self.datasources, m[1])),
            (
                "POST",
                r"/api/datasources",
                lambda m: self._put(self.datasources, body["uid"], {**body, "id": 7}),
            ),
            ("PUT", r"/api/datasources/uid/([^/]+)", lambda m: self._put(self.datasources, m[1], body)),
            ("GET", r"/api/dashboards/uid/([^/]+)", lambda m: self._dashboard(m[1])),
            ("POST", r"/api/dashboards/db", lambda m: self._save_dashboard(body)),
            ("GET", r"/api/v1/provisioning/alert-rules/([^/]+)", lambda m: self._get(self.rules, m[1])),
            ("POST", r"/api/v1/provisioning/alert-rules", lambda m: self._rule(body["uid"], body)),
            ("PUT", r"/api/v1/provisioning/alert-rules/([^/]+)", lambda m: self._rule(m[1], body)),
            (
                "GET",
                r"/api/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)",
                lambda m: self._group(m[1], m[2]),
            ),
            (
                "PUT",
                r"/api/v1/provisioning/folder/([^/]+)/rule-groups/([^/]+)",
                lambda m: self._set_group(m, body),
            ),
        ]
        for verb, pattern, fn in routes:
            if verb == method and (m := re.fullmatch(pattern, path)):
                return fn(m)
        return 404, {"message": "Not found"}

    @staticmethod
    def _get(table: dict[str, Any], uid: str) -> tuple[int, Any]:
        return (200, table[uid]) if uid in table else (404, {"message": f"{uid} not found"})

    @staticmethod
    def _put(table: dict[str, Any], uid: str, body: dict[str, Any]) -> tuple[int, Any]:
        table[uid] = {**body, "version": table.get(uid, {}).get("version", 0) + 1}
        return 200, table[uid]

    def _dashboard(self, uid: str) -> tuple[int, Any]:
        if uid not in self.dashboards:
            return 404, {"message": "Dashboard not found"}
        return 200, self.dashboards[uid]

    def _save_dashboard(self, body: dict[str, Any]) -> tuple[int, Any]:
        d = body["dashboard"]
        version = self.dashboards.get(d["uid"], {}).get("dashboard", {}).get("version", 0) + 1
        self.dashboards[d["uid"]] = {
            "dashboard": {**d, "id": 3, "version": version},
            "meta": {"folderUid": body.get("folderUid"), "provisioned": False},
        }
        return 200, {"status": "success", "uid": d["uid"], "version": version}

    def _rule(self, uid: str, body: dict[str, Any]) -> tuple[int, Any]:
        # Grafana adds fields of its own, inside the queries too: a push must not read them as changes.
        data = [
            {**q, "model": {**q["model"], "intervalMs": 1000, "maxDataPoints": 43200}} for q in body["data"]
        ]
        self.rules[uid] = {
            **body,
            "data": data,
            "id": 11,
            "updated": "2026-12-03T17:00:00Z",
            "provenance": "api",
        }
        self.groups.setdefault((body["folderUID"], body["ruleGroup"]), 60)
        return 201, self.rules[uid]

    def _group(self, folder: str, group: str) -> tuple[int, Any]:
        if (folder, group) not in self.groups:
            return 404, {"message": "rule group not found"}
        rules = [r for r in self.rules.values() if r["ruleGroup"] == group]
        return 200, {
            "title": group,
            "folderUid": folder,
            "interval": self.groups[(folder, group)],
            "rules": rules,
        }

    def _set_group(self, m: re.Match[str], body: dict[str, Any]) -> tuple[int, Any]:
        self.groups[(m[1], m[2])] = int(body["interval"])
        return 200, body


@pytest.fixture
def fake_grafana() -> Iterator[tuple[FakeGrafana, str]]:
    fake = FakeGrafana(TOKEN)

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(n)) if n else None
            status, out = fake.handle(
                self.command, self.path.split("?")[0], body, self.headers.get("Authorization", "")
            )
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _push(url: str, *extra: str, env: str = "GRAFANA_TOKEN") -> int:
    return cli_main(
        ["grafana", "push", "--url", url, "--token-env", env, "--rules", str(_rules_file()), *extra]
    )


def test_push_creates_everything_then_a_second_push_changes_nothing(
    fake_grafana: tuple[FakeGrafana, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, url = fake_grafana
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    n_rules = len(ga.grafana_rules(ga.load_rules(_rules_file())))
    assert _push(url, "--folder", "milepost runs", "--prometheus-url", "http://prom:9090") == 0
    first = capsys.readouterr().out
    writes = fake.writes()
    assert ("POST", "/api/folders", {"title": "milepost runs", "uid": "milepost"}) in writes
    ds = next(b for m, p, b in writes if p == "/api/datasources")
    assert ds["uid"] == DATASOURCE_UID and ds["type"] == "prometheus" and ds["url"] == "http://prom:9090"
    boards = [b for m, p, b in writes if p == "/api/dashboards/db"]
    assert sorted(b["dashboard"]["uid"] for b in boards) == sorted(
        json.loads(t)["uid"] for t in render().values()
    )
    assert all(b["folderUid"] == "milepost" and b["overwrite"] for b in boards)
    rules = [b for m, p, b in writes if p == "/api/v1/provisioning/alert-rules"]
    assert len(rules) == n_rules > 0 and all(r["folderUID"] == "milepost" for r in rules)
    assert all(m == "GET" for m, p, _ in fake.requests if "/alert-rules/" in p), "rules created by POST"
    groups = ga.load_rules(_rules_file())
    with_alerts = {r["ruleGroup"] for r in ga.grafana_rules(groups)}
    not_default = {
        n for n, i in ga.group_intervals(groups).items() if n in with_alerts and i not in ("1m", "60s")
    }
    put = {p.rsplit("/", 1)[-1] for m, p, b in writes if "/rule-groups/" in p}
    assert put == not_default, "each group whose interval is not Grafana's default 1m gets it set"
    assert "create" in first and "no changes" not in first

    fake.requests.clear()
    assert _push(url, "--folder", "milepost runs", "--prometheus-url", "http://prom:9090") == 0
    second = capsys.readouterr().out
    assert fake.writes() == [], f"a second push wrote: {fake.writes()}"
    assert "no changes" in second and "create" not in second and "update " not in second

    # One change: only that object is written, and the output says which.
    fake.requests.clear()
    assert _push(url, "--folder", "milepost runs", "--prometheus-url", "http://prom2:9090") == 0
    assert [(m, p) for m, p, _ in fake.writes()] == [("PUT", f"/api/datasources/uid/{DATASOURCE_UID}")]
    assert "changed 1 of" in capsys.readouterr().out


def test_dry_run_prints_the_plan_and_writes_nothing(
    fake_grafana: tuple[FakeGrafana, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, url = fake_grafana
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    assert _push(url, "--dry-run") == 0
    out = capsys.readouterr().out
    assert fake.writes() == [] and fake.requests, "it reads, never writes"
    assert (
        "dry run" in out and "create    folder" in out and "create    dashboard  milepost / overview" in out
    )


def test_bad_token_is_a_clear_error(
    fake_grafana: tuple[FakeGrafana, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, url = fake_grafana
    monkeypatch.setenv("GRAFANA_TOKEN", "wrong")
    assert _push(url) == 1
    err = capsys.readouterr().err
    assert "refused the token in $GRAFANA_TOKEN (401 Unauthorized)" in err
    assert len(fake.requests) == 1 and fake.writes() == []
    monkeypatch.delenv("GRAFANA_TOKEN")
    assert _push(url) == 2
    assert "--token-env='GRAFANA_TOKEN': that variable is empty or unset" in capsys.readouterr().err
