"""Schemathesis over the daemon's /openapi.json: no generated request, valid or not, gets a 5xx.

The app runs on a real uvicorn server on 127.0.0.1 over a real Store, with reads behind the
token too, so every operation is exercised past authentication: once with a fake controller
(every path answers) and once with the daemon's real Supervisor's controller (its own ingest, control and
fault handling; no attempt is launched, so writes that need one answer 409).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from milepost.daemon.alerting import DaemonAlerting
from milepost.daemon.api import create_app
from milepost.daemon.metrics import RunMetrics
from milepost.daemon.store import Store
from milepost.engine.contract.config import AlertsConfig
from schemathesis.checks import not_a_server_error

from tests.servers import FakeController, serve

TOKEN = "schemathesis-token"


def _openapi() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        try:
            return create_app(
                store, FakeController(store), token=TOKEN, require_token_for_reads=True
            ).openapi()
        finally:
            store.close()


# Built at import, not from a fixture: schemathesis.pytest.from_fixture (4.32) reads
# Node._nodeid, which pytest 9 no longer has.
schema = schemathesis.openapi.from_dict(_openapi())


def _real_supervisor(store: Store, run_dir: Path) -> Any:
    from milepost.daemon.supervisor import Supervisor
    from milepost.engine.contract.config import OpsView

    return Supervisor(
        job="job.toml", run_dir=run_dir, ops=OpsView(), store=store, token=TOKEN, api_url="http://x"
    ).controller


@pytest.fixture(scope="module", params=["fake", "supervisor"])
def base_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    run_dir: Path = tmp_path_factory.mktemp("run")
    store = Store(run_dir)
    store.ensure_run(run_id="r", name="fuzz", job="job.toml", run_dir=str(run_dir), target_steps=10)
    store.add_attempt(0, pid=1, world_size=2)
    store.add_event({"kind": "attempt_started", "message": "m", "attempt": 0, "data": {"x": float("nan")}})
    store.add_step({"step": 1, "attempt": 0, "loss": float("inf")})
    store.upsert_checkpoint(1, path="/c/1", status="committed", world_size=2)
    controller = FakeController(store) if request.param == "fake" else _real_supervisor(store, run_dir)
    # The daemon's real alerting (default [alerts]: the log receiver), so silences and tests answer.
    alerting = DaemonAlerting(AlertsConfig(), run_dir, store, RunMetrics()).start()
    app = create_app(store, controller, token=TOKEN, require_token_for_reads=True, alerting=alerting)
    with serve(app) as url:
        yield url
    alerting.close()
    store.close()


@pytest.mark.timeout(120)
@schema.parametrize()
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, base_url: str) -> None:
    case.call_and_validate(
        base_url=base_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        checks=[not_a_server_error],
        timeout=10,
    )
