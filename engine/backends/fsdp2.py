"""FSDP2 train backend: the Policy sharded with ``fully_shard`` over a 1-D data-parallel mesh.

Bitwise deterministic: data order, init and reductions depend only on (seed, step, world size),
so a resumed run replays the same steps.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..grpo import policy_loss, response_logprobs
from ..model import Policy, build_policy
from ..task import Task
from ..weights import state_checksum
from .base import BackendContext, StepStats, minibatch_parts, note_skipped_update


class FSDP2Backend:
    name = "fsdp2"
    weight_format = "policy"

    def __init__(self) -> None:
        # Any because FSDP2 turns the Policy into a dynamic subclass.
        self.model: Any = None
        self.optim: Any = None
        self.ref: Policy | None = None
        self.poison_next = False  # the ``nan`` fault: this rank's next loss becomes NaN
        self.skipped_updates = 0

    def setup(self, ctx: BackendContext) -> dict[str, Any]:
        self.ctx = ctx
        cfg = ctx.cfg
        self.rank, self.world_size = ctx.rank, ctx.world_size
        mesh = init_device_mesh(ctx.device.type, (self.world_size,), mesh_dim_names=("dp",))
        self.task = Task(cfg.task)
        model = build_policy(cfg.model, self.task.vocab_size, cfg.run.seed).to(ctx.device)
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        self.model = model
        self.optim = torch.optim.AdamW(
            model.parameters(), lr=cfg.grpo.lr, betas=(0.9, 0.99), weight_decay=0.0
        )
        if cfg.grpo.kl_coef > 0:
            self.ref = build_policy(cfg.model, self.task.vocab_size, cfg.run.seed).to(ctx.device).eval()
            self.ref.requires_grad_(False)
        return {"data_parallel_size": self.world_size}

    def train_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step per minibatch over this rank's share of the global batch."""
        assert self.model is not None and self.optim is not None
        cfg = self.ctx.cfg.grpo
        prompts, responses, adv = batch["prompts"], batch["responses"], batch["advantages"]
        n, resp_len = responses.shape
        # This rank's share of each minibatch; old log-probs for all of them in one pass.
        parts = minibatch_parts(n, cfg.minibatches, self.world_size, self.rank)
        mine = torch.cat(parts)
        with torch.no_grad():
            old_logp = response_logprobs(self.model, prompts[mine], responses[mine])
            ref_logp = response_logprobs(self.ref, prompts[mine], responses[mine]) if self.ref else None
        sums = StepStats()
        offset = 0
        for local in parts:
            idx = slice(offset, offset + len(local))
            offset += len(local)
            global_tokens = (n // cfg.minibatches) * resp_len
            new_logp = response_logprobs(self.model, prompts[local], responses[local])
            loss, stats = policy_loss(
                new_logp,
                old_logp[idx],
                adv[local],
                clip_eps=cfg.clip_eps,
                kl_coef=cfg.kl_coef,
                ref_logp=ref_logp[idx] if ref_logp is not None else None,
                token_count=global_tokens,
            )
            if self.poison_next:
                self.poison_next = False
                loss = loss * float("nan")
            self.optim.zero_grad(set_to_none=True)
            # FSDP2 averages gradients over ranks; the loss is already a share of the global mean.
            (loss * self.world_size).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            # The norm is reduced over all ranks, so every rank takes the same decision: a
            # non-finite gradient skips the update everywhere instead of poisoning the weights.
            if torch.isfinite(grad_norm):
                self.optim.step()
            else:
                self.optim.zero_grad(set_to_none=True)
                self.skipped_updates += 1
                note_skipped_update(self.ctx, step, float(grad_norm), self.skipped_updates)
            sums.add(
                stats, local_tokens=len(local) * resp_len, grad_norm=float(grad_norm), dp=self.world_size
            )
        dist.all_reduce(sums.totals)  # recorded by engine.collectives like every torch.distributed call
        return {**sums.result(cfg.minibatches), "lr": float(self.optim.param_groups[0]["lr"])}

    def export_full_weights(self) -> dict[str, torch.Tensor] | None:
        with self.ctx.inst.collective("all_gather", group="world"):
            full = get_model_state_dict(
                self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        return dict(full) if self.rank == 0 else None  # type: ignore[arg-type]

    def sharded_state_dict(self) -> dict[str, Any]:
        msd, osd = get_state_dict(self.model, self.optim)
        return {"model": msd, "optim": osd}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    def full_state_checksum(self) -> str:
        with self.ctx.inst.collective("all_gather", group="world"):
            msd, osd = get_state_dict(
                self.model, self.optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
        digest = [state_checksum({"model": msd, "optim": osd}) if self.rank == 0 else ""]
        dist.broadcast_object_list(digest, src=0)
        return str(digest[0])

    def close(self) -> None:
        pass
