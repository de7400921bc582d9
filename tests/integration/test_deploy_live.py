"""Every Grafana panel's PromQL, and every alert rule's inputs, return data from a real Prometheus
scraping a real run, so the dashboards cannot drift from the metrics.

One daemon (``milepost run``) supervises the default CPU job (examples/tiny-grpo-cpu.toml:
two FSDP2 gloo trainer ranks and a rollout worker on a loopback Ray cluster; checkpoints
every 3 steps and no warm standby, to fit a 2-core machine). A Prometheus server from the
Debian package (``apt-get install prometheus``) scrapes ``/metrics`` every second.

Series that exist only after an event are made to exist, none silently skipped:
- hangs, restarts by cause, recovery time: a ``hang`` fault (SIGSTOP) on trainer 1 via
  ``milepost inject``; the test waits for the verified resume and two more steps.
- the per-GPU NVML families (this machine has no GPU; the daemon's collector exports
  ``milepost_gpu_collector_up 0`` with the reason): ``NEEDS_GPU`` lists them; they are
  covered by a rank report carrying a GPU snapshot of a node named ``gpu-sim``, sent
  through the daemon's real ingest route as a rank's reporter would (attempt 0, so it
  never counts as a live rank). On a GPU machine the daemon's own collector gives them.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from milepost.daemon import grafana_alerts as ga
from milepost.daemon.grafana_dashboards import queries, render
from milepost.engine.contract.routes import INGEST_PATH

from tests.harness import DaemonRun
from tests.servers import start_prometheus_binary

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")
_SUFFIX = re.compile(r"_(total|bucket|sum|count)$")
# Families only a GPU node has (NVML); covered here by the gpu-sim report below.
# Families alert rules read that no fault of this test produces, each with the one it needs.
# None today: the condition gauges the rules read (an open hang, a failed attempt, a resume
# mismatch) are exported at 0 until their condition holds, and the hang fault sets the first.
NEEDS_FAULT: dict[str, str] = {}
NEEDS_GPU = {
    "milepost_gpu_utilization_ratio",
    "milepost_gpu_memory_used_bytes",
    "milepost_gpu_memory_total_bytes",
    "milepost_gpu_power_watts",
    "milepost_gpu_temperature_celsius",
    "milepost_gpu_nvlink_transmit_bytes",
    "milepost_gpu_nvlink_receive_bytes",
    "milepost_gpu_xid_errors",
    "milepost_gpu_ecc_errors",
}


def _exported() -> set[str]:
    """Family names spelled in the daemon's metric modules (the names it registers)."""
    names: set[str] = set()
    for f in (ROOT / "daemon").glob("*.py"):
        if not f.name.startswith("grafana_"):
            names |= set(re.findall(r'"(milepost_[a-z0-9_]+)"', f.read_text()))
    return names


EXPORTED = _exported()


def families(expr: str) -> set[str]:
    """The milepost families a PromQL expression reads (sample suffixes taken off; recorded
    series such as ``run_id:milepost_x:rate5m`` are not families)."""
    return {_SUFFIX.sub("", m) for m in re.findall(r"(?<![:\w])milepost_[a-z0-9_]+(?![:\w])", expr)}


def recorded(expr: str) -> set[str]:
    """The recorded series (``level:metric:operations``) a PromQL expression reads."""
    return set(re.findall(r"(?<![\w:])[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", expr))


def _rules_file() -> Path:
    real = ROOT / ga.RULES_FILE
    return real if real.exists() else ROOT / "tests/unit/data/prom-rules-fixture.yml"


@dataclass
class Live:
    run: DaemonRun
    prom: str
    run_id: str

    def promql(self, query: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.prom}/api/v1/query", params={"query": query}, timeout=10)
        assert r.status_code == 200, f"{query}: {r.text}"
        return list(r.json()["data"]["result"])


def wait(what: str, pred: Callable[[], Any], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError, OSError):
            if value := pred():
                return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _gpu_report(step: int, xid: int, seq: int) -> dict[str, Any]:
    device = {
        "index": 0,
        "uuid": "GPU-sim-0",
        "name": "simulated",
        "utilization": 0.5,
        "memory_used_bytes": 2 << 30,
        "memory_total_bytes": 8 << 30,
        "power_watts": 120.0,
        "temperature_celsius": 55.0,
        "ecc_errors": {"corrected": 0, "uncorrected": 0},
        "xid_errors": {"79": xid},
        "nvlink_tx_bytes": 1000 * seq,
        "nvlink_rx_bytes": 2000 * seq,
    }
    return {
        "v": 1,
        "attempt": 0,
        "role": "rollout",
        "rank": 900,
        "seq": seq,
        "ts": time.time(),
        "pid": 1,
        "host": "gpu-sim",
        "step": step,
        "phase": "rollout",
        "state": "running",
        "gpus": {"up": 1, "reason": "ok", "node": "gpu-sim", "devices": [device]},
    }


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is missing: apt-get install -y --no-install-recommends prometheus")
    tmp = tmp_path_factory.mktemp("deploy")
    doc = tomllib.loads((ROOT / "examples/tiny-grpo-cpu.toml").read_text())
    doc["run"]["name"] = "deploy-live"
    doc["run"]["steps"] = 100_000  # outlives the checks (the example's 120 steps take about a minute)
    doc["checkpoint"]["interval"] = 3
    doc["detection"] = {"straggler_window_steps": 2}
    doc["supervisor"] = {
        **doc["supervisor"],
        "standby": False,
        "backoff_initial_s": 0.5,
        "backoff_max_s": 2.0,
    }
    run = DaemonRun(tmp, doc)
    prom: subprocess.Popen[bytes] | None = None
    try:
        client = run.start()
        cfg = tmp / "prometheus.yml"
        target = client.url.removeprefix("http://")
        # The rules load into this Prometheus too: recorded series exist and alerts are evaluated.
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            f"rule_files: ['{_rules_file()}']\n"
            f"scrape_configs:\n  - job_name: milepost\n    static_configs:\n      - targets: ['{target}']\n"
        )
        log = (tmp / "prometheus.log").open("wb")
        prom, prom_url = start_prometheus_binary(
            PROMETHEUS, cfg, f"--storage.tsdb.path={tmp / 'prom-data'}", log=log
        )
        wait("prometheus ready", lambda: httpx.get(f"{prom_url}/-/ready").status_code == 200, 30)
        run_id = wait("the run id", lambda: client.status()["run_id"], 30)
        live = Live(run=run, prom=prom_url, run_id=run_id)
        _drive(live)
        yield live
    finally:
        if prom is not None:
            prom.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                prom.wait(timeout=10)
            if prom.poll() is None:
                prom.kill()
        run.cleanup()


def _drive(live: Live) -> None:
    """The run through a checkpoint, a hang and its recovery; then GPU samples; then one scrape more."""
    run, client = live.run, live.run.client()
    run.wait_step(4, timeout=240)
    run.wait("a committed checkpoint", lambda: run.events("checkpoint_committed"), 60)
    client.inject("hang", role="trainer", rank=1)
    run.wait("a hang diagnosis", lambda: run.events("collective_hang"), 90)
    hang_step = run.status()["step"]
    run.wait(
        "a verified resume", lambda: [e for e in run.events("resume_verified") if e["attempt"] >= 1], 240
    )
    run.wait_step(hang_step + 2, timeout=180)
    token = (run.run_dir / "token").read_text().strip()
    url = client.url + INGEST_PATH
    for seq in (1, 2, 3):
        rep = _gpu_report(run.status()["step"], xid=seq - 1, seq=seq)
        r = httpx.post(url, json={"reports": [rep]}, headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.status_code == 200, r.text
        time.sleep(1.5)  # one scrape per sample: rate() and increase() need two
    wait(
        "the gpu-sim samples in Prometheus",
        lambda: live.promql('milepost_gpu_devices{node="gpu-sim"} > 0'),
        30,
    )
    wait(
        "a hang restart in Prometheus",
        lambda: live.promql(
            'milepost_restarts_total{reason="hang"} > 0 or milepost_hangs_detected_total > 0'
        ),
        30,
    )


def _instant(expr: str, run_id: str) -> str:
    return expr.replace("$run_id", run_id).replace("$__rate_interval", "20s").replace("$__range", "10m")


pytestmark = [pytest.mark.slow, pytest.mark.timeout(720)]


def test_every_panel_query_returns_data(live: Live) -> None:
    empty: list[str] = []
    checked = 0
    for name, text in render().items():
        for title, expr in queries(json.loads(text)):
            checked += 1
            if not live.promql(_instant(expr, live.run_id)):
                empty.append(f"{name} / {title}: {expr}")
    assert checked >= 50
    assert not empty, "panels with no data:\n" + "\n".join(empty)


def test_gpu_panels_are_covered_by_the_gpu_sim_node(live: Live) -> None:
    """The NEEDS_GPU families are those no CPU run has, and the dashboards read every one."""

    read = set().union(*(families(e) for t in render().values() for _, e in queries(json.loads(t))))
    assert read >= NEEDS_GPU
    for fam in sorted(NEEDS_GPU):
        assert live.promql(f'{{__name__=~"{fam}(_total)?", node="gpu-sim"}}'), fam


def test_hang_and_restart_series_come_from_the_fault(live: Live) -> None:
    hangs = live.promql(f'milepost_hangs_detected_total{{run_id="{live.run_id}"}}')
    assert hangs and float(hangs[0]["value"][1]) >= 1
    restarts = live.promql(f'sum(milepost_restarts_total{{run_id="{live.run_id}"}})')
    assert restarts and float(restarts[0]["value"][1]) >= 1
    stall = live.promql(
        _instant(
            f'max_over_time((time() - max(milepost_last_step_timestamp_seconds{{run_id="{live.run_id}"}}))[$__range:1s])',
            live.run_id,
        )
    )
    assert stall and float(stall[0]["value"][1]) > 2, "the recovery shows as a stall"


def test_every_alert_rule_evaluates_and_its_inputs_have_data(live: Live) -> None:
    """Prometheus loaded the rules and evaluates every one without error; each family and
    recorded series a rule reads had series of this run during it (an alert's own
    expression returns data only while it fires; condition series such as an open hang
    exist only while the condition holds, here during the hang fault)."""
    groups = yaml.safe_load(_rules_file().read_text())["groups"]
    names = {str(x.get("alert") or x.get("record")) for g in groups for x in g["rules"]}
    loaded = wait("every rule evaluated once", lambda: _evaluated(live, names), 30)
    problems: list[str] = []
    for g in groups:
        for rule in g["rules"]:
            name = str(rule.get("alert") or rule.get("record"))
            expr = str(rule["expr"])
            if loaded[name].get("health") != "ok":
                problems.append(f"{name}: {loaded[name].get('health')} {loaded[name].get('lastError', '')}")
            for fam in sorted(families(expr)):
                if fam in NEEDS_FAULT:
                    continue  # listed with the fault it needs, see NEEDS_FAULT
                sel = f'{{__name__=~"{fam}(_total|_bucket)?", run_id="{live.run_id}"}}[15m]'
                if not live.promql(sel):
                    problems.append(f"{name}: {fam} had no series")
            for series in sorted(recorded(expr)):
                if not live.promql(f"{series}[15m]"):
                    problems.append(f"{name}: recorded {series} had no series")
    assert not problems, "rules with errors or inputs without data:\n" + "\n".join(problems)
    if _rules_file() == ROOT / ga.RULES_FILE:
        read = set().union(*(families(str(x["expr"])) for g in groups for x in g["rules"]))
        assert set(NEEDS_FAULT) <= read, (
            f"NEEDS_FAULT lists families no rule reads: {set(NEEDS_FAULT) - read}"
        )


def _evaluated(live: Live, names: set[str]) -> dict[str, Any] | None:
    """Prometheus' view of each rule once all of them have been evaluated at least once."""
    groups = httpx.get(f"{live.prom}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {rule["name"]: rule for g in groups for rule in g["rules"]}
    done = names <= set(loaded) and all(not loaded[n]["lastEvaluation"].startswith("0001") for n in names)
    return loaded if done else None
