"""The parallel layout of a Megatron rank, and the moves between TP shards and canonical full tensors.

``MegatronLayout`` is the base the backend's parts share (model, train step, state,
export): the attributes ``setup`` fills in, and the shard/gather collectives. The full
layout is engine/backends/megatron/convert.py's canonical one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ...task import Task
from ..base import BackendContext


def rebind_megatron_collectives() -> None:
    """Megatron binds ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` to module globals at
    import time (tensor-parallel layers and mappings, DDP's grad buffers, MTP); point them at the
    current ``torch.distributed`` functions, so collective tracking installed on the module
    (engine/collectives.py) sees those calls too. Everything else Megatron calls through
    ``torch.distributed.<fn>`` at call time: all_reduce, all_gather, broadcast, barrier,
    all_to_all_single, isend/irecv/batch_isend_irecv."""
    import importlib

    for name in (
        "megatron.core.tensor_parallel.mappings",
        "megatron.core.tensor_parallel.layers",
        "megatron.core.distributed.param_and_grad_buffer",
        "megatron.core.transformer.multi_token_prediction",
    ):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for attr, fn in (
            ("dist_all_gather_func", dist.all_gather_into_tensor),
            ("dist_reduce_scatter_func", dist.reduce_scatter_tensor),
        ):
            if hasattr(mod, attr):
                setattr(mod, attr, fn)


@dataclass
class Param:
    name: str  # canonical (global layer index)
    param: torch.nn.Parameter
    tp_dim: int | None  # dimension split across tensor-parallel ranks; None: replicated
    gated: bool  # a gated MLP's linear_fc1: [gate_r; up_r] per TP shard


class MegatronLayout:
    """What ``MegatronBackend.setup`` fills in, and the shard/gather moves over it."""

    ctx: BackendContext
    mcfg: Any  # the job's MegatronConfig
    cuda: bool
    weight_format: str
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    first_stage: bool
    last_stage: bool
    ps: Any  # megatron.core.parallel_state
    task: Task
    vocab: int
    padded_vocab: int
    groups: int  # query groups
    tcfg: Any  # TransformerConfig
    gpt: Any
    params: list[Param]
    model: Any  # what the forward runs (DDP-wrapped on CUDA)
    ref: Any
    optim: Any
    poison_next: bool
    skipped_updates: int

    def _name_groups(self) -> None:
        try:
            from ...collectives import name_group
        except ImportError:  # collective tracking not present
            return
        ps = self.ps
        for name, group in (
            ("tp", ps.get_tensor_model_parallel_group()),
            ("pp", ps.get_pipeline_model_parallel_group()),
            ("dp", ps.get_data_parallel_group()),
            ("mp", ps.get_model_parallel_group()),
        ):
            name_group(group, name)

    # -- shards <-> full tensors ------------------------------------------------
    def _shard(self, p: Param, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's piece of the canonical full tensor of ``p``."""
        if p.tp_dim is None:
            return full
        if p.gated:
            gate, up = full.chunk(2, dim=0)
            return torch.cat([gate.chunk(self.tp)[self.tp_rank], up.chunk(self.tp)[self.tp_rank]])
        return full.chunk(self.tp, dim=p.tp_dim)[self.tp_rank]

    def _load_full(self, params: list[Param], full: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for p in params:
                p.param.copy_(self._shard(p, full[p.name]).to(p.param.dtype))

    def _gather_tp(self, p: Param, local: torch.Tensor) -> torch.Tensor:
        if p.tp_dim is None:
            return local.detach().float().cpu()
        local = local.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        group = self.ps.get_tensor_model_parallel_group()
        with self.ctx.inst.collective(
            "all_gather", group="tp", nbytes=local.numel() * local.element_size() * self.tp
        ):
            dist.all_gather(parts, local, group=group)
        parts = [t.float().cpu() for t in parts]
        if p.gated:
            halves = [t.chunk(2, dim=0) for t in parts]
            return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        return torch.cat(parts, dim=p.tp_dim)

    def _gather_full(self, tensors: list[tuple[Param, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
        """Canonical full tensors of (param, local tensor) pairs on global rank 0; None elsewhere.

        A collective over every rank: TP all-gathers on data-parallel rank 0, then the
        pipeline stages' pieces meet on rank 0."""
        mine: dict[str, torch.Tensor] = {}
        if self.dp_rank == 0:
            for p, t in tensors:
                mine[p.name] = self._gather_tp(p, t)
        if self.pp == 1:
            return mine if self.ctx.rank == 0 else None
        send = mine if (self.dp_rank == 0 and self.tp_rank == 0) else {}
        got: list[Any] | None = [None] * self.ctx.world_size if self.ctx.rank == 0 else None
        with self.ctx.inst.collective("gather", group="world"):
            dist.gather_object(send, got, dst=0)
        if got is None:
            return None
        merged: dict[str, torch.Tensor] = {}
        for d in got:
            merged.update(d or {})
        return merged
