"""Job files: validated on load; every error names the key and the value."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from milepost.engine.contract.config import (
    SCHEMA_FILE,
    ConfigError,
    DetectionConfig,
    JobConfig,
    RunConfig,
    SupervisorConfig,
    TrainerConfig,
    job_from_dict,
    job_json_schema,
    job_schema_text,
    load_job,
    load_ops_view,
)
from milepost.engine.contract.enums import FaultKind, Role
from pydantic import ValidationError

from tests.conftest import REPO, tiny_job


def test_default_job_loads() -> None:
    cfg = load_job(REPO / "examples" / "tiny-grpo-cpu.toml")
    assert cfg.trainer.world_size == 2
    assert cfg.rollout.workers == 1
    assert cfg.trainer.backend == "fsdp2"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"trainer": {"wrld_size": 2}}, "trainer.wrld_size=2: unknown key"),
        ({"trainer": {"world_size": 0}}, "trainer.world_size=0"),
        ({"trainer": {"world_size": "2"}}, "trainer.world_size='2': expected int"),
        ({"trainer": {"backend": "deepspeed"}}, "trainer.backend='deepspeed'"),
        ({"grpo": {"clip_eps": -1.0}}, "grpo.clip_eps=-1.0"),
        ({"model": {"n_heads": 3}}, "model.n_heads=3"),
        ({"task": {"name": "chess"}}, "task.name='chess'"),
        ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last=0"),
        ({"rollout": {"workers": 0}}, "rollout.workers=0"),
        ({"run": {"steps": True}}, "run.steps=True: expected int"),
        ({"optimizer": {"lr": 1.0}}, "optimizer={'lr': 1.0}: unknown section"),
        ({"model": {"max_seq_len": 4}}, "model.max_seq_len=4"),
        ({"grpo": {"minibatches": 3}}, "grpo.minibatches=3"),
        ({"supervisor": {"telemetry_nice": 25}}, "supervisor.telemetry_nice=25"),
    ],
)
def test_bad_values_name_key_and_value(doc: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        job_from_dict(tiny_job(**doc))
    assert needle in str(e.value)


def test_section_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match=r"\[trainer\] must be a table"):
        job_from_dict({"trainer": "fast"})


def test_int_is_accepted_for_float() -> None:
    cfg = job_from_dict(tiny_job(grpo={"lr": 1}))
    assert isinstance(cfg.grpo.lr, float) and cfg.grpo.lr == 1.0


def _refuses(load: Callable[[Path], object], path: Path, text: str, match: str) -> None:
    """``load`` of ``path`` holding ``text`` raises a ConfigError matching ``match``."""
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load(path)


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "job.toml"
    _refuses(load_job, bad, "[trainer]\nworld_size = -1\n", r"job\.toml: trainer\.world_size=-1")
    _refuses(load_job, bad, "[trainer\n", "not valid TOML")
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("detection", "hang_floor_s"),
        ("supervisor", "heartbeat_timeout_trainer_s"),
        ("trainer", "collective_timeout_s"),
        ("grpo", "lr"),
        ("megatron", "rotary_base"),
        ("sglang", "request_timeout_s"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_rejected(section: str, key: str, value: float) -> None:
    # nan compares false with every bound: it used to pass "> 0" and switch detection off
    with pytest.raises(ConfigError) as e:
        job_from_dict(tiny_job(**{section: {key: value}}))
    assert f"{section}.{key}={value!r}: must be a finite number" in str(e.value)


def test_non_finite_fault_factor_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"faults\[1\]\.factor=nan: must be a finite number"):
        job_from_dict(tiny_job(faults=[{"kind": "kill"}, {"kind": "slow", "factor": math.nan}]))


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"trainer": {"world_size": True}}, "trainer.world_size=True: expected int"),
        ({"rollout": {"allow_stale_weights": 1}}, "rollout.allow_stale_weights=1: expected bool"),
        ({"detection": {"enabled": 0}}, "detection.enabled=0: expected bool"),
        ({"grpo": {"lr": True}}, "grpo.lr=True: expected float"),
        ({"run": {"name": 3}}, "run.name=3: expected str"),
        ({"faults": [{"kind": "x"}]}, "faults[0].kind='x': must be one of ['kill', 'exit'"),
        ({"faults": [{"kind": "kill", "role": "daemon"}]}, "faults[0].role='daemon': must be one of"),
        ({"faults": [{"kind": "kill", "rnk": 1}]}, "faults[0].rnk=1: unknown key"),
        ({"faults": [{"rank": 1}]}, "faults[0].kind: required"),
        ({"detection": {"action": "page"}}, "detection.action='page': must be one of ['restart', 'report']"),
    ],
)
def test_types_are_strict(doc: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        job_from_dict(tiny_job(**doc))
    assert needle in str(e.value)


def test_fault_kinds_keep_their_wire_spelling() -> None:
    cfg = job_from_dict(tiny_job(faults=[{"kind": "skip-collective", "role": "trainer", "rank": 1}]))
    (spec,) = cfg.faults
    assert spec.kind is FaultKind.SKIP_COLLECTIVE and spec.kind == "skip-collective"
    assert spec.role == Role.TRAINER == "trainer"


def test_config_is_frozen_and_replace_validates() -> None:
    cfg = job_from_dict(tiny_job(), source="job.toml")
    with pytest.raises(ValidationError):
        cfg.trainer.world_size = 4  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.run = RunConfig()  # type: ignore[misc]
    moved = cfg.replace("ray", address="127.0.0.1:6379")
    assert moved.ray.address == "127.0.0.1:6379" and cfg.ray.address == "local"
    assert moved.source == "job.toml" and moved.trainer == cfg.trainer
    with pytest.raises(ConfigError, match=r"job\.toml: trainer\.world_size=0: must be >= 1"):
        cfg.replace("trainer", world_size=0)


def test_max_world_size_zero_means_world_size() -> None:
    assert job_from_dict(tiny_job(trainer={"world_size": 3, "max_world_size": 0})).trainer.max_world_size == 3
    assert TrainerConfig(world_size=1).max_world_size == 1


def test_sections_constructed_directly_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"detection\.hang_floor_s=nan: must be a finite number"):
        DetectionConfig(hang_floor_s=math.nan)
    with pytest.raises(ConfigError, match=r"supervisor\.api_prt=1: unknown key"):
        SupervisorConfig(api_prt=1)


def test_ops_view_reads_only_the_daemons_sections(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    _refuses(
        load_ops_view,
        job,
        "[run]\nname = 'x'\n[model]\nwhatever = 1\n[detection]\nhang_floor_s = nan\n",
        r"job\.toml: detection\.hang_floor_s=nan: must be a finite number",
    )
    job.write_text("[run]\nname = 'x'\n[model]\nwhatever = 1\n")
    assert load_ops_view(job).run.name == "x"


def test_unreadable_or_directory_job_file_names_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="is a directory") as e:
        load_job(tmp_path)
    assert str(tmp_path) in str(e.value)
    with pytest.raises(ConfigError, match="is a directory"):
        load_ops_view(tmp_path)
    locked = tmp_path / "locked.toml"
    locked.write_text("[run]\n")

    def refuse(self: Path, *a: object, **k: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refuse)  # chmod 0 does not stop root, who runs CI here
    with pytest.raises(ConfigError, match=r"locked\.toml'?: cannot be read: Permission denied"):
        load_job(locked)
    monkeypatch.undo()
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[run]")
    with pytest.raises(ConfigError, match=r"binary\.toml: not UTF-8"):
        load_job(binary)


def test_committed_schema_is_current() -> None:
    # regenerate with: milepost schema > engine/contract/config/job.schema.json
    assert SCHEMA_FILE.read_text() == job_schema_text()
    schema = job_json_schema()
    assert set(schema["properties"]) == {*JobConfig.model_fields}
    assert schema["additionalProperties"] is False


def test_milepost_schema_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    from milepost.daemon.cli import main

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == job_json_schema()


def test_loading_a_job_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from milepost.engine.contract.config import load_job; "
        f"load_job({str(REPO / 'examples' / 'tiny-grpo-cpu.toml')!r}); "
        "assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_telemetry_threads_lower_only_their_own_priority() -> None:
    import threading

    from milepost.engine.wire import lower_thread_priority

    seen: dict[str, int] = {}

    def background() -> None:
        lower_thread_priority(5)
        seen["reporter"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    t = threading.Thread(target=background)
    t.start()
    t.join()
    assert seen["reporter"] == min(19, main + 5)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main  # training threads keep theirs
