"""The engine on a real loopback Ray cluster: FSDP2 trainer ranks over gloo and a rollout worker,
each a real process. Covers steps, weight-sync verification, crash-resume equivalence,
elastic resume and checkpoint fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from milepost.engine.actors import ActorFailure
from milepost.engine.contract.config import job_from_dict
from milepost.engine.contract.layout import RunDir
from milepost.engine.contract.wire import StepRecord
from milepost.engine.driver import Engine
from milepost.engine.events import read_events
from milepost.engine.step_result import RunResult

from tests.conftest import tiny_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def _run(
    run_dir: Path, *, until: int | None = None, world_size: int | None = None, **overrides: dict
) -> RunResult:
    cfg = job_from_dict(tiny_job(**overrides))
    return Engine(cfg, run_dir, world_size=world_size, until_step=until).run()


def _kinds(run_dir: Path) -> list[str]:
    return [e.kind for e in read_events(run_dir)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    run_dir = tmp_path_factory.mktemp("full")
    return run_dir, _run(run_dir)


def test_two_trainers_one_rollout_complete_steps(full_run: tuple[Path, RunResult]) -> None:
    run_dir, res = full_run
    assert [s.step for s in res.steps] == [1, 2, 3, 4, 5, 6]
    assert res.world_size == 2 and res.resumed_from is None
    for s in res.steps:
        assert 0.0 <= s.reward_mean <= 1.0
        assert s.weight_version == s.step  # rollout of step s+1 used the weights trained at step s
        assert s.train_tokens > 0 and s.rollout_tokens > 0
        assert set(s.phases) >= {"rollout", "reward", "train", "weight_sync"}
    events = list(read_events(run_dir))
    started = next(e for e in events if e.kind == "attempt_started")
    assert started.data["world_size"] == 2
    assert len({r["pid"] for r in started.data["ranks"]}) == 3  # 2 trainers + 1 rollout, 3 processes
    assert [e.step for e in events if e.kind == "checkpoint_committed"] == [2, 4, 6]
    # What the driver wrote to steps.jsonl is the contract's StepRecord, field for field.
    lines = RunDir(run_dir).steps.read_text().splitlines()
    records = [StepRecord.model_validate(json.loads(line)) for line in lines]
    assert [r.step for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(set(json.loads(line)) == set(StepRecord.model_fields) for line in lines)


def test_crash_resume_is_bitwise_equal(full_run: tuple[Path, RunResult], tmp_path: Path) -> None:
    _, uninterrupted = full_run
    first = _run(tmp_path, until=3)
    assert first.final_step == 3
    resumed = _run(tmp_path)
    assert resumed.resumed_from == 3 and resumed.start_step == 3
    assert [s.step for s in resumed.steps] == [4, 5, 6]
    assert resumed.final_checksum == uninterrupted.final_checksum
    assert [s.reward_mean for s in resumed.steps] == [s.reward_mean for s in uninterrupted.steps[3:]]
    assert "resume_verified" in _kinds(tmp_path)


@pytest.mark.parametrize("world_size", [1, 3])
def test_elastic_resume_loads_exact_state(full_run: tuple[Path, RunResult], world_size: int) -> None:
    run_dir, saved = full_run
    # until == the saved step: the attempt loads, verifies and reports, without training further.
    res = _run(run_dir, until=6, world_size=world_size)
    assert res.resumed_from == 6 and res.world_size == world_size
    assert res.loaded_checksum == saved.final_checksum
    assert res.final_checksum == saved.final_checksum
    verified = [e for e in read_events(run_dir) if e.kind == "resume_verified"][-1]
    assert verified.data["saved_world_size"] == 2 and verified.data["world_size"] == world_size


def test_truncated_checkpoint_falls_back_with_event(tmp_path: Path) -> None:
    _run(tmp_path, until=4)
    shard = sorted((tmp_path / "checkpoints" / "step_00000004").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    res = _run(tmp_path, until=5)
    assert res.resumed_from == 2 and [s.step for s in res.steps] == [3, 4, 5]
    skipped = [e for e in read_events(tmp_path) if e.kind == "checkpoint_skipped"]
    assert len(skipped) == 1 and skipped[0].step == 4 and shard.name in skipped[0].message


def test_corrupted_weight_sync_is_detected_and_retried(tmp_path: Path) -> None:
    cfg = job_from_dict(tiny_job())
    engine = Engine(cfg, tmp_path, until_step=2)
    engine.corrupt_next_sync = True
    res = engine.run()
    assert res.final_step == 2
    events = list(read_events(tmp_path))
    failed = [e for e in events if e.kind == "weight_sync_failed"]
    assert failed and failed[0].role == "rollout" and "!= announced" in failed[0].message
    assert any(e.kind == "weight_sync_retry" for e in events)


def test_nan_loss_skips_the_update_on_every_rank(tmp_path: Path) -> None:
    fault = {"kind": "nan", "role": "trainer", "rank": 1, "step": 2}
    res = _run(tmp_path, until=4, faults=[fault])  # type: ignore[arg-type]
    events = list(read_events(tmp_path))
    assert [e.rank for e in events if e.kind == "fault_injected"] == [1]
    skipped = [e for e in events if e.kind == "nonfinite_gradients"]
    assert {e.rank for e in skipped} == {0, 1} and all(e.step == 2 for e in skipped)
    assert all(s.reward_mean == s.reward_mean for s in res.steps[2:])  # later steps are finite again


def test_corrupt_checkpoint_fault_makes_resume_fall_back(tmp_path: Path) -> None:
    faults = [
        {"kind": "corrupt-checkpoint", "role": "trainer", "rank": 0, "step": 5},
        {"kind": "exception", "role": "trainer", "rank": 1, "step": 5},  # the attempt dies before saving 5
    ]
    with pytest.raises(ActorFailure):
        _run(tmp_path, until=6, faults=faults)  # type: ignore[arg-type]
    kinds = _kinds(tmp_path)
    assert "fault_injected" in kinds and "checkpoint_corrupted" in kinds
    res = _run(tmp_path, until=6)
    skipped = [e for e in read_events(tmp_path) if e.kind == "checkpoint_skipped"]
    assert skipped and res.resumed_from is not None and res.resumed_from < skipped[0].step


def test_a_step_record_lost_after_its_checkpoint_is_restored_on_resume(tmp_path: Path) -> None:
    # The driver died between the commit of step 3's checkpoint and step 3's line of steps.jsonl.
    first = _run(tmp_path, until=3, retention={"driver_results": 1})
    assert [s.step for s in first.steps] == [3] and first.steps_run == 3  # the driver's list is bounded
    steps_file = RunDir(tmp_path).steps
    lines = steps_file.read_text().splitlines()
    lost = json.loads(lines[-1])
    assert lost["step"] == 3
    steps_file.write_text("\n".join(lines[:-1]) + "\n")
    resumed = _run(tmp_path, until=4)
    assert resumed.resumed_from == 3
    records = [json.loads(line) for line in steps_file.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    restored = records[2]
    assert restored["attempt"] == lost["attempt"] and restored["reward_mean"] == lost["reward_mean"]
    assert restored["loss"] == lost["loss"] and restored["trace_id"] == lost["trace_id"]
    StepRecord.model_validate(restored)
    # Nothing is restored twice: the file now holds step 4, past the checkpoint.
    assert _run(tmp_path, until=4).resumed_from == 4
    assert [json.loads(line)["step"] for line in steps_file.read_text().splitlines()] == [1, 2, 3, 4]
