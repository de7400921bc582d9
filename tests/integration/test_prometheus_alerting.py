"""Alerting from Prometheus: a real Prometheus and a real Alertmanager page an injected hang.

A real daemon runs the default CPU job (examples/tiny-grpo-cpu.toml: two FSDP2 gloo trainer
ranks and a rollout worker on a loopback Ray cluster). Prometheus (Debian's ``prometheus``)
scrapes it every second with deploy/prometheus/milepost-rules.yml loaded as they are, and
sends its alerts to Alertmanager (Debian's ``prometheus-alertmanager``), configured from
deploy/prometheus/alertmanager.yml with its webhook pointed at a receiver inside this test.
Both configs are the deploy examples with only addresses and intervals changed.

A hang injected into trainer 1 (the faults API, as ``milepost inject --kind hang``) must reach
the receiver as CollectiveHang firing, with the daemon's diagnosis in its labels, and later as
resolved once the next attempt launches. CollectiveHang has no ``for`` in the rules,
so no rule is rewritten with shorter durations for this test. The job's restart backoff is 4 s:
the hang stays open (milepost_collective_hang_open 1) for several 1 s scrapes.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import DaemonRun
from tests.servers import start_prometheus_binary
from tests.unit.test_alerts_receivers import Capture, capture_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "prometheus"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


def wait(what: str, pred: Callable[[], Any], timeout: float, diag: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError, IndexError, OSError):
            if value := pred():
                return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}. {diag()}")


def _job() -> dict[str, Any]:
    doc = tomllib.loads((ROOT / "examples" / "tiny-grpo-cpu.toml").read_text())
    doc["run"]["steps"] = 2000  # outlives the test; cleanup stops it
    # No warm standby (a second Ray cluster on a 2-core machine); a 4 s backoff holds the hang open.
    doc["supervisor"] = {
        **doc["supervisor"],
        "standby": False,
        "backoff_initial_s": 4.0,
        "backoff_max_s": 4.0,
    }
    return doc


@contextlib.contextmanager
def _binary(binary: str, config: Path, storage: str, *extra: str, log: Path) -> Iterator[str]:
    with log.open("wb") as out:
        proc, url = start_prometheus_binary(binary, config, storage, *extra, log=out)
        try:
            # Wide: a loaded machine starts them slowly.
            wait(
                f"{Path(binary).name} ready",
                lambda: proc.poll() is None and httpx.get(f"{url}/-/ready", timeout=1).status_code == 200,
                60,
                lambda: f"exit {proc.poll()}; log: {log.read_text()[-2000:]}",
            )
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _alertmanager_config(tmp: Path, hook: str) -> Path:
    conf = yaml.safe_load((DEPLOY / "alertmanager.yml").read_text())
    conf["route"].update(group_wait="0s", group_interval="1s")
    for receiver in conf["receivers"]:
        for webhook in receiver["webhook_configs"]:
            webhook["url"] = hook
    path = tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(conf))
    return path


def _prometheus_config(tmp: Path, daemon: str, alertmanager: str) -> Path:
    conf = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    conf["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    conf["rule_files"] = [str(DEPLOY / "milepost-rules.yml")]
    (scrape,) = conf["scrape_configs"]
    scrape["static_configs"] = [{"targets": [daemon.removeprefix("http://")]}]
    (am,) = conf["alerting"]["alertmanagers"]
    am["static_configs"] = [{"targets": [alertmanager.removeprefix("http://")]}]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(conf))
    return path


def _notifications(cap: Capture, alertname: str) -> list[dict[str, Any]]:
    """The webhook bodies of ``alertname``'s group, in the order they arrived."""
    return [b for b in cap.bodies() if b.get("groupLabels", {}).get("alertname") == alertname]


def test_an_injected_hang_pages_through_prometheus_and_alertmanager_then_resolves(tmp_path: Path) -> None:
    if PROMETHEUS is None or ALERTMANAGER is None:
        pytest.skip("prometheus or alertmanager missing: apt-get install prometheus prometheus-alertmanager")
    run = DaemonRun(tmp_path, _job())
    with contextlib.ExitStack() as stack:
        cap = stack.enter_context(capture_server())
        stack.callback(run.cleanup)
        client = run.start()
        am = stack.enter_context(
            _binary(
                ALERTMANAGER,
                _alertmanager_config(tmp_path, f"{cap.url}/alerts"),
                f"--storage.path={tmp_path / 'am-data'}",
                "--cluster.listen-address=",
                log=tmp_path / "alertmanager.log",
            )
        )
        prom = stack.enter_context(
            _binary(
                PROMETHEUS,
                _prometheus_config(tmp_path, client.url, am),
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                log=tmp_path / "prometheus.log",
            )
        )

        def promql(query: str) -> list[dict[str, Any]]:
            r = httpx.get(f"{prom}/api/v1/query", params={"query": query}, timeout=5)
            r.raise_for_status()
            return list(r.json()["data"]["result"])

        def diag() -> str:
            return (
                f"hang_open {promql('milepost_collective_hang_open')}; "
                f"alerts {httpx.get(f'{prom}/api/v1/alerts', timeout=5).json()['data']['alerts']}; "
                f"webhook {cap.bodies()}; prometheus log {(tmp_path / 'prometheus.log').read_text()[-1500:]}"
            )

        run_id = wait("the run id", lambda: client.status()["run_id"], 30)
        groups = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
        loaded = {r["name"] for g in groups for r in g["rules"]}
        assert {"CollectiveHang", "run_id:milepost_goodput:ratio_rate5m"} <= loaded
        # Witness: Prometheus scrapes training steps (the ranks are past their first collectives).
        wait(
            "Prometheus to scrape steps of the run",
            lambda: promql(f'milepost_steps_total{{run_id="{run_id}"}} >= 1'),
            240,  # wide: on a loaded machine Ray's start can time out once and the attempt restarts
            diag,
        )
        assert not _notifications(cap, "CollectiveHang")
        client.inject("hang", role="trainer", rank=1)

        firing = wait(
            "CollectiveHang firing at the webhook",
            lambda: [b for b in _notifications(cap, "CollectiveHang") if b["status"] == "firing"],
            120,
            diag,
        )
        (hang,) = run.wait("the hang diagnosis", lambda: run.events("collective_hang"), 30)
        # The hang closes when the next attempt launches; from then on the last word must be resolved.
        run.wait(
            "the next attempt",
            lambda: [e for e in run.events("attempt_launched") if e["attempt"] == hang["attempt"] + 1],
            120,
        )
        bodies = wait(
            "CollectiveHang resolved at the webhook",
            lambda: (b := _notifications(cap, "CollectiveHang")) and b[-1]["status"] == "resolved" and b,
            60,
            diag,
        )

    # Paged, then resolved. Exactly one of each unless a scrape failed on a loaded machine (a failed
    # scrape makes the series stale, which resolves the alert until the next scrape fires it again).
    statuses = [b["status"] for b in bodies]
    assert statuses[0] == "firing" and statuses[-1] == "resolved", statuses
    body = firing[0]
    assert body["version"] == "4" and body["receiver"] == "milepost-webhook"
    (alert,) = body["alerts"]
    data = hang["data"]
    assert alert["labels"] == {
        "alertname": "CollectiveHang",
        "severity": "critical",
        "run_id": run_id,
        "attempt": str(hang["attempt"]),
        "op": data["op"],
        "group": data["group"],
    }
    notes = alert["annotations"]
    assert notes["summary"] == (
        f"Run {run_id}: collective {data['op']} in group {data['group']} hangs (attempt {hang['attempt']})"
    )
    assert notes["dashboard"] == f"http://127.0.0.1:8501/incidents?run={run_id}&alert=CollectiveHang"
    assert notes["action"].startswith("Open the incident")
    for b in bodies:
        assert [a["labels"] for a in b["alerts"]] == [alert["labels"]], b
    (gone,) = bodies[-1]["alerts"]
    assert gone["status"] == "resolved" and gone["endsAt"] > gone["startsAt"]
