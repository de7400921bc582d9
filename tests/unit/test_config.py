"""Job files: validated on load; every error names the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
from milepost.engine.config import ConfigError, job_from_dict, load_job

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


def test_bad_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text("[trainer]\nworld_size = -1\n")
    with pytest.raises(ConfigError, match=r"job\.toml: trainer\.world_size=-1"):
        load_job(bad)
    bad.write_text("[trainer\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_job(tmp_path / "missing.toml")


def test_telemetry_threads_lower_only_their_own_priority() -> None:
    import os
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
