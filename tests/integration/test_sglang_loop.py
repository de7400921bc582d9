"""The engine's real loop with the SGLang rollout backend, against a FAKE SGLang server.

Ray actors (a Megatron trainer rank, architecture "llama", and an SGLang rollout worker) and
a fake of SGLang's HTTP API (tests/fakes/sglang_fake.py) running in this test process: every
step's weights go to the server from disk with their version, and generation is refused
unless the server holds the version the driver expects.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from milepost.engine.contract.config import job_from_dict
from milepost.engine.driver import Engine
from milepost.engine.events import read_events
from milepost.engine.task import Task

from tests.conftest import tiny_job
from tests.fakes.sglang_fake import FakeSGLangServer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def test_engine_steps_with_sglang_rollout_on_a_fake_server(tmp_path: Path) -> None:
    doc = tiny_job(
        run={"steps": 3},
        trainer={"backend": "megatron", "world_size": 1, "max_world_size": 1},
        megatron={"architecture": "llama", "num_query_groups": 2},
        rollout={"backend": "sglang", "workers": 1},
        checkpoint={"interval": 0},
    )
    fake = FakeSGLangServer(vocab=Task(job_from_dict(doc).task).vocab_size)
    try:
        doc["sglang"] = {"urls": [fake.url], "health_interval_s": 0.5}
        res = Engine(job_from_dict(doc), tmp_path).run()
        assert [s.step for s in res.steps] == [1, 2, 3]
        assert [s.weight_version for s in res.steps] == [1, 2, 3]
        assert all(0.0 <= s.reward_mean <= 1.0 and s.rollout_tokens > 0 for s in res.steps)
        assert fake.weight_version == "3"
        posts = [(p, b) for p, b in fake.requests if p.startswith("POST")]
        loads = [b["weight_version"] for p, b in posts if p == "POST /update_weights_from_disk"]
        assert loads == ["0", "1", "2", "3"]
        generated = [p for p, _ in posts if p == "POST /generate"]
        assert len(generated) == 3
        loaded = [e for e in read_events(tmp_path) if e.kind == "sglang_weights_loaded"]
        assert [e.data["version"] for e in loaded] == [0, 1, 2, 3]
    finally:
        fake.kill()
