"""Rollout worker: the embedded torch generator behind the rollout protocol.

Weights arrive versioned and checksummed from trainer rank 0; a worker verifies the
checksum before it swaps them in and refuses to generate with any version other than
the one the driver expects (unless ``rollout.allow_stale_weights``, which then says so
in an event). Sampling derives from (seed, step, worker index).
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .contract.config import JobConfig
from .generate import generate
from .model import build_policy
from .runtime import RankRuntime, RuntimeActor
from .seeding import generator
from .task import Task
from .weights import state_checksum

if TYPE_CHECKING:
    from .backends.sglang_rollout import SGLangRolloutWorker


class WeightSyncError(RuntimeError):
    """Received weights do not match their announced checksum."""


class StaleWeightsError(RuntimeError):
    """A worker was asked to generate with a weight version it does not hold."""


class RolloutEngine(Protocol):
    def update_weights(self, packet: dict[str, Any]) -> dict[str, Any]: ...
    def generate(self, step: int, prompts: torch.Tensor, expected_version: int) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...


class TorchRolloutWorker(RuntimeActor):
    def __init__(
        self,
        cfg: JobConfig,
        *,
        index: int,
        run_dir: str,
        attempt: int = 0,
        daemon_url: str | None = None,
        token: str | None = None,
        deferred: bool = False,
    ) -> None:
        torch.set_num_threads(cfg.rollout.threads_per_worker)
        self.cfg, self.index = cfg, index
        self.task = Task(cfg.task)
        self.policy = build_policy(cfg.model, self.task.vocab_size, cfg.run.seed).eval()
        self.version = -1  # no weights synced from the trainer yet
        self.checksum = ""
        self.rt = RankRuntime.for_job(
            cfg,
            role="rollout",
            rank=index,
            run_dir=run_dir,
            attempt=attempt,
            daemon_url=daemon_url,
            token=token,
            start=not deferred,  # built ahead by a warm standby: reports once its attempt begins
        )
        self.events, self.inst = self.rt.events, self.rt.inst
        self.inst.set_phase("idle")

    def info(self) -> dict[str, Any]:
        return {"role": "rollout", "rank": self.index, "pid": os.getpid(), "host": socket.gethostname()}

    def update_weights(self, packet: dict[str, Any]) -> dict[str, Any]:
        with self.inst.phase("weight_sync"):
            version, announced, state = packet["version"], packet["checksum"], packet["state"]
            fmt = packet.get("format", "policy")
            if fmt != "policy":
                raise WeightSyncError(
                    f"rollout {self.index}: weights v{version} are in format {fmt!r}; the embedded "
                    "torch rollout loads 'policy' weights (use rollout.backend='sglang' for HF layouts)"
                )
            got = state_checksum(state)
            if got != announced:
                self.events.emit(
                    "weight_sync_failed",
                    f"weights v{version}: checksum {got[:12]} != announced {announced[:12]}; keeping v{self.version}",
                    severity="error",
                    version=version,
                )
                raise WeightSyncError(
                    f"rollout {self.index}: weights v{version} checksum {got[:12]} does not match "
                    f"announced {announced[:12]}; still serving v{self.version}"
                )
            self.policy.load_state_dict(state, strict=True)
            self.version, self.checksum = version, got
        return {"rank": self.index, "version": version, "checksum": got}

    def generate(self, step: int, prompts: torch.Tensor, expected_version: int) -> dict[str, Any]:
        self.rt.faults.check(step)
        if self.version != expected_version:
            msg = f"rollout {self.index}: step {step} expects weights v{expected_version}, worker holds v{self.version}"
            if not self.cfg.rollout.allow_stale_weights:
                self.events.emit("stale_weights", msg, severity="error", step=step)
                raise StaleWeightsError(msg)
            self.events.emit("stale_weights", msg + " (allowed by config)", severity="warning", step=step)
        g = self.cfg.grpo
        t0 = time.perf_counter()
        with self.inst.step(step), self.inst.phase("rollout"):
            responses, logprobs = generate(
                self.policy,
                prompts,
                self.task.response_len,
                temperature=g.temperature,
                top_p=g.top_p,
                generator=generator(self.cfg.run.seed, step, "rollout", self.index),
            )
            self.rt.faults.slow_down(time.perf_counter() - t0)
        gen_s = time.perf_counter() - t0
        self.rt.publish(timings={"rollout": gen_s}, metrics={"weight_version": float(self.version)})
        return {
            "responses": responses,
            "logprobs": logprobs,
            "weight_version": self.version,
            "checksum": self.checksum,
            "gen_s": gen_s,
            "tokens": int(responses.numel()),
        }

    def health(self) -> dict[str, Any]:
        return {"ok": True, "version": self.version, "checksum": self.checksum}

    def shutdown(self) -> None:
        self.rt.close()


def rollout_worker_class(cfg: JobConfig) -> type[TorchRolloutWorker] | type[SGLangRolloutWorker]:
    """The rollout worker class of ``rollout.backend``: the embedded torch generator or an SGLang client."""
    if cfg.rollout.backend == "sglang":
        from .backends.sglang_rollout import SGLangRolloutWorker

        return SGLangRolloutWorker
    return TorchRolloutWorker
