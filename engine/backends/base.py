"""The train backend protocol: what a trainer rank asks of FSDP2, Megatron-core or any other.

``TrainerRank`` (engine/trainer.py) owns the process group, the checkpoint store and its
atomic commit, events, the instrument and the reporter; a backend owns the model, the
optimizer and every collective of its own parallelism. The contract:

- ``setup(ctx)`` after ``init_process_group``: build the model and optimizer from the job.
- ``train_step(step, batch)``: GRPO minibatch updates over this rank's share of the global
  batch (every rank receives the whole batch); returns global stats, the same on every rank.
- ``export_full_weights()``: a collective; rank 0 gets the full (unsharded) weights in the
  layout named by ``weight_format`` (``"policy"``: ``engine.model.Policy``'s state_dict, which
  the embedded rollout loads as is), other ranks get None.
- ``sharded_state_dict()`` / ``load_sharded_state_dict(state)``: model + optimizer state as a
  torch.distributed.checkpoint state dict (DTensor shards), so one DCP save/load path serves
  every backend and DCP reshards when the world size or the parallel layout changes.
- ``full_state_checksum()``: a collective; the same digest on every rank, invariant under the
  world size and parallel layout, over the full model and optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from ..config import JobConfig
    from ..events import EventSink
    from ..instrument import RankInstrument

WEIGHT_FORMATS = ("policy", "hf_llama")


@dataclass
class BackendContext:
    cfg: JobConfig
    rank: int
    world_size: int
    device: torch.device
    timeout: timedelta
    inst: RankInstrument
    events: EventSink


class TrainBackend(Protocol):
    name: str
    weight_format: str

    def setup(self, ctx: BackendContext) -> dict[str, Any]: ...
    def train_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]: ...
    def export_full_weights(self) -> dict[str, torch.Tensor] | None: ...
    def sharded_state_dict(self) -> dict[str, Any]: ...
    def load_sharded_state_dict(self, state: dict[str, Any]) -> None: ...
    def full_state_checksum(self) -> str: ...
    def close(self) -> None: ...


def minibatch_parts(n: int, minibatches: int, shards: int, index: int) -> list[torch.Tensor]:
    """Row indices of data shard ``index`` (of ``shards``) of each GRPO minibatch of an ``n``-row batch."""
    return [torch.tensor_split(mb, shards)[index] for mb in torch.tensor_split(torch.arange(n), minibatches)]


def make_backend(name: str) -> TrainBackend:
    if name == "fsdp2":
        from .fsdp2 import FSDP2Backend

        return FSDP2Backend()
    if name == "megatron":
        from .megatron import MegatronBackend

        return MegatronBackend()
    raise ValueError(f"trainer.backend={name!r}: no such train backend")
