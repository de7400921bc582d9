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

from ..contract.enums import Severity
from ..contract.events import EventKind

if TYPE_CHECKING:
    from ..contract.config import JobConfig
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


def note_skipped_update(ctx: BackendContext, step: int, grad_norm: float, skipped: int) -> None:
    """A non-finite gradient norm (the same on every rank): the update was skipped everywhere."""
    ctx.events.emit(
        EventKind.NONFINITE_GRADIENTS,
        f"step {step}: gradient norm {grad_norm}; update skipped on every rank",
        severity=Severity.ERROR,
        step=step,
        skipped_updates=skipped,
    )


class StepStats:
    """A rank's sums over its minibatches, all-reduced (``totals``) into the step's global figures.

    ``policy_loss`` with the global token count makes each data-parallel rank's ``loss`` its
    share of the minibatch's global mean: the shares add up to it, whatever the world size.
    The other stats are per-rank means, weighted by the rank's tokens.
    """

    def __init__(self) -> None:
        self.totals = torch.zeros(5, dtype=torch.float64)  # loss shares, clipped, kl, tokens, grad norm

    def add(self, stats: dict[str, float], *, local_tokens: int, grad_norm: float, dp: int) -> None:
        self.totals += torch.tensor(
            [
                stats["loss"],
                stats["clip_frac"] * local_tokens,
                stats["kl"] * local_tokens,
                local_tokens,
                grad_norm / dp,  # the same on every rank: the reduced sum is the norm
            ],
            dtype=torch.float64,
        )

    def result(self, minibatches: int) -> dict[str, float]:
        """After the all-reduce of ``totals``: the step's means over its minibatches."""
        t = self.totals
        tokens = max(t[3].item(), 1.0)
        return {
            "loss": t[0].item() / minibatches,
            "clip_frac": t[1].item() / tokens,
            "kl": t[2].item() / tokens,
            "grad_norm": t[4].item() / minibatches,
            "train_tokens": t[3].item(),
        }
