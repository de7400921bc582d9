"""Small decoder-only transformer policy with an incremental KV-cache path.

Pre-norm blocks (RMSNorm), learned absolute positions, causal attention via
``F.scaled_dot_product_attention``. No dropout and no weight tying, all params float32.
The cached path goes through ``Module.__call__`` (``forward`` with a cache) so that
FSDP2 hooks on the root and on each block fire for it as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .contract.config import ModelConfig


@dataclass
class KVCache:
    """Per-layer key/value buffers of shape [B, H, max_len, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, start_pos: int
    ) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k_buf, v_buf = kv
            end = start_pos + t
            k_buf[:, :, start_pos:end] = k
            v_buf[:, :, start_pos:end] = v
            k, v = k_buf[:, :, :end], v_buf[:, :, :end]
            mask = None
            if t > 1:
                q_pos = torch.arange(start_pos, end, device=x.device)
                mask = q_pos[:, None] >= torch.arange(end, device=x.device)[None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model)
        self.ff_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.ff_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), kv, start_pos)
        return x + self.ff_out(F.gelu(self.ff_in(self.mlp_norm(x))))


class Policy(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size}: must be >= 2")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # GPT-2 style: small normal init, residual output projections scaled by depth.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.layers:
            assert isinstance(block, Block)
            std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
            nn.init.normal_(block.attn.out.weight, std=std)
            nn.init.normal_(block.ff_out.weight, std=std)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        param = self.head.weight
        shape = (batch_size, self.cfg.n_heads, max_len, self.cfg.d_model // self.cfg.n_heads)
        n = self.cfg.n_layers
        return KVCache(
            keys=[torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(n)],
            values=[torch.zeros(shape, dtype=param.dtype, device=param.device) for _ in range(n)],
        )

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """[B, T] token ids -> [B, T, V] float32 logits; with ``cache``, positions start at ``start_pos``."""
        t = tokens.shape[1]
        limit = self.cfg.max_seq_len if cache is None else min(self.cfg.max_seq_len, cache.max_len)
        if start_pos + t > limit:
            raise ValueError(f"sequence end {start_pos + t} exceeds max length {limit}")
        pos = torch.arange(start_pos, start_pos + t, device=tokens.device)
        x = self.embed(tokens) + self.pos_embed(pos)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x = layer(x, kv, start_pos)
        return self.head(self.norm(x)).float()

    def forward_cached(self, tokens: torch.Tensor, cache: KVCache, start_pos: int) -> torch.Tensor:
        """Feed ``tokens`` at positions ``start_pos..`` using and filling ``cache``; logits [B, t, V]."""
        return self(tokens, cache, start_pos)


def build_policy(cfg: ModelConfig, vocab_size: int, seed: int) -> Policy:
    """Build a policy whose initial weights depend on ``seed`` only (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Policy(cfg, vocab_size)
