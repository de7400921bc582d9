"""The [megatron] section and the weight layouts (no megatron-core import: cheap)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from milepost.engine.backends.megatron import convert as conv
from milepost.engine.contract.config import ConfigError, job_from_dict
from milepost.engine.model import ModelConfig, build_policy

from tests.conftest import tiny_job


def _job(**overrides: dict[str, Any]) -> dict[str, Any]:
    trainer = {"backend": "megatron", "world_size": 2, "max_world_size": 2, **overrides.pop("trainer", {})}
    return tiny_job(trainer=trainer, **overrides)


def test_megatron_section_loads() -> None:
    cfg = job_from_dict(_job(megatron={"tensor_model_parallel_size": 2}))
    assert cfg.megatron.tensor_model_parallel_size == 2 and cfg.megatron.use_distributed_optimizer
    assert cfg.megatron.padded_vocab_size(11) == 128 and cfg.megatron.weight_format() == "policy"


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"megatron": {"tensor_model_parallel_size": 0}}, "megatron.tensor_model_parallel_size=0"),
        ({"megatron": {"tensor_model_parallel_size": 3}}, "trainer.world_size=2: must be a multiple of"),
        ({"megatron": {"architecture": "moe"}}, "megatron.architecture='moe'"),
        ({"megatron": {"num_query_groups": 2}}, "megatron.num_query_groups=2: grouped-query attention"),
        ({"megatron": {"pipeline_model_parallel_size": 2}, "model": {"n_layers": 3}}, "model.n_layers=3"),
        ({"megatron": {"tensor_model_parallel_size": 2}, "model": {"d_ff": 255}}, "model.d_ff=255"),
        (
            {"megatron": {"architecture": "llama"}},
            "megatron.architecture='llama': the embedded torch rollout",
        ),
        ({"megatron": {"tp": 2}}, "megatron.tp=2: unknown key"),
    ],
)
def test_bad_megatron_values_name_key_and_value(doc: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        job_from_dict(_job(**doc))
    assert needle in str(e.value)


def test_policy_layout_round_trip() -> None:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
    sd = build_policy(cfg, 11, seed=3).state_dict()
    full = conv.policy_to_megatron(sd, cfg, padded_vocab=16)
    assert full[conv.WORD].shape == (16, 32) and torch.equal(full[conv.WORD][11:], torch.zeros(5, 32))
    back = conv.megatron_to_policy(full, cfg, vocab=11)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    # Megatron groups q, k, v per head: head 1's query rows follow head 0's value rows.
    hd = 32 // 4
    qkv = full[conv.layer_names(0)["qkv"]]
    assert torch.equal(qkv[3 * hd : 4 * hd], sd["layers.0.attn.qkv.weight"][hd : 2 * hd])


def test_hf_llama_layout_splits_groups_and_gate() -> None:
    cfg = ModelConfig(d_model=32, n_layers=1, n_heads=4, d_ff=48, max_seq_len=16)
    full = conv.init_llama_megatron(cfg, groups=2, padded_vocab=16, vocab=11, seed=1)
    hf = conv.megatron_to_hf_llama(full, cfg, groups=2, vocab=11)
    hd = 8
    assert hf["model.layers.0.self_attn.q_proj.weight"].shape == (32, 32)
    assert hf["model.layers.0.self_attn.k_proj.weight"].shape == (2 * hd, 32)
    qkv = full[conv.layer_names(0)["qkv"]].view(2, 4, hd, 32)  # [groups, 2 queries + k + v, hd, h]
    assert torch.equal(hf["model.layers.0.self_attn.k_proj.weight"][hd:], qkv[1, 2])
    assert torch.equal(hf["model.layers.0.self_attn.q_proj.weight"][2 * hd : 3 * hd], qkv[1, 0])
    fc1 = full[conv.layer_names(0)["fc1"]]
    assert torch.equal(hf["model.layers.0.mlp.gate_proj.weight"], fc1[:48])
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], fc1[48:])
    assert hf["lm_head.weight"].shape == (11, 32)
    assert (
        conv.hf_llama_config(cfg, groups=2, vocab=11, rope_theta=1e4, rms_norm_eps=1e-5)[
            "num_key_value_heads"
        ]
        == 2
    )
