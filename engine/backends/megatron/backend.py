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
  patches of engine/backends/megatron_cpu.py, a plain microbatch loop (PP=1), AdamW with the
  gradients all-reduced over the data-parallel group and clipped by the global norm
  (tensor-parallel duplicates counted once) — the math of Megatron's optimizer, without
  its CUDA-only buffers.
- Checkpoints: a DCP state dict of DTensors over a (pp, dp, tp) device mesh, in the
  canonical full layout of engine/backends/megatron_convert.py, so DCP reshards when the
  TP size or the world size changes. The same layout gives the TP-invariant checksum.
- Weights for the rollout side are gathered across TP (and PP) on global rank 0 and mapped
  to ``Policy`` names (embedded rollout) or HF Llama names (SGLang).
"""

from __future__ import annotations

import functools
import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..grpo import policy_loss
from ..model import build_policy
from ..task import Task
from ..weights import state_checksum
from . import megatron_convert as conv
from .base import BackendContext, StepStats, minibatch_parts, note_skipped_update

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] bool, True where attention is masked (Megatron's convention)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


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
class _Param:
    name: str  # canonical (global layer index)
    param: torch.nn.Parameter
    tp_dim: int | None  # dimension split across tensor-parallel ranks; None: replicated
    gated: bool  # a gated MLP's linear_fc1: [gate_r; up_r] per TP shard


class MegatronBackend:
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
            from . import megatron_cpu

            megatron_cpu.apply()
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
        self._check_divisible()
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
        self.optim = _MegatronOptimizer(self, gpt) if self.cuda else _CpuOptimizer(self, gpt)
        self.model = self.optim.model
        self._mesh: Any = None
        self._device_mesh()  # a collective (new groups): now, with every rank here
        ctx.events.emit(
            "megatron_layout",
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

    def _name_groups(self) -> None:
        try:
            from ..collectives import name_group
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

    def _check_divisible(self) -> None:
        mc, tp, pp = self.ctx.cfg.model, self.tp, self.pp
        for field, value, by, why in (
            ("model.n_heads", mc.n_heads, tp, "tensor_model_parallel_size"),
            ("model.d_ff", mc.d_ff, tp, "tensor_model_parallel_size"),
            ("model.n_layers", mc.n_layers, pp, "pipeline_model_parallel_size"),
            ("megatron.num_query_groups", self.groups, tp, "tensor_model_parallel_size"),
        ):
            if value % by:
                raise ValueError(f"{field}={value}: must be divisible by megatron.{why}={by}")
        if mc.n_heads % self.groups:
            raise ValueError(
                f"megatron.num_query_groups={self.groups}: must divide model.n_heads={mc.n_heads}"
            )

    def _transformer_config(self) -> Any:
        from megatron.core.transformer.transformer_config import TransformerConfig

        mc, m = self.ctx.cfg.model, self.mcfg
        llama = m.architecture == "llama"
        dtype = torch.bfloat16 if m.bf16 else torch.float32
        return TransformerConfig(
            num_layers=mc.n_layers,
            hidden_size=mc.d_model,
            num_attention_heads=mc.n_heads,
            num_query_groups=self.groups,
            ffn_hidden_size=mc.d_ff,
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            pipeline_dtype=dtype,
            params_dtype=dtype,
            bf16=m.bf16,
            normalization="RMSNorm",
            # Policy's nn.RMSNorm(eps=None) uses the dtype's epsilon.
            layernorm_epsilon=m.norm_epsilon if llama else torch.finfo(torch.float32).eps,
            add_bias_linear=False,
            add_qkv_bias=False,
            gated_linear_unit=llama,
            activation_func=torch.nn.functional.silu if llama else torch.nn.functional.gelu,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            persist_layer_norm=False,
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            use_cpu_initialization=not self.cuda,
            # Megatron's init also marks the tensor-parallel params; the canonical initial state replaces it.
            perform_initialization=True,
            sequence_parallel=False,
        )

    def _build_gpt(self) -> Any:
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        m, mc = self.mcfg, self.ctx.cfg.model
        gpt = GPTModel(
            config=self.tcfg,
            transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
            vocab_size=self.padded_vocab,
            max_sequence_length=mc.max_seq_len,
            pre_process=self.first_stage,
            post_process=self.last_stage,
            parallel_output=True,
            share_embeddings_and_output_weights=False,
            position_embedding_type="rope" if m.architecture == "llama" else "learned_absolute",
            rotary_base=int(m.rotary_base),
        )
        return gpt.to(self.ctx.device)

    def _local_params(self, gpt: Any) -> list[_Param]:
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        offset = get_transformer_layer_offset(self.tcfg)
        out = []
        for name, p in gpt.named_parameters():
            if (mm := _LAYER.match(name)) is not None:
                name = f"decoder.layers.{int(mm.group(1)) + offset}.{name[mm.end() :]}"
            tp_dim = (
                int(p.partition_dim) if getattr(p, "tensor_model_parallel", False) and self.tp > 1 else None
            )
            gated = self.tcfg.gated_linear_unit and name.endswith("mlp.linear_fc1.weight")
            out.append(_Param(name, p, tp_dim, gated))
        return out

    def _initial_weights(self) -> dict[str, torch.Tensor]:
        """Canonical full initial weights, a function of the seed only (any TP/PP layout)."""
        cfg = self.ctx.cfg
        if self.mcfg.architecture == "llama":
            return conv.init_llama_megatron(
                cfg.model,
                groups=self.groups,
                padded_vocab=self.padded_vocab,
                vocab=self.vocab,
                seed=cfg.run.seed,
            )
        policy = build_policy(cfg.model, self.vocab, cfg.run.seed)
        return conv.policy_to_megatron(policy.state_dict(), cfg.model, self.padded_vocab)

    # -- shards <-> full tensors ------------------------------------------------
    def _shard(self, p: _Param, full: torch.Tensor) -> torch.Tensor:
        """This TP rank's piece of the canonical full tensor of ``p``."""
        if p.tp_dim is None:
            return full
        if p.gated:
            gate, up = full.chunk(2, dim=0)
            return torch.cat([gate.chunk(self.tp)[self.tp_rank], up.chunk(self.tp)[self.tp_rank]])
        return full.chunk(self.tp, dim=p.tp_dim)[self.tp_rank]

    def _load_full(self, params: list[_Param], full: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for p in params:
                p.param.copy_(self._shard(p, full[p.name]).to(p.param.dtype))

    def _gather_tp(self, p: _Param, local: torch.Tensor) -> torch.Tensor:
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

    def _gather_full(self, tensors: list[tuple[_Param, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
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

    def _to_rollout_layout(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mc = self.ctx.cfg.model
        if self.weight_format == "hf_llama":
            return conv.megatron_to_hf_llama(full, mc, groups=self.groups, vocab=self.vocab)
        return conv.megatron_to_policy(full, mc, self.vocab)

    # -- forward ----------------------------------------------------------------
    def _forward(self, model: Any, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, padded_vocab / tp] on the last stage (hidden states before it)."""
        t = tokens.shape[1]
        pos = torch.arange(t, device=tokens.device)[None].expand(tokens.shape[0], t)
        return model(tokens, pos, causal_mask(t, tokens.device))

    def _token_logprobs(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets) from vocab-parallel logits, the vocab padding excluded."""
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        part = logits.shape[-1]
        start = self.tp_rank * part
        if start + part > self.vocab:
            col = torch.arange(start, start + part, device=logits.device)
            logits = logits.masked_fill(col >= self.vocab, float("-inf"))
        return -vocab_parallel_cross_entropy(logits.float().contiguous(), targets)

    def _run(
        self,
        model: Any,
        microbatches: list[dict[str, Any]],
        loss_fn: Callable[[dict[str, Any], torch.Tensor], tuple[torch.Tensor, dict[str, Any]]],
        *,
        forward_only: bool,
    ) -> list[dict[str, Any]]:
        """Runs forward (and backward) over microbatches; returns what ``loss_fn`` reported, on the last stage."""

        def forward_step(data: Iterator[dict[str, Any]], mdl: Any) -> tuple[torch.Tensor, Callable[..., Any]]:
            mb = next(data)
            return self._forward(mdl, mb["tokens"]), functools.partial(loss_fn, mb)

        seq_len = microbatches[0]["tokens"].shape[1]
        if self.cuda:
            from megatron.core.pipeline_parallel import get_forward_backward_func

            out = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(microbatches),
                model=[model],
                num_microbatches=len(microbatches),
                seq_length=seq_len,
                micro_batch_size=microbatches[0]["tokens"].shape[0],
                forward_only=forward_only,
            )
            return list(out) if self.last_stage else []
        # CPU: Megatron's schedule without pipelining (PP=1), minus its CUDA allocations.
        reports = []
        data = iter(microbatches)
        with torch.set_grad_enabled(not forward_only):
            for _ in microbatches:
                output, loss_func = forward_step(data, model)
                loss, reported = loss_func(output)
                if not forward_only:
                    (loss / len(microbatches)).backward()
                reports.append(reported)
        return reports

    def _response_logprobs(
        self, model: Any, prompts: torch.Tensor, responses: torch.Tensor
    ) -> torch.Tensor | None:
        """[N, R] log-probs of ``responses`` (no grad) on the last stage; None on other stages."""
        p = prompts.shape[1]

        def report(mb: dict[str, Any], logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            logp = self._token_logprobs(logits[:, p - 1 :], mb["responses"])
            return logp.sum() * 0.0, {"logp": logp.detach()}

        seq = torch.cat([prompts, responses], dim=1).to(self.ctx.device)
        mb = {"tokens": seq[:, :-1], "responses": responses.to(self.ctx.device)}
        with torch.no_grad():
            out = self._run(model, [mb], report, forward_only=True)
        return out[0]["logp"] if out else None

    # -- training ---------------------------------------------------------------
    def train_step(self, step: int, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        g = self.ctx.cfg.grpo
        dev = self.ctx.device
        prompts, responses, adv = batch["prompts"], batch["responses"], batch["advantages"]
        n, resp_len = responses.shape
        plen = prompts.shape[1]
        parts = minibatch_parts(n, g.minibatches, self.dp, self.dp_rank)
        mine = torch.cat(parts)
        old_logp = self._response_logprobs(self.model, prompts[mine], responses[mine])
        ref_logp = (
            self._response_logprobs(self.ref, prompts[mine], responses[mine])
            if self.ref is not None
            else None
        )
        reporter = self.tp_rank == 0 and self.last_stage  # one rank per data shard reports stats
        sums = StepStats()
        global_tokens = (n // g.minibatches) * resp_len

        def loss_fn(mb: dict[str, Any], logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            new_logp = self._token_logprobs(logits[:, plen - 1 :], mb["responses"])
            loss, stats = policy_loss(
                new_logp,
                mb["old_logp"],
                mb["adv"],
                clip_eps=g.clip_eps,
                kl_coef=g.kl_coef,
                ref_logp=mb["ref_logp"],
                token_count=global_tokens,
            )
            if self.poison_next:
                self.poison_next = False
                loss = loss * float("nan")
            # Gradients are averaged over data-parallel replicas; the loss is a share of the global mean.
            return loss * self.dp, stats

        offset = 0
        for local in parts:
            idx = slice(offset, offset + len(local))
            offset += len(local)
            seq = torch.cat([prompts[local], responses[local]], dim=1).to(dev)
            mb = {
                "tokens": seq[:, :-1],
                "responses": responses[local].to(dev),
                "adv": adv[local].to(dev),
                "old_logp": old_logp[idx] if old_logp is not None else None,
                "ref_logp": ref_logp[idx] if ref_logp is not None else None,
            }
            self.optim.zero_grad()
            reports = self._run(self.model, [mb], loss_fn, forward_only=False)
            grad_norm = self.optim.step()
            if not math.isfinite(grad_norm):
                self.skipped_updates += 1
                note_skipped_update(self.ctx, step, grad_norm, self.skipped_updates)
            if reporter and reports:
                sums.add(reports[0], local_tokens=len(local) * resp_len, grad_norm=grad_norm, dp=self.dp)
        with self.ctx.inst.collective(
            "all_reduce", group="world", nbytes=sums.totals.numel() * 8, dtype="float64"
        ):
            if self.cuda:
                t = sums.totals.to(dev)
                dist.all_reduce(t)
                sums.totals = t.cpu()
            else:
                dist.all_reduce(sums.totals)
        return {**sums.result(g.minibatches), "lr": self.optim.lr()}

    # -- weights and state ------------------------------------------------------
    def export_full_weights(self) -> dict[str, torch.Tensor] | None:
        full = self._gather_full([(p, p.param) for p in self.params])
        return None if full is None else self._to_rollout_layout(full)

    def full_state_checksum(self) -> str:
        weights = self._gather_full([(p, p.param) for p in self.params])
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            moments[key] = self._gather_full([(p, self.optim.state(p)[key]) for p in self.params])
        digest = [""]
        if self.ctx.rank == 0:
            assert weights is not None
            state = {
                "model": self._to_rollout_layout(weights),
                "optim": {
                    "step": int(self.optim.step_count()),
                    **{k: self._to_rollout_layout(v or {}) for k, v in moments.items()},
                },
            }
            digest = [state_checksum(state)]
        dist.broadcast_object_list(digest, src=0)
        return str(digest[0])

    def _device_mesh(self) -> Any:
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(
                self.ctx.device.type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp")
            )
            self._mesh = mesh["dp", "tp"]  # this rank's pipeline stage
        return self._mesh

    def _dtensors(self, p: _Param, local: torch.Tensor) -> dict[str, Any]:
        """DCP entries of one parameter-shaped tensor: DTensor shards of its canonical layout."""
        from torch.distributed.tensor import DTensor, Replicate, Shard

        mesh = self._device_mesh()
        place = [Replicate(), Replicate() if p.tp_dim is None else Shard(p.tp_dim)]
        if p.gated:  # [gate_r; up_r] locally: two entries, so the layout does not depend on the TP size
            # Copies: DCP's async stager cannot stage two views of one storage.
            gate, up = (t.clone() for t in local.chunk(2, dim=0))
            return {
                ".gate": DTensor.from_local(gate, mesh, place, run_check=False),
                ".up": DTensor.from_local(up, mesh, place, run_check=False),
            }
        return {"": DTensor.from_local(local, mesh, place, run_check=False)}

    def sharded_state_dict(self) -> dict[str, Any]:
        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        for p in self.params:
            for suffix, dt in self._dtensors(p, p.param.data).items():
                model[p.name + suffix] = dt
            for key, t in self.optim.state(p).items():
                for suffix, dt in self._dtensors(p, t).items():
                    optim[f"{key}.{p.name}{suffix}"] = dt
        optim["step"] = torch.tensor(float(self.optim.step_count()))
        return {"model": model, "optim": optim}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        def local(d: dict[str, Any], key: str, p: _Param) -> torch.Tensor:
            if p.gated:
                return torch.cat([d[key + ".gate"].to_local(), d[key + ".up"].to_local()])
            return d[key].to_local()

        with torch.no_grad():
            for p in self.params:
                src = local(state["model"], p.name, p)
                if src.data_ptr() != p.param.data.data_ptr():
                    p.param.data.copy_(src)
                for key, t in self.optim.state(p).items():
                    src = local(state["optim"], f"{key}.{p.name}", p)
                    if src.data_ptr() != t.data_ptr():
                        t.copy_(src)
            self.optim.set_step_count(int(state["optim"]["step"].item()))
        self.optim.loaded()

    def close(self) -> None:
        try:
            from megatron.core import parallel_state as ps

            ps.destroy_model_parallel()
        except Exception:  # noqa: S110 -- best effort at shutdown
            pass


class _CpuOptimizer:
    """AdamW over the TP-local parameters: DP all-reduce of gradients, clipping by the global norm."""

    def __init__(self, be: MegatronBackend, gpt: Any) -> None:
        self.be, self.model = be, gpt
        g = be.ctx.cfg.grpo
        self.params = [p.param for p in be.params]
        self.opt = torch.optim.AdamW(self.params, lr=g.lr, betas=(0.9, 0.99), weight_decay=0.0)
        for p in self.params:  # state exists before the first step, so a checkpoint can load into it
            self.opt.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        self.counted = [param_is_not_tensor_parallel_duplicate(p) for p in self.params]

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> float:
        be = self.be
        ps, inst = be.ps, be.ctx.inst
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if be.dp > 1:
            flat = torch.cat([gr.reshape(-1) for gr in grads])
            with inst.collective("all_reduce", group="dp", nbytes=flat.numel() * flat.element_size()):
                dist.all_reduce(flat, group=ps.get_data_parallel_group())
            flat /= be.dp
            off = 0
            for gr in grads:
                gr.copy_(flat[off : off + gr.numel()].view_as(gr))
                off += gr.numel()
        sq = torch.zeros((), dtype=torch.float32)
        for gr, counted in zip(grads, self.counted, strict=True):
            if counted:
                sq += gr.float().pow(2).sum()
        if be.tp * be.pp > 1:
            with inst.collective("all_reduce", group="mp", nbytes=4):
                dist.all_reduce(sq, group=ps.get_model_parallel_group())
        norm = float(sq.sqrt())
        if not math.isfinite(norm):
            # Reduced over the data- and model-parallel groups: every rank skips this update.
            self.zero_grad()
            return norm
        coef = be.ctx.cfg.grpo.max_grad_norm / (norm + 1e-6)
        for p, gr in zip(self.params, grads, strict=True):
            p.grad = gr * coef if coef < 1.0 else gr
        self.opt.step()
        return norm

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def state(self, p: _Param) -> dict[str, torch.Tensor]:
        s = self.opt.state[p.param]
        return {"exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}

    def step_count(self) -> int:
        return int(self.opt.state[self.params[0]]["step"].item())

    def set_step_count(self, n: int) -> None:
        for p in self.params:
            self.opt.state[p]["step"].fill_(float(n))

    def loaded(self) -> None:
        pass


class _MegatronOptimizer:
    """Megatron's DDP + optimizer (the distributed optimizer when configured); CUDA only."""

    def __init__(self, be: MegatronBackend, gpt: Any) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        m, g = be.mcfg, be.ctx.cfg.grpo
        self.be = be
        if m.bf16 and not m.use_distributed_optimizer:
            raise ValueError("megatron.bf16=true: needs megatron.use_distributed_optimizer=true")
        ddp_cfg = DistributedDataParallelConfig(
            # A non-finite gradient fails the step (and the attempt resumes from a checkpoint)
            # instead of reaching the weights.
            check_for_nan_in_grad=True,
            grad_reduce_in_fp32=m.grad_reduce_in_fp32,
            overlap_grad_reduce=m.overlap_grad_reduce,
            use_distributed_optimizer=m.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(config=be.tcfg, ddp_config=ddp_cfg, module=gpt)
        be.tcfg.finalize_model_grads_func = finalize_model_grads
        be.tcfg.no_sync_func = self.model.no_sync
        self.opt = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=g.lr,
                weight_decay=0.0,
                adam_beta1=0.9,
                adam_beta2=0.99,
                adam_eps=1e-8,
                clip_grad=g.max_grad_norm,
                bf16=m.bf16,
                params_dtype=torch.bfloat16 if m.bf16 else torch.float32,
                use_distributed_optimizer=m.use_distributed_optimizer,
            ),
            [self.model],
        )
        self.distributed = m.use_distributed_optimizer
        self._steps = 0
        self._inner = self._inner_optimizers()
        # Optimizer state exists before the first step, so a checkpoint can load into it (what
        # Adam would create lazily; torch's Adam also wants its per-parameter "step").
        for inner in self._inner:
            opt = inner.optimizer
            torch_adam = type(opt).__module__.startswith("torch.optim")
            for group in opt.param_groups:
                for q in group["params"]:
                    st = opt.state[q]
                    if len(st) == 0:
                        st["exp_avg"] = torch.zeros_like(q.data)
                        st["exp_avg_sq"] = torch.zeros_like(q.data)
                        if torch_adam:
                            st["step"] = torch.tensor(0.0)

    def _inner_optimizers(self) -> list[Any]:
        return list(getattr(self.opt, "chained_optimizers", None) or [self.opt])

    def zero_grad(self) -> None:
        self.model.zero_grad_buffer()
        self.opt.zero_grad()

    def step(self) -> float:
        ok, grad_norm, _ = self.opt.step()
        if not ok:
            self.be.ctx.events.emit(
                "optimizer_step_skipped", "Megatron optimizer skipped a step", severity="warning"
            )
        self._steps += 1
        return float(grad_norm or 0.0)

    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    # Per-parameter state as TP-local tensors of the parameter's shape. With the distributed
    # optimizer each data-parallel rank holds a flat range of each parameter: the ranges are
    # summed over the data-parallel group into whole tensors (and split back on load).
    def _locate(self, param: torch.nn.Parameter) -> tuple[Any, Any] | None:
        for inner in self._inner:
            if self.distributed and param in getattr(inner, "model_param_group_index_map", {}):
                return inner, inner._get_model_param_range_map(param)["param"]
            if not self.distributed:
                for group in inner.optimizer.param_groups:
                    if any(q is param for q in group["params"]):
                        return inner, None
        return None

    def state(self, p: _Param) -> dict[str, torch.Tensor]:
        param = p.param
        found = self._locate(param)
        out = {
            k: torch.zeros(param.shape, dtype=torch.float32, device=param.device)
            for k in ("exp_avg", "exp_avg_sq")
        }
        if found is not None:
            inner, rng = found
            if rng is None:
                st = inner.optimizer.state[param]
                return {k: st[k] for k in out}
            tensors = inner._get_main_param_and_optimizer_states(param)
            for k in out:
                out[k].view(-1)[rng.start : rng.end].copy_(tensors[k])
        if self.distributed and self.be.dp > 1:
            for k in out:
                with self.be.ctx.inst.collective("all_reduce", group="dp"):
                    dist.all_reduce(
                        out[k], group=self.be.ps.get_data_parallel_group(with_context_parallel=True)
                    )
        if self.distributed:
            self._pending = getattr(self, "_pending", {})
            self._pending[id(param)] = out
        return out

    def step_count(self) -> int:
        return self._steps

    def set_step_count(self, n: int) -> None:
        self._steps = n
        for inner in self._inner:
            for group in inner.optimizer.param_groups:
                if "step" in group:
                    group["step"] = n
            for st in inner.optimizer.state.values():
                if "step" in st:
                    st["step"] = torch.full_like(st["step"], float(n)) if torch.is_tensor(st["step"]) else n

    def loaded(self) -> None:
        """After a checkpoint load: scatter the loaded whole tensors back to the distributed optimizer."""
        if self.distributed:
            pending = getattr(self, "_pending", {})
            for p in self.be.params:
                found = self._locate(p.param)
                if found is None or id(p.param) not in pending:
                    continue
                inner, rng = found
                tensors = inner._get_main_param_and_optimizer_states(p.param)
                whole = pending[id(p.param)]
                for k in ("exp_avg", "exp_avg_sq"):
                    tensors[k].copy_(whole[k].view(-1)[rng.start : rng.end])
                tensors["param"].copy_(p.param.detach().view(-1)[rng.start : rng.end].float())
            self._pending = {}
        for inner in self._inner:
            reload = getattr(inner, "reload_model_params", None)
            if reload is not None and not self.distributed:
                reload()
