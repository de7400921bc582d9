"""Megatron-core train backend: GPTModel with tensor (and, on CUDA, pipeline) parallelism.

- Model: ``GPTModel`` (local layer spec, RMSNorm, no biases) sized by ``[model]`` and the
  task's vocab (padded to ``megatron.make_vocab_size_divisible_by``). Architecture
  "policy" is the same network as ``engine.model.Policy`` and starts from the same weights;
  "llama" (RoPE, SwiGLU, GQA) is HF ``LlamaForCausalLM``, the layout SGLang serves.
- Parallelism: ``parallel_state.initialize_model_parallel`` with the configured TP and PP
  sizes; the rest of the world is data parallel. Rank order is Megatron's "tp-cp-ep-dp-pp".
- Loss: GRPO's clipped policy loss (engine.grpo.policy_loss) on log-probs from Megatron's
  vocab-parallel cross entropy, with the padded vocab columns masked out.
- On CUDA: Megatron's DDP, its optimizer (the distributed optimizer when
  ``use_distributed_optimizer``) and its pipeline schedules. On CPU (gloo): the two CUDA
  patches of engine/backends/megatron/cpu.py, a plain microbatch loop (PP=1), AdamW with the
  gradients all-reduced over the data-parallel group and clipped by the global norm
  (tensor-parallel duplicates counted once) — the math of Megatron's optimizer, without
  its CUDA-only buffers.
- Checkpoints: a DCP state dict of DTensors over a (pp, dp, tp) device mesh, in the
  canonical full layout of engine/backends/megatron/convert.py, so DCP reshards when the
  TP size or the world size changes. The same layout gives the TP-invariant checksum.
- Weights for the rollout side are gathered across TP (and PP) on global rank 0 and mapped
  to ``Policy`` names (embedded rollout) or HF Llama names (SGLang).

The parts: layout.py (the parallel layout, shards <-> full tensors), model.py (building),
train_step.py (forward and GRPO updates), state.py (checkpoint state, weight export),
optim.py (the optimizers), convert.py (weight layouts), cpu.py (the CPU patches).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

from ...contract.events import EventKind
from ...task import Task
from ..base import BackendContext
from .layout import rebind_megatron_collectives
from .model import ModelBuild
from .optim import CpuOptimizer, MegatronOptimizer
from .state import CheckpointState
from .train_step import TrainStep


class MegatronBackend(ModelBuild, TrainStep, CheckpointState):
    name = "megatron"

    def __init__(self) -> None:
        self.weight_format = "policy"
        self.model: Any = None  # what the forward runs (DDP-wrapped on CUDA)
        self.ref: Any = None
        self.optim: Any = None
        self.poison_next = False  # the ``nan`` fault: this rank's next loss becomes NaN
        self.skipped_updates = 0

    # -- set-up ---------------------------------------------------------------
    def setup(self, ctx: BackendContext) -> dict[str, Any]:
        self.ctx = ctx
        cfg, m = ctx.cfg, ctx.cfg.megatron
        self.mcfg = m
        self.cuda = ctx.device.type == "cuda"
        self.weight_format = m.weight_format()
        tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
        if ctx.world_size % (tp * pp):
            raise ValueError(
                f"megatron.tensor_model_parallel_size={tp} x pipeline_model_parallel_size={pp}: "
                f"must divide the trainer world size {ctx.world_size}"
            )
        if not self.cuda:
            for field, value, bad in (
                ("pipeline_model_parallel_size", pp, pp > 1),
                ("bf16", m.bf16, m.bf16),
            ):
                if bad:
                    raise ValueError(
                        f"megatron.{field}={value!r}: needs CUDA (Megatron's pipeline schedules and "
                        "mixed-precision optimizer allocate on the GPU); this rank has none"
                    )
        # Notices about optional CUDA extensions and tunables that do not apply here.
        warnings.filterwarnings(
            "ignore", message=".*(Transformer Engine|Apex|CUDA_DEVICE_MAX_CONNECTIONS|cuda_graph_scope).*"
        )
        from megatron.core import parallel_state as ps

        rebind_megatron_collectives()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            distributed_timeout_minutes=max(1, math.ceil(ctx.timeout.total_seconds() / 60)),
        )
        self.ps = ps
        if self.cuda:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(cfg.run.seed)
        else:
            from . import cpu

            cpu.apply()
        self.tp, self.pp = tp, pp
        self.dp = ctx.world_size // (tp * pp)
        self.tp_rank = ps.get_tensor_model_parallel_rank()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.dp_rank = ps.get_data_parallel_rank()
        self.first_stage = ps.is_pipeline_first_stage()
        self.last_stage = ps.is_pipeline_last_stage()
        expect = self.tp_rank + tp * (self.dp_rank + self.dp * self.pp_rank)
        if expect != ctx.rank:
            raise RuntimeError(
                f"rank {ctx.rank}: Megatron placed it at tp/dp/pp {self.tp_rank}/{self.dp_rank}/{self.pp_rank}"
            )
        self._name_groups()

        self.task = Task(cfg.task)
        self.vocab = self.task.vocab_size
        self.padded_vocab = m.padded_vocab_size(self.vocab)
        if self.padded_vocab % tp:
            raise ValueError(
                f"megatron.make_vocab_size_divisible_by={m.make_vocab_size_divisible_by}: the padded vocab "
                f"{self.padded_vocab} must be divisible by tensor_model_parallel_size={tp}"
            )
        self.groups = m.num_query_groups or cfg.model.n_heads
        # TP/PP divisibility of heads, d_ff, layers and query groups: checked once, by JobConfig.
        self.tcfg = self._transformer_config()
        gpt = self._build_gpt()
        self.gpt = gpt
        self.params = self._local_params(gpt)
        initial = self._initial_weights()
        self._load_full(self.params, initial)
        if cfg.grpo.kl_coef > 0:
            self.ref = self._build_gpt()
            self._load_full(self._local_params(self.ref), initial)
            self.ref.requires_grad_(False)
            self.ref.eval()
        self.optim = MegatronOptimizer(self, gpt) if self.cuda else CpuOptimizer(self, gpt)
        self.model = self.optim.model
        self._mesh: Any = None
        self._device_mesh()  # a collective (new groups): now, with every rank here
        ctx.events.emit(
            EventKind.MEGATRON_LAYOUT,
            f"rank {ctx.rank}: Megatron tp {self.tp_rank}/{tp}, pp {self.pp_rank}/{pp}, dp {self.dp_rank}/{self.dp}"
            + (
                ""
                if self.cuda
                else "; CPU: gloo, AdamW with DP all-reduce (the distributed optimizer needs CUDA)"
            ),
            tp=tp,
            pp=pp,
            dp=self.dp,
            architecture=m.architecture,
        )
        return {
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "data_parallel_size": self.dp,
            "tp_rank": self.tp_rank,
            "pp_rank": self.pp_rank,
            "dp_rank": self.dp_rank,
        }

    def close(self) -> None:
        with contextlib.suppress(Exception):  # best effort at shutdown
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
