"""Against a real Alertmanager (Debian's 0.25, when installed): our push is accepted and forwarded,
and the webhook body Alertmanager itself sends has exactly the fields ours has."""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from milepost.alerts.payloads import webhook_payload
from milepost.alerts.receivers import build_receiver
from milepost.engine.contract.config.alerts import AlertsConfig, ReceiverConfig

from tests.servers import start_prometheus_binary
from tests.unit.test_alerts_receivers import Capture, capture_server, make_notification

AM = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = pytest.mark.skipif(
    AM is None, reason="no Alertmanager binary (apt-get install prometheus-alertmanager)"
)


def _wait(cap: Capture, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(cap.bodies()) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_push_to_real_alertmanager_round_trips_to_its_webhook(tmp_path: Path) -> None:
    assert AM is not None
    with capture_server() as cap:
        conf = tmp_path / "am.yml"
        conf.write_text(
            "route: {receiver: hook, group_by: [run, alertname], group_wait: 0s, group_interval: 1s, "
            "repeat_interval: 1h}\n"
            f"receivers: [{{name: hook, webhook_configs: [{{url: '{cap.url}/am', send_resolved: true}}]}}]\n"
        )
        log = (tmp_path / "am.log").open("wb")
        proc, am_url = start_prometheus_binary(
            AM, conf, f"--storage.path={tmp_path / 'data'}", "--cluster.listen-address=", log=log
        )
        try:
            deadline = time.monotonic() + 60  # wide: a loaded machine starts it slowly
            while True:
                try:
                    if httpx.get(f"{am_url}/-/ready", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "Alertmanager did not start"
                time.sleep(0.1)
            rec = build_receiver(
                ReceiverConfig(name="am", type="alertmanager", url=am_url),
                AlertsConfig(),
                {},
            )
            now = time.time()
            firing = make_notification()
            firing.alerts[0].active_since = firing.alerts[0].fired_at = now - 5
            firing = firing.model_copy(update={"created_at": now})
            assert rec.send(firing, 5).ok
            _wait(cap, 1, 30)
            resolved = make_notification("resolved")
            resolved.alerts[0].active_since = resolved.alerts[0].fired_at = now - 5
            resolved.alerts[0].resolved_at = now - 1
            assert rec.send(resolved, 5).ok
            _wait(cap, 2, 30)
        finally:
            proc.terminate()
            proc.wait(10)
            log.close()
    first, second = cap.bodies()[:2]
    ours = webhook_payload(firing)
    assert set(first) == set(ours) and set(first["alerts"][0]) == set(ours["alerts"][0])
    assert first["version"] == "4" and first["status"] == "firing" and second["status"] == "resolved"
    assert first["alerts"][0]["labels"] == firing.alerts[0].labels
    assert first["alerts"][0]["generatorURL"] == firing.alerts[0].generator_url
    # Alertmanager writes Go's RFC 3339 with trailing zeros of the fraction trimmed (.96Z for .960Z).
    ends = webhook_payload(resolved)["alerts"][0]["endsAt"]
    assert datetime.fromisoformat(second["alerts"][0]["endsAt"]) == datetime.fromisoformat(ends)
