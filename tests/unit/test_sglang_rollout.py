"""The SGLang rollout backend against a FAKE of SGLang's HTTP API (tests/fakes/sglang_fake.py).

Real HTTP on 127.0.0.1; no SGLang, no GPU. Covers the generate round trip, weight updates
(disk, tensor, distributed) with per-server version tracking, a warming server spared,
debounced failures, a dead server restarted and re-synced before it serves, stale versions refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from milepost.engine.backends.megatron import convert as conv
from milepost.engine.backends.sglang.client import SGLangError
from milepost.engine.backends.sglang.health import DEAD, HEALTHY, STARTING, UNHEALTHY
from milepost.engine.backends.sglang.worker import SGLangRolloutWorker
from milepost.engine.contract.config import ConfigError, job_from_dict
from milepost.engine.events import read_events
from milepost.engine.rollout import StaleWeightsError, WeightSyncError
from milepost.engine.task import Task
from milepost.engine.weights import state_checksum

from tests.conftest import tiny_job
from tests.fakes.sglang_fake import FakeLauncher, FakeSGLangServer

VOCAB = Task(job_from_dict(tiny_job()).task).vocab_size


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _job(**sglang: Any) -> Any:
    doc = tiny_job(
        trainer={"backend": "megatron", "world_size": 2, "max_world_size": 2},
        megatron={"architecture": "llama", "num_query_groups": 2},
        rollout={"backend": "sglang", "workers": 1},
        sglang={"health_interval_s": 0.05, "check_timeout_s": 2.0, "request_timeout_s": 20.0, **sglang},
    )
    return job_from_dict(doc)


def _packet(cfg: Any, version: int) -> dict[str, Any]:
    """HF Llama weights as the Megatron backend exports them (a different seed per version)."""
    m = cfg.megatron
    full = conv.init_llama_megatron(
        cfg.model,
        groups=m.num_query_groups,
        padded_vocab=m.padded_vocab_size(VOCAB),
        vocab=VOCAB,
        seed=version,
    )
    state = conv.megatron_to_hf_llama(full, cfg.model, groups=m.num_query_groups, vocab=VOCAB)
    return {"version": version, "checksum": state_checksum(state), "format": "hf_llama", "state": state}


def _prompts(cfg: Any, n: int = 6) -> torch.Tensor:
    return Task(cfg.task).prompts(cfg.run.seed, 1, n)


@pytest.fixture
def fakes() -> Iterator[list[FakeSGLangServer]]:
    made: list[FakeSGLangServer] = []
    yield made
    for f in made:
        f.kill()


def _fake(fakes: list[FakeSGLangServer], **kw: Any) -> FakeSGLangServer:
    f = FakeSGLangServer(vocab=VOCAB, **kw)
    fakes.append(f)
    return f


@contextmanager
def _running(cfg: Any, run_dir: Path) -> Iterator[SGLangRolloutWorker]:
    """A rollout worker on ``cfg``'s servers, ticked by hand (no background thread); shut down on exit."""
    worker = SGLangRolloutWorker(cfg, index=0, run_dir=str(run_dir), background=False)
    try:
        yield worker
    finally:
        worker.shutdown()


def _kinds(run_dir: Path) -> list[str]:
    return [e.kind for e in read_events(run_dir)]


def test_generate_round_trip(tmp_path: Path, fakes: list[FakeSGLangServer]) -> None:
    fake = _fake(fakes)
    cfg = _job(urls=[fake.url])
    with _running(cfg, tmp_path) as worker:
        worker.manager.tick()
        packet = _packet(cfg, 1)
        assert worker.update_weights(packet)["version"] == 1
        assert fake.weight_version == "1"
        assert fake.weights is not None and state_checksum(fake.weights) == packet["checksum"]
        prompts = _prompts(cfg)
        out = worker.generate(1, prompts, expected_version=1)
        r = Task(cfg.task).response_len
        want = torch.tensor([fake.expected_output(row, r) for row in prompts.tolist()])
        assert torch.equal(out["responses"], want)
        assert torch.equal(out["logprobs"], torch.full((len(prompts), r), -0.5))
        assert out["weight_version"] == 1 and out["tokens"] == want.numel()
        body = next(b for path, b in fake.requests if path == "POST /generate")
        assert body["input_ids"] == prompts.tolist() and body["return_logprob"] is True
        assert (
            body["sampling_params"]["max_new_tokens"] == r and body["sampling_params"]["ignore_eos"] is True
        )


def test_weight_updates_track_the_version_of_each_server(
    tmp_path: Path, fakes: list[FakeSGLangServer]
) -> None:
    a, b = _fake(fakes), _fake(fakes)
    cfg = _job(urls=[a.url, b.url])
    with _running(cfg, tmp_path) as worker:
        worker.manager.tick()
        for v in (1, 2):
            worker.update_weights(_packet(cfg, v))
        assert a.weight_version == b.weight_version == "2"
        health = worker.health()
        assert health["ok"] and [s["weight_version"] for s in health["servers"]] == [2, 2]
        # b falls over: it misses v3 and, once back, is re-synced before it serves again.
        b.unhealthy = True
        for _ in range(cfg.sglang.failure_threshold):
            worker.manager.tick()
        worker.update_weights(_packet(cfg, 3))
        assert (a.weight_version, b.weight_version) == ("3", "2")
        # b is dead to the manager: the version it holds is unknown until it is re-synced.
        assert [(s["state"], s["weight_version"]) for s in worker.health()["servers"]] == [
            (HEALTHY, 3),
            (DEAD, -1),
        ]
        out = worker.generate(3, _prompts(cfg), expected_version=3)  # served by a alone
        assert out["weight_version"] == 3
        b.unhealthy = False
        worker.generate(3, _prompts(cfg), expected_version=3)  # the round before it re-syncs b
        assert b.weight_version == "3"
        assert [s["weight_version"] for s in worker.health()["servers"]] == [3, 3]


def test_tensor_and_distributed_updates(tmp_path: Path, fakes: list[FakeSGLangServer]) -> None:
    fake = _fake(fakes)
    cfg = _job(urls=[fake.url], weight_update="tensor")
    _update_once(SGLangRolloutWorker(cfg, index=0, run_dir=str(tmp_path / "t"), background=False), fake, 4)

    class FakeChannel(SGLangRolloutWorker):
        """The NCCL group replaced by a hand-over to the fake: exercises the HTTP side of the protocol."""

        def _init_group(self, s: Any) -> Any:
            s.client.init_weights_update_group(
                master_address="127.0.0.1",
                master_port=1,
                rank_offset=1,
                world_size=2,
                group_name="milepost-w0",
            )
            return fake

        def _broadcast(self, group: Any, tensor: torch.Tensor) -> None:
            group.distributed_inbox.put(tensor.clone())

    cfg = _job(urls=[fake.url], weight_update="distributed")
    packet = _update_once(FakeChannel(cfg, index=0, run_dir=str(tmp_path / "d"), background=False), fake, 5)
    body = [b for path, b in fake.requests if path == "POST /update_weights_from_distributed"][-1]
    assert body["names"] == list(packet["state"]) and body["group_name"] == "milepost-w0"
    assert body["shapes"][0] == list(next(iter(packet["state"].values())).shape)


def _update_once(worker: SGLangRolloutWorker, fake: FakeSGLangServer, version: int) -> dict[str, Any]:
    """One weight update through ``worker`` (shut down after); the fake then holds exactly those weights."""
    try:
        worker.manager.tick()
        packet = _packet(worker.cfg, version)
        worker.update_weights(packet)
        assert (
            fake.weight_version == str(version) and state_checksum(fake.weights or {}) == packet["checksum"]
        )
        return packet
    finally:
        worker.shutdown()


def test_warming_server_is_spared_and_failures_are_debounced(tmp_path: Path) -> None:
    clock = Clock()
    launcher = FakeLauncher(vocab=VOCAB, warmup_s=3600.0)  # answers 503 for an hour
    cfg = _job(startup_grace_s=300.0, failure_threshold=3)
    worker = SGLangRolloutWorker(
        cfg, index=0, run_dir=str(tmp_path), launcher=launcher, clock=clock, background=False
    )
    try:
        worker.update_weights(_packet(cfg, 0))  # launches the server from these weights
        (server,) = worker.manager.servers
        for _ in range(10):
            clock.t += 20.0  # 200 s into a 300 s grace period
            worker.manager.tick()
        assert server.state == STARTING and server.failures == 0 and len(launcher.launched) == 1
        clock.t += 200.0  # grace over: now failed checks count, and 3 in a row are needed
        worker.manager.tick()
        worker.manager.tick()
        assert server.state == UNHEALTHY and server.failures == 2
        worker.manager.tick()
        assert server.state == STARTING and server.restarts == 1 and len(launcher.launched) == 2
        assert _kinds(tmp_path).count("sglang_server_dead") == 1

        # A healthy server that misses checks, below the threshold, is not declared dead.
        fresh = launcher.launched[-1][1].server
        fresh.ready_at = 0.0
        worker.manager.tick()
        assert server.state == HEALTHY
        fresh.unhealthy = True
        worker.manager.tick()
        worker.manager.tick()
        assert server.state == UNHEALTHY and server.failures == 2
        fresh.unhealthy = False
        worker.manager.tick()
        assert server.state == HEALTHY and server.failures == 0 and server.restarts == 1
    finally:
        worker.shutdown()
        launcher.close()


def test_dead_server_is_restarted_and_resynced_before_it_serves(tmp_path: Path) -> None:
    launcher = FakeLauncher(vocab=VOCAB)
    cfg = _job()
    worker = SGLangRolloutWorker(cfg, index=0, run_dir=str(tmp_path), launcher=launcher, background=False)
    try:
        worker.update_weights(_packet(cfg, 0))
        (server,) = worker.manager.servers
        assert server.version == -1  # launched from the weights, but not serving before a confirmed push
        worker.generate(1, _prompts(cfg), expected_version=0)
        worker.update_weights(_packet(cfg, 1))
        first = launcher.launched[0][1]
        assert first.server.weight_version == "1"

        first.crash()
        worker.manager.tick()
        assert server.state == STARTING and server.restarts == 1 and server.version == -1
        second = launcher.launched[1][1]
        assert second.url != first.url and second.server.weight_version == "default"
        out = worker.generate(2, _prompts(cfg), expected_version=1)
        assert out["weight_version"] == 1 and second.server.weight_version == "1"
        paths = [p for p, _ in second.server.requests if p.startswith("POST")]
        assert paths.index("POST /update_weights_from_disk") < paths.index("POST /generate")
        kinds = _kinds(tmp_path)
        dead, restarted = kinds.index("sglang_server_dead"), kinds.index("sglang_server_restarted")
        assert dead < restarted < len(kinds) - 1 - kinds[::-1].index("sglang_weights_loaded")
    finally:
        worker.shutdown()
        launcher.close()


def test_stale_versions_are_refused(tmp_path: Path, fakes: list[FakeSGLangServer]) -> None:
    fake = _fake(fakes)
    cfg = _job(urls=[fake.url])
    with _running(cfg, tmp_path) as worker:
        worker.manager.tick()
        worker.update_weights(_packet(cfg, 1))
        with pytest.raises(StaleWeightsError, match="expects weights v2, worker holds v1"):
            worker.generate(2, _prompts(cfg), expected_version=2)
        fake.weight_version = "0"  # the server answers with other weights than it was given
        with pytest.raises(StaleWeightsError, match="generated with weight version 0, expected v1"):
            worker.generate(2, _prompts(cfg), expected_version=1)
        bad = _packet(cfg, 2)
        bad["state"]["lm_head.weight"][0, 0] += 1.0
        with pytest.raises(WeightSyncError, match="does not match"):
            worker.update_weights(bad)
        assert worker.version == 1


def test_no_server_with_the_version_is_an_error_naming_the_servers(tmp_path: Path) -> None:
    cfg = _job(urls=["http://127.0.0.1:9"], failure_threshold=1, startup_grace_s=0.01, request_timeout_s=0.5)
    with _running(cfg, tmp_path) as worker:
        worker.version = 0
        with pytest.raises(SGLangError, match=r"no SGLang server holds weights v0.*127\.0\.0\.1:9.*dead"):
            worker.generate(1, _prompts(cfg), expected_version=0)
        assert worker.manager.servers[0].state == DEAD


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"sglang": {"weight_update": "ftp"}}, "sglang.weight_update='ftp'"),
        ({"sglang": {"urls": ["localhost:1"]}}, "is not an http(s) URL"),
        ({"sglang": {"failure_threshold": 0}}, "sglang.failure_threshold=0"),
        ({"megatron": {"architecture": "policy"}}, "rollout.backend='sglang': SGLang serves HF Llama"),
    ],
)
def test_sglang_config_errors(doc: dict[str, Any], needle: str) -> None:
    base = {
        "trainer": {"backend": "megatron", "world_size": 2, "max_world_size": 2},
        "megatron": {"architecture": "llama"},
        "rollout": {"backend": "sglang"},
    }
    for k, v in doc.items():
        base.setdefault(k, {}).update(v)
    with pytest.raises(ConfigError) as e:
        job_from_dict(tiny_job(**base))
    assert needle in str(e.value)


_STUB = '''
"""A stub ``sglang.launch_server`` for tests: serves the FAKE API on the requested port."""
import argparse, time
from tests.fakes.sglang_fake import FakeSGLangServer

ap = argparse.ArgumentParser()
ap.add_argument("--model-path"); ap.add_argument("--host"); ap.add_argument("--port", type=int)
ap.add_argument("--vocab", type=int, default={vocab})
args, _ = ap.parse_known_args()
FakeSGLangServer(vocab=args.vocab, model_path=args.model_path, port=args.port)
while True:
    time.sleep(1)
'''


def test_launched_subprocess_server_is_restarted_after_it_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launch path itself: ``python -m sglang.launch_server`` (here a stub module serving the fake)."""
    import os
    import signal
    import socket
    import time

    from tests.conftest import REPO

    stub = tmp_path / "stub" / "sglang"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (stub / "launch_server.py").write_text(_STUB.format(vocab=VOCAB))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(stub.parent), str(REPO)]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _job(port_base=port, startup_grace_s=60.0, failure_threshold=1)
    with _running(cfg, tmp_path / "run") as worker:
        worker.update_weights(_packet(cfg, 0))
        (server,) = worker.manager.servers
        proc = server.proc
        assert proc is not None and "sglang.launch_server" in " ".join(proc.cmd)  # type: ignore[attr-defined]
        assert worker.generate(1, _prompts(cfg), expected_version=0)["weight_version"] == 0
        os.kill(proc.proc.pid, signal.SIGKILL)  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        worker.manager.tick()
        assert server.restarts == 1 and server.proc is not proc
        assert worker.generate(2, _prompts(cfg), expected_version=0)["weight_version"] == 0
        assert "sglang_server_restarted" in _kinds(tmp_path / "run")
