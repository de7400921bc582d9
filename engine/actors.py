"""The attempt's Ray actors: building trainer ranks and rollout workers (ahead, for a warm
standby, or at once), waiting on their calls, and naming the one that failed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.factory import rollout_worker_class
from .contract.config import JobConfig
from .step_tracing import ROLLOUT_METHODS, TRAINER_METHODS, traced_actor
from .trainer import TrainerRank


def create_trainers(cfg: JobConfig, world_size: int, common: dict[str, Any], *, deferred: bool) -> list[Any]:
    import ray

    cls = ray.remote(num_cpus=1, num_gpus=cfg.trainer.gpus_per_rank, max_restarts=0)(
        traced_actor(TrainerRank, TRAINER_METHODS)
    )
    return [
        cls.remote(cfg, rank=r, world_size=world_size, deferred=deferred, **common) for r in range(world_size)
    ]


def create_workers(cfg: JobConfig, common: dict[str, Any], *, deferred: bool) -> list[Any]:
    import ray

    cls: Any = ray.remote(num_cpus=1, max_restarts=0)(
        traced_actor(rollout_worker_class(cfg), ROLLOUT_METHODS)
    )
    return [cls.remote(cfg, index=i, deferred=deferred, **common) for i in range(cfg.rollout.workers)]


@dataclass
class _Prewarmed:
    attempt: int
    world_size: int
    trainers: list[Any]
    workers: list[Any]  # empty when the rollout backend is not built ahead


_prewarmed: _Prewarmed | None = None


def prewarm_actors(
    cfg: JobConfig,
    run_dir: str | Path,
    *,
    attempt: int,
    world_size: int,
    daemon_url: str | None,
    token: str | None,
) -> None:
    """A warm standby builds its attempt's actors ahead: processes up, torch and the model imported.

    They report nothing until the attempt begins (``start_runtime``). Only on a local cluster
    the standby owns: on a shared cluster they would hold slots the running attempt may need.
    Torch rollout workers only: an SGLang worker launches servers, which must not run twice.
    """
    global _prewarmed
    if cfg.ray.address != "local":
        return
    common = {"run_dir": str(run_dir), "attempt": attempt, "daemon_url": daemon_url, "token": token}
    trainers = create_trainers(cfg, world_size, common, deferred=True)
    workers = create_workers(cfg, common, deferred=True) if cfg.rollout.backend == "torch" else []
    _prewarmed = _Prewarmed(attempt, world_size, trainers, workers)


def take_prewarmed(attempt: int, world_size: int) -> _Prewarmed | None:
    """The actors built ahead for this attempt at this world size, if any (others are let go)."""
    import ray

    global _prewarmed
    pre, _prewarmed = _prewarmed, None
    if pre is None:
        return None
    if pre.attempt == attempt and pre.world_size == world_size:
        return pre
    for a in pre.trainers + pre.workers:
        with contextlib.suppress(Exception):
            ray.kill(a, no_restart=True)
    return None


class ActorFailure(RuntimeError):
    """A trainer rank or rollout worker failed; names which one and why."""

    def __init__(self, role: str, rank: int, cause: BaseException) -> None:
        self.role, self.rank, self.cause = role, rank, cause
        # A RayTaskError wraps the rank's own exception as .cause; name that one.
        inner = getattr(cause, "cause", None) or cause
        self.kind = type(inner).__name__
        self.died = "ActorDied" in self.kind or "ActorUnavailable" in self.kind
        text = str(inner).strip()
        if self.died:
            # Ray's text is a paragraph of possible causes; its first sentence is the fact.
            first = text.split(". ")[0] if text else self.kind
        else:
            first = text.splitlines()[-1] if text else self.kind
        why = "process died" if self.died else f"raised {self.kind}"
        super().__init__(f"{role} {rank} {why}: {first[:300]}")


class InsufficientSlots(RuntimeError):
    """The cluster cannot host even trainer.min_world_size ranks."""


DEATH_GRACE_S = 2.0  # how long a rank's error waits for a peer's death to be reported


def gather(refs: list[Any], actors: list[Any], owners: dict[str, tuple[str, int]]) -> list[Any]:
    """Waits for every call; the first one that fails names its actor at once.

    A failed rank leaves its peers blocked in a collective, so waiting for all of
    them (``ray.get`` on the list) would hide the cause behind a collective timeout.
    A rank that died makes its peers' collectives fail at once ("Connection closed by
    peer"), often before Ray reports the death itself: an error that is not a death
    waits up to ``DEATH_GRACE_S`` for a peer's death, which is then the cause named.
    """
    import ray

    owner = {r.hex(): a for r, a in zip(refs, actors, strict=True)}

    def failure(ref: Any, e: BaseException) -> ActorFailure:
        role, rank = owners.get(owner[ref.hex()]._actor_id.hex(), ("actor", -1))
        return ActorFailure(role, rank, e)

    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:
                first = failure(ref, e)
                raise (first if first.died else _death_among(pending, failure) or first) from e
    return list(ray.get(refs))


def _death_among(
    pending: list[Any], failure: Callable[[Any, BaseException], ActorFailure]
) -> ActorFailure | None:
    """The first of ``pending`` whose actor is reported dead within ``DEATH_GRACE_S``, if any."""
    import ray

    deadline = time.monotonic() + DEATH_GRACE_S
    while pending and (left := deadline - time.monotonic()) > 0:
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as e:
                f = failure(ref, e)
                if f.died:
                    return f
    return None
