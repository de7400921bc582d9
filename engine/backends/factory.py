"""The backends a job names: its train backend and its rollout worker class, imported lazily.

Kept out of base.py so that the protocols import none of their implementations (the
implementations import base.py) and a job loads only the backends it uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import TrainBackend

if TYPE_CHECKING:
    from ..contract.config import JobConfig
    from ..rollout import RolloutWorkerBase


def make_backend(name: str) -> TrainBackend:
    if name == "fsdp2":
        from .fsdp2 import FSDP2Backend

        return FSDP2Backend()
    if name == "megatron":
        from .megatron.backend import MegatronBackend

        return MegatronBackend()
    raise ValueError(f"trainer.backend={name!r}: no such train backend")


def rollout_worker_class(cfg: JobConfig) -> type[RolloutWorkerBase]:
    """The rollout worker class of ``rollout.backend``: the embedded torch generator or an SGLang client."""
    if cfg.rollout.backend == "sglang":
        from .sglang.worker import SGLangRolloutWorker

        return SGLangRolloutWorker
    from ..rollout import TorchRolloutWorker

    return TorchRolloutWorker
