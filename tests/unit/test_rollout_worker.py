"""Rollout-side weight verification, in-process (no Ray needed for the worker's own checks)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from milepost.engine.contract.config import job_from_dict
from milepost.engine.events import read_events
from milepost.engine.model import build_policy
from milepost.engine.rollout import StaleWeightsError, TorchRolloutWorker, WeightSyncError
from milepost.engine.weights import state_checksum

from tests.conftest import tiny_job


def _packet(worker: TorchRolloutWorker, version: int) -> dict:
    state = {k: v.clone() + 0.01 for k, v in worker.policy.state_dict().items()}
    return {"version": version, "checksum": state_checksum(state), "state": state}


def test_checksum_mismatch_is_refused_and_old_weights_kept(tmp_path: Path) -> None:
    worker = TorchRolloutWorker(job_from_dict(tiny_job()), index=0, run_dir=str(tmp_path))
    good = _packet(worker, 1)
    assert worker.update_weights(good)["version"] == 1
    before = {k: v.clone() for k, v in worker.policy.state_dict().items()}
    bad = _packet(worker, 2)
    bad["state"]["head.weight"][0, 0] += 1.0  # tampered in transit
    with pytest.raises(WeightSyncError, match="v2 checksum .* does not match"):
        worker.update_weights(bad)
    assert worker.version == 1
    assert all(torch.equal(before[k], v) for k, v in worker.policy.state_dict().items())
    assert [e.kind for e in read_events(tmp_path)] == ["weight_sync_failed"]


def test_stale_version_is_refused(tmp_path: Path) -> None:
    cfg = job_from_dict(tiny_job())
    worker = TorchRolloutWorker(cfg, index=0, run_dir=str(tmp_path))
    worker.update_weights(_packet(worker, 3))
    prompts = worker.task.prompts(0, 1, 2)
    with pytest.raises(StaleWeightsError, match="expects weights v4, worker holds v3"):
        worker.generate(4, prompts, expected_version=4)
    out = worker.generate(4, prompts, expected_version=3)
    assert out["weight_version"] == 3 and out["responses"].shape == (2, worker.task.response_len)


def test_stale_allowed_by_config_says_so(tmp_path: Path) -> None:
    cfg = job_from_dict(tiny_job(rollout={"allow_stale_weights": True}))
    worker = TorchRolloutWorker(cfg, index=0, run_dir=str(tmp_path))
    worker.generate(1, worker.task.prompts(0, 1, 2), expected_version=0)
    (event,) = read_events(tmp_path)
    assert event.kind == "stale_weights" and event.severity == "warning"


def test_same_seed_same_initial_policy() -> None:
    cfg = job_from_dict(tiny_job())
    a = build_policy(cfg.model, 16, 3).state_dict()
    b = build_policy(cfg.model, 16, 3).state_dict()
    assert state_checksum(a) == state_checksum(b)
