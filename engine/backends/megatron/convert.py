"""Weight layouts: Megatron-core GPTModel <-> engine.model.Policy, and Megatron -> HF Llama (SGLang).

Torch only (no megatron import). Every function takes or returns the *canonical full*
Megatron layout: each tensor whole (tensor-parallel shards joined), layer indices global
(pipeline stages joined), the vocab padded to ``MegatronConfig.padded_vocab_size``, and
a gated MLP's ``linear_fc1`` as ``[gate; up]`` (Megatron keeps ``[gate_r; up_r]`` per
TP shard; the backend reorders when it joins or splits shards). This layout does not
depend on the parallel sizes, so it is also what checkpoints hold.

Megatron's fused QKV weight is grouped per query group: ``[groups, q_per_group + 2, head_dim, hidden]``
(the queries of the group, then its key, then its value). Policy's ``attn.qkv`` is
``[3, heads, head_dim, hidden]`` and HF Llama has separate ``q_proj``/``k_proj``/``v_proj``.
"""

from __future__ import annotations

import math

import torch

from ...contract.config import ModelConfig

DECODER = "decoder.layers"


def layer_names(i: int) -> dict[str, str]:
    p = f"{DECODER}.{i}"
    return {
        "attn_norm": f"{p}.input_layernorm.weight",
        "qkv": f"{p}.self_attention.linear_qkv.weight",
        "proj": f"{p}.self_attention.linear_proj.weight",
        "mlp_norm": f"{p}.pre_mlp_layernorm.weight",
        "fc1": f"{p}.mlp.linear_fc1.weight",
        "fc2": f"{p}.mlp.linear_fc2.weight",
    }


WORD = "embedding.word_embeddings.weight"
POS = "embedding.position_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t.clone()
    out = torch.zeros((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out


# -- Policy -------------------------------------------------------------------------------


def _policy_names(cfg: ModelConfig) -> dict[str, str]:
    """Policy name -> Megatron name of every tensor both hold as is (the rest: padding, qkv order)."""
    names = {"pos_embed.weight": POS, "norm.weight": FINAL_NORM}
    for i in range(cfg.n_layers):
        n, p = layer_names(i), f"layers.{i}"
        for policy, megatron in (
            ("attn_norm", "attn_norm"),
            ("attn.out", "proj"),
            ("mlp_norm", "mlp_norm"),
            ("ff_in", "fc1"),
            ("ff_out", "fc2"),
        ):
            names[f"{p}.{policy}.weight"] = n[megatron]
    return names


def _swap_qkv(qkv: torch.Tensor, outer: int, inner: int, h: int) -> torch.Tensor:
    """A fused QKV weight viewed as [outer, inner, head_dim, h] with its two leading dims swapped.

    Policy's [3, heads, ...] <-> Megatron's [heads, 3, ...] (one query group per head)."""
    return qkv.view(outer, inner, h // (outer * inner // 3), h).transpose(0, 1).reshape(3 * h, h).clone()


def policy_to_megatron(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, padded_vocab: int
) -> dict[str, torch.Tensor]:
    """A Policy state_dict in the canonical Megatron layout (architecture "policy")."""
    out = {m: sd[p].clone() for p, m in _policy_names(cfg).items()}
    out[WORD] = _pad_rows(sd["embed.weight"], padded_vocab)
    out[OUTPUT] = _pad_rows(sd["head.weight"], padded_vocab)
    for i in range(cfg.n_layers):
        qkv = sd[f"layers.{i}.attn.qkv.weight"]
        out[layer_names(i)["qkv"]] = _swap_qkv(qkv, 3, cfg.n_heads, cfg.d_model)
    return out


def megatron_to_policy(
    full: dict[str, torch.Tensor], cfg: ModelConfig, vocab: int
) -> dict[str, torch.Tensor]:
    """The canonical Megatron layout (architecture "policy") as a Policy state_dict (padding dropped)."""
    out = {p: full[m].clone() for p, m in _policy_names(cfg).items()}
    out["embed.weight"] = full[WORD][:vocab].clone()
    out["head.weight"] = full[OUTPUT][:vocab].clone()
    for i in range(cfg.n_layers):
        qkv = full[layer_names(i)["qkv"]]
        out[f"layers.{i}.attn.qkv.weight"] = _swap_qkv(qkv, cfg.n_heads, 3, cfg.d_model)
    return out


# -- HF Llama -----------------------------------------------------------------------------


def megatron_to_hf_llama(
    full: dict[str, torch.Tensor], cfg: ModelConfig, *, groups: int, vocab: int
) -> dict[str, torch.Tensor]:
    """The canonical Megatron layout (architecture "llama") as an HF ``LlamaForCausalLM`` state_dict."""
    h, heads = cfg.d_model, cfg.n_heads
    hd, qpg = h // heads, heads // groups
    out = {
        "model.embed_tokens.weight": full[WORD][:vocab].clone(),
        "model.norm.weight": full[FINAL_NORM].clone(),
        "lm_head.weight": full[OUTPUT][:vocab].clone(),
    }
    for i in range(cfg.n_layers):
        n, p = layer_names(i), f"model.layers.{i}"
        qkv = full[n["qkv"]].view(groups, qpg + 2, hd, h)
        out[f"{p}.self_attn.q_proj.weight"] = qkv[:, :qpg].reshape(heads * hd, h).clone()
        out[f"{p}.self_attn.k_proj.weight"] = qkv[:, qpg].reshape(groups * hd, h).clone()
        out[f"{p}.self_attn.v_proj.weight"] = qkv[:, qpg + 1].reshape(groups * hd, h).clone()
        out[f"{p}.self_attn.o_proj.weight"] = full[n["proj"]].clone()
        gate, up = full[n["fc1"]].chunk(2, dim=0)
        out[f"{p}.mlp.gate_proj.weight"] = gate.clone()
        out[f"{p}.mlp.up_proj.weight"] = up.clone()
        out[f"{p}.mlp.down_proj.weight"] = full[n["fc2"]].clone()
        out[f"{p}.input_layernorm.weight"] = full[n["attn_norm"]].clone()
        out[f"{p}.post_attention_layernorm.weight"] = full[n["mlp_norm"]].clone()
    return out


def init_llama_megatron(
    cfg: ModelConfig, *, groups: int, padded_vocab: int, vocab: int, seed: int
) -> dict[str, torch.Tensor]:
    """Initial weights of architecture "llama", canonical layout; a function of ``seed`` only."""
    h, heads = cfg.d_model, cfg.n_heads
    hd = h // heads
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    out = {
        WORD: _pad_rows(normal(vocab, h), padded_vocab),
        FINAL_NORM: torch.ones(h),
        OUTPUT: _pad_rows(normal(vocab, h), padded_vocab),
    }
    for i in range(cfg.n_layers):
        n = layer_names(i)
        out[n["attn_norm"]] = torch.ones(h)
        out[n["qkv"]] = normal((heads + 2 * groups) * hd, h)
        out[n["proj"]] = normal(h, h, std=out_std)
        out[n["mlp_norm"]] = torch.ones(h)
        out[n["fc1"]] = normal(2 * cfg.d_ff, h)
        out[n["fc2"]] = normal(h, cfg.d_ff, std=out_std)
    return out


def hf_llama_config(
    cfg: ModelConfig, *, groups: int, vocab: int, rope_theta: float, rms_norm_eps: float
) -> dict[str, object]:
    """config.json of the HF Llama that ``megatron_to_hf_llama`` weights load into."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": groups,
        "head_dim": cfg.d_model // cfg.n_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "vocab_size": vocab,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": vocab - 1,
    }
