"""Building the Megatron model: the TransformerConfig, the GPTModel, and its canonical initial weights."""

from __future__ import annotations

import re
from typing import Any

import torch

from ...model import build_policy
from . import convert as conv
from .layout import MegatronLayout, Param

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


class ModelBuild(MegatronLayout):
    """The model-building part of ``MegatronBackend``."""

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

    def _local_params(self, gpt: Any) -> list[Param]:
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
            out.append(Param(name, p, tp_dim, gated))
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
