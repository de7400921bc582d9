"""``milepost grafana push|render``: milepost's dashboards, datasource and alert rules into Grafana.

milepost grafana push --url URL --token-env VAR [--folder NAME] [--prometheus-url URL]
                      [--rules deploy/prometheus/milepost-rules.yml] [--dry-run]
    through grafana-client (Grafana's HTTP API): the folder, the Prometheus datasource
    (uid milepost-prometheus), the five dashboards and the alert rules as Grafana-managed
    rules (alerting provisioning API; see ``daemon.grafana_alerts``). Idempotent: each object
    is read first and written only when it differs, so a second push changes nothing and
    says so. ``--dry-run`` reads and prints the plan without writing.
milepost grafana render [--out deploy/grafana] [--rules FILE] [--prometheus-url URL]
    writes the committed files: dashboards/*.json and provisioning/{datasources,dashboards,alerting}/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from milepost.engine.contract.cli import command_parser, run_command

from . import grafana_alerts as ga
from .grafana_dashboards import render

DEFAULT_PROMETHEUS = "http://prometheus:9090"
DEFAULT_OUT = Path("deploy/grafana")
# Fields Grafana adds or bumps on its own: not ours to compare.
_VOLATILE = {"id", "version", "updated", "provenance", "orgID", "orgId"}


@dataclass(frozen=True)
class Action:
    kind: str  # folder, datasource, dashboard, alert-rule, rule-group
    name: str
    op: str  # create, update, unchanged

    def line(self) -> str:
        return f"{self.op:9} {self.kind:10} {self.name}"


@dataclass(frozen=True)
class Desired:
    """Everything a push makes: built from the generator and the rules file, never from Grafana."""

    folder_title: str
    datasource: dict[str, Any]
    dashboards: dict[str, dict[str, Any]]
    rules: list[dict[str, Any]]
    intervals: dict[str, str]


def desired(folder: str, prometheus_url: str, rules_file: Path | None) -> Desired:
    groups = ga.load_rules(rules_file) if rules_file is not None else []
    boards = {name: json.loads(text) for name, text in render().items()}
    return Desired(
        folder_title=folder,
        datasource=ga.datasource(prometheus_url),
        dashboards={d["uid"]: d for d in boards.values()},
        rules=ga.grafana_rules(groups),
        intervals=ga.group_intervals(groups),
    )


def _contains(have: Any, want: Any) -> bool:
    """True when ``have`` holds all of ``want``: fields Grafana adds on its own (defaults) do not count."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(_contains(have.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(map(_contains, have, want))
    return bool(have == want)


def _same(have: dict[str, Any], want: dict[str, Any]) -> bool:
    """True when ``have`` holds every field of ``want`` (volatile ones aside)."""
    return all(_contains(have.get(k), v) for k, v in want.items() if k not in _VOLATILE)


class Pusher:
    """Reads each object from Grafana, then creates or updates it unless ``dry_run``."""

    def __init__(self, api: Any, want: Desired, *, dry_run: bool) -> None:
        self.api, self.want, self.dry_run = api, want, dry_run
        self.actions: list[Action] = []

    def _get(self, fn: Any, *args: Any) -> dict[str, Any] | None:
        from grafana_client.client import GrafanaClientError, GrafanaUnauthorizedError

        try:
            return dict(fn(*args))
        except GrafanaUnauthorizedError:
            raise
        except GrafanaClientError as e:
            if e.status_code == 404:
                return None
            raise

    def _do(self, kind: str, name: str, have: Any, same: bool, write: Any) -> None:
        op = "create" if have is None else ("unchanged" if same else "update")
        self.actions.append(Action(kind, name, op))
        if op != "unchanged" and not self.dry_run:
            write(op)

    def run(self) -> list[Action]:
        self.folder()
        self.datasource()
        for uid in self.want.dashboards:
            self.dashboard(uid)
        for rule in self.want.rules:
            self.rule(rule)
        for group, interval in self.want.intervals.items():
            if any(r["ruleGroup"] == group for r in self.want.rules):
                self.group(group, interval)
        return self.actions

    def folder(self) -> None:
        f = self.api.folder
        have = self._get(f.get_folder, ga.FOLDER_UID)
        title = self.want.folder_title
        self._do(
            "folder",
            title,
            have,
            have is not None and have.get("title") == title,
            lambda op: (
                f.create_folder(title, uid=ga.FOLDER_UID)
                if op == "create"
                else f.update_folder(ga.FOLDER_UID, title=title, overwrite=True)
            ),
        )

    def datasource(self) -> None:
        ds, want = self.api.datasource, self.want.datasource
        have = self._get(ds.get_datasource_by_uid, want["uid"])
        self._do(
            "datasource",
            want["name"],
            have,
            have is not None and _same(have, want),
            lambda op: (
                ds.create_datasource(want)
                if op == "create"
                else ds.update_datasource_by_uid(want["uid"], want)
            ),
        )

    def dashboard(self, uid: str) -> None:
        want = self.want.dashboards[uid]
        have = self._get(self.api.dashboard.get_dashboard, uid)
        same = (
            have is not None
            and _same(dict(have.get("dashboard") or {}), want)
            and (have.get("meta") or {}).get("folderUid") == ga.FOLDER_UID
        )
        body = {
            "dashboard": want,
            "folderUid": ga.FOLDER_UID,
            "overwrite": True,
            "message": "milepost grafana push",
        }
        self._do("dashboard", want["title"], have, same, lambda op: self.api.dashboard.update_dashboard(body))

    def rule(self, want: dict[str, Any]) -> None:
        ap = self.api.alertingprovisioning
        have = self._get(ap.get_alertrule, want["uid"])
        self._do(
            "alert-rule",
            want["title"],
            have,
            have is not None and _same(have, want),
            lambda op: (
                ap.create_alertrule(want) if op == "create" else ap.update_alertrule(want["uid"], want)
            ),
        )

    def group(self, group: str, interval: str) -> None:
        ap = self.api.alertingprovisioning
        seconds = ga.duration_ms(interval) // 1000
        if self.dry_run and any(a.kind == "alert-rule" and a.op == "create" for a in self.actions):
            have: dict[str, Any] | None = None  # the group comes with its first rule
        else:
            have = self._get(ap.get_rule_group, ga.FOLDER_UID, group)
        same = have is not None and int(have.get("interval", 0)) == seconds

        def write(op: str) -> None:
            body = dict(have or {"title": group, "folderUid": ga.FOLDER_UID, "rules": []})
            body["interval"] = seconds
            ap.update_rule_group(ga.FOLDER_UID, group, body)

        self._do("rule-group", f"{group} (every {interval})", have, same, write)


def _connect(url: str, token: str) -> Any:
    from grafana_client import GrafanaApi

    return GrafanaApi.from_url(url, credential=token, timeout=10.0)


def _cmd_push(args: argparse.Namespace) -> int:
    from grafana_client.client import GrafanaException, GrafanaUnauthorizedError

    token = os.environ.get(args.token_env, "")
    if not token:
        print(
            f"milepost grafana push: --token-env={args.token_env!r}: that variable is empty or unset",
            file=sys.stderr,
        )
        return 2
    rules = Path(args.rules) if args.rules else None
    if rules is not None and not rules.exists():
        if args.rules != str(ga.RULES_FILE):
            print(f"milepost grafana push: --rules={args.rules!r}: no such file", file=sys.stderr)
            return 2
        print(f"milepost grafana push: {rules} not found: pushing no alert rules")
        rules = None
    try:
        want = desired(args.folder, args.prometheus_url, rules)
    except ga.RulesError as e:
        print(f"milepost grafana push: {e}", file=sys.stderr)
        return 2
    try:
        actions = Pusher(_connect(args.url, token), want, dry_run=args.dry_run).run()
    except GrafanaUnauthorizedError:
        print(
            f"milepost grafana push: {args.url} refused the token in ${args.token_env} (401 Unauthorized): "
            "give a service-account token with the Editor role (Admin for the datasource)",
            file=sys.stderr,
        )
        return 1
    except GrafanaException as e:
        print(f"milepost grafana push: {args.url}: {e}", file=sys.stderr)
        return 1
    print("plan (dry run, nothing written):" if args.dry_run else f"pushed to {args.url}:")
    for a in actions:
        print("  " + a.line())
    changed = sum(a.op != "unchanged" for a in actions)
    if changed == 0:
        print("no changes: Grafana already has all of it")
    else:
        verb = "would change" if args.dry_run else "changed"
        print(f"{verb} {changed} of {len(actions)} objects")
    return 0


def write_files(
    out: Path, prometheus_url: str, rules: Path | None, folder: str = ga.FOLDER_TITLE
) -> list[Path]:
    """The committed tree under ``out``: dashboards/*.json and provisioning/*/ YAML."""
    files: dict[Path, str] = {out / "dashboards" / name: text for name, text in render().items()}
    prov = out / "provisioning"
    gen = "generated by `milepost grafana render`; do not edit"
    files[prov / "datasources" / "milepost.yaml"] = ga.to_yaml(
        ga.datasource_provisioning(prometheus_url), gen
    )
    files[prov / "dashboards" / "milepost.yaml"] = ga.to_yaml(ga.dashboard_provisioning(folder), gen)
    if rules is not None:
        doc = ga.alerting_provisioning(ga.load_rules(rules), folder)
        files[prov / "alerting" / "milepost-alerts.yaml"] = ga.to_yaml(doc, f"{gen}; from {rules.name}")
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return sorted(files)


def _cmd_render(args: argparse.Namespace) -> int:
    rules = Path(args.rules)
    try:
        paths = write_files(Path(args.out), args.prometheus_url, rules if rules.exists() else None)
    except ga.RulesError as e:
        print(f"milepost grafana render: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    if not rules.exists():
        print(f"({rules} not found: no alerting provisioning file written)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p, sub = command_parser()
    g = sub.add_parser("grafana", help="Grafana dashboards, datasource and alert rules").add_subparsers(
        dest="grafana_cmd", required=True
    )
    push = g.add_parser("push", help="create or update them in a Grafana through its HTTP API")
    push.add_argument("--url", required=True, help="Grafana's base URL, e.g. https://grafana.example.com")
    push.add_argument(
        "--token-env", required=True, help="environment variable holding a service-account token"
    )
    push.add_argument("--folder", default=ga.FOLDER_TITLE, help="folder title (uid milepost)")
    push.add_argument(
        "--prometheus-url", default=DEFAULT_PROMETHEUS, help="the datasource's URL, as Grafana sees it"
    )
    push.add_argument("--rules", default=str(ga.RULES_FILE), help="Prometheus rules file to take alerts from")
    push.add_argument("--dry-run", action="store_true", help="print the plan; write nothing")
    push.set_defaults(func=_cmd_push)
    r = g.add_parser("render", help="write the dashboards' JSON and the provisioning files")
    r.add_argument("--out", default=str(DEFAULT_OUT))
    r.add_argument("--rules", default=str(ga.RULES_FILE))
    r.add_argument("--prometheus-url", default=DEFAULT_PROMETHEUS)
    r.set_defaults(func=_cmd_render)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser(), argv)
