"""Fault injection is opt-in per run (``[supervisor] allow_faults``): off by default, and then the
API's faults endpoint, `milepost inject` and a job's [[faults]] refuse, each naming the setting."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from milepost.daemon.api import create_app
from milepost.daemon.cli import main as milepost
from milepost.daemon.store import Store
from milepost.daemon.supervisor import Supervisor
from milepost.engine.contract.config import ConfigError, OpsView, SupervisorConfig, job_from_dict
from milepost.engine.contract.layout import RunDir

from tests.conftest import tiny_job
from tests.servers import serve

pytestmark = pytest.mark.timeout(60)

TOKEN = "opt-in-token"


def test_off_by_default_and_a_job_listing_faults_must_opt_in() -> None:
    assert SupervisorConfig().allow_faults is False
    doc = tiny_job(faults=[{"kind": "kill", "rank": 1}])  # type: ignore[arg-type]
    doc["supervisor"] = {}
    with pytest.raises(ConfigError, match=r"supervisor\.allow_faults=False: the job lists 1 \[\[faults\]\]"):
        job_from_dict(doc)
    doc["supervisor"] = {"allow_faults": True}
    assert job_from_dict(doc).faults[0].rank == 1


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    """A daemon's API over the real controller of a run whose job did not opt in; a rank is 'running'."""
    store = Store(tmp_path)
    store.ensure_run(run_id="r", name="off", job="job.toml", run_dir=str(tmp_path), target_steps=10)
    sup = Supervisor(job="job.toml", run_dir=tmp_path, ops=OpsView(), store=store, token=TOKEN, api_url="x")
    sup.attempt.number, sup.attempt.pid = 0, 2**22 + 1
    with serve(create_app(store, sup.controller, token=TOKEN, require_token_for_reads=False)) as url:
        RunDir(tmp_path).daemon_file.write_text(json.dumps({"url": url, "pid": 1}))
        RunDir(tmp_path).token.write_text(TOKEN + "\n")
        yield tmp_path
    sup.shutdown()
    store.close()


def test_the_api_refuses_a_fault_naming_the_setting(run_dir: Path) -> None:
    url = json.loads(RunDir(run_dir).daemon_file.read_text())["url"]
    r = httpx.post(
        f"{url}/api/v1/faults", json={"kind": "kill", "rank": 1}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert r.status_code == 403, r.text
    assert "allow_faults = true" in r.json()["detail"] and "[supervisor]" in r.json()["detail"]


def test_milepost_inject_refuses_naming_the_setting(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert milepost(["inject", "--rank", "1", "--kind", "kill", "--run-dir", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "milepost inject: daemon answered 403" in err and "allow_faults = true" in err
