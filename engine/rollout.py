"""Rollout workers: the shared base behind the rollout protocol, and the embedded torch generator.

Weights arrive versioned and checksummed from trainer rank 0; a worker verifies the
checksum before it swaps them in and refuses to generate with any version other than
the one the driver expects (unless ``rollout.allow_stale_weights``, which then says so
in an event). Sampling derives from (seed, step, worker index).

``RolloutWorkerBase`` holds what every rollout backend shares (the rank runtime, the
format and checksum checks of a weight packet, the staleness check, timing and reporting
of a generation, info, health, shutdown); a backend supplies ``_load_weights`` and
``_sample``. The SGLang worker lives in engine/backends/sglang/worker.py.
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Any

import torch

from .contract.config import JobConfig
from .contract.enums import Role, Severity
from .contract.events import EventKind
from .generate import generate
from .model import build_policy
from .runtime import RuntimeActor, RuntimeArgs
from .seeding import generator
from .stack_helper import current_node_id
from .task import Task
from .weights import state_checksum

if TYPE_CHECKING:
    from typing_extensions import Unpack


class WeightSyncError(RuntimeError):
    """Received weights do not match their announced checksum."""


class StaleWeightsError(RuntimeError):
    """A worker was asked to generate with a weight version it does not hold."""


class RolloutWorkerBase(RuntimeActor):
    """The rollout protocol (update_weights, generate, health) around a backend's load and sample."""

    weight_format = "policy"  # the layout of the weight packets this backend loads
    format_note = ""  # why another layout is refused, for the error

    def __init__(
        self,
        cfg: JobConfig,
        *,
        index: int,
        run_dir: str,
        **runtime: Unpack[RuntimeArgs],
    ) -> None:
        self.cfg, self.index = cfg, index
        self.task = Task(cfg.task)
        self.version = -1  # no weights synced from the trainer yet
        self.checksum = ""
        self.open_runtime(cfg, Role.ROLLOUT, index, run_dir, **runtime)

    def info(self) -> dict[str, Any]:
        return {
            "role": Role.ROLLOUT,
            "rank": self.index,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": current_node_id(),
        }

    # -- weights ----------------------------------------------------------------
    def update_weights(self, packet: dict[str, Any]) -> dict[str, Any]:
        with self.inst.phase("weight_sync"):
            version, announced, state = packet["version"], packet["checksum"], packet["state"]
            fmt = packet.get("format", "policy")
            if fmt != self.weight_format:
                raise WeightSyncError(
                    f"rollout {self.index}: weights v{version} are in format {fmt!r}; {self.format_note}"
                )
            got = state_checksum(state)
            if got != announced:
                self.events.emit(
                    EventKind.WEIGHT_SYNC_FAILED,
                    f"weights v{version}: checksum {got[:12]} != announced {announced[:12]}; keeping v{self.version}",
                    severity=Severity.ERROR,
                    version=version,
                )
                raise WeightSyncError(
                    f"rollout {self.index}: weights v{version} checksum {got[:12]} does not match "
                    f"announced {announced[:12]}; still serving v{self.version}"
                )
            self._load_weights(version, got, state)
        return {"rank": self.index, "version": version, "checksum": got, **self._sync_report()}

    def _load_weights(self, version: int, checksum: str, state: dict[str, torch.Tensor]) -> None:
        """Swaps in verified weights; sets ``version`` and ``checksum``."""
        raise NotImplementedError

    def _sync_report(self) -> dict[str, Any]:
        """What ``update_weights`` returns beyond rank, version and checksum."""
        return {}

    # -- generation ---------------------------------------------------------------
    def generate(self, step: int, prompts: torch.Tensor, expected_version: int) -> dict[str, Any]:
        self.rt.faults.check(step)
        if self.version != expected_version:
            msg = f"rollout {self.index}: step {step} expects weights v{expected_version}, worker holds v{self.version}"
            if not self.cfg.rollout.allow_stale_weights:
                self.events.emit(EventKind.STALE_WEIGHTS, msg, severity=Severity.ERROR, step=step)
                raise StaleWeightsError(msg)
            self.events.emit(
                EventKind.STALE_WEIGHTS, msg + " (allowed by config)", severity=Severity.WARNING, step=step
            )
        t0 = time.perf_counter()
        with self.inst.step(step), self.inst.phase("rollout"):
            responses, logprobs = self._sample(step, prompts, expected_version)
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

    def _sample(
        self, step: int, prompts: torch.Tensor, expected_version: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, R] response token ids and their log-probs under the held weights."""
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        return {"ok": True, "version": self.version, "checksum": self.checksum}

    def shutdown(self) -> None:
        self.rt.close()


class TorchRolloutWorker(RolloutWorkerBase):
    """The embedded generator: ``engine.model.Policy`` in this process, sampled with torch."""

    format_note = (
        "the embedded torch rollout loads 'policy' weights (use rollout.backend='sglang' for HF layouts)"
    )

    def __init__(self, cfg: JobConfig, *, index: int, run_dir: str, **runtime: Unpack[RuntimeArgs]) -> None:
        torch.set_num_threads(cfg.rollout.threads_per_worker)
        super().__init__(cfg, index=index, run_dir=run_dir, **runtime)
        self.policy = build_policy(cfg.model, self.task.vocab_size, cfg.run.seed).eval()
        self.inst.set_phase("idle")

    def _load_weights(self, version: int, checksum: str, state: dict[str, torch.Tensor]) -> None:
        self.policy.load_state_dict(state, strict=True)
        self.version, self.checksum = version, checksum

    def _sample(
        self, step: int, prompts: torch.Tensor, expected_version: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.cfg.grpo
        return generate(
            self.policy,
            prompts,
            self.task.response_len,
            temperature=g.temperature,
            top_p=g.top_p,
            generator=generator(self.cfg.run.seed, step, "rollout", self.index),
        )
