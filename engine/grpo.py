"""GRPO math: group-normalised advantages, token log-probs and the clipped policy loss."""

from __future__ import annotations

import torch

from .contract.config import GRPOConfig as GRPOConfig  # its home was here; importers keep working
from .model import Policy


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps); samples of one prompt are contiguous in ``rewards``."""
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} is not a multiple of group_size={group_size}")
    groups = rewards.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, unbiased=False)
    return ((groups - mean) / (std + eps)).view(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens) under ``logits`` ([..., V] and [...] -> [...] float32)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_logprobs(policy: Policy, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """[N, R] log-probs of ``responses`` given ``prompts``, from one full causal forward."""
    seq = torch.cat([prompts, responses], dim=1)
    logits = policy(seq[:, :-1])[:, prompts.shape[1] - 1 :]
    return token_logprobs(logits, responses)


def policy_loss(
    new_logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_eps: float,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    token_count: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clipped surrogate (+ optional k3 KL to a reference), summed over tokens / ``token_count``.

    ``token_count`` defaults to the tokens in this batch; data-parallel callers pass the
    global count so that the per-rank losses are partial sums of one global mean. The
    ``loss`` stat is this batch's contribution; the other stats are means over this batch.
    """
    adv = advantages.detach().float().unsqueeze(-1)
    old_logp = old_logp.detach()
    log_ratio = new_logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros((), device=new_logp.device)
    if kl_coef > 0.0:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs ref_logp")
        d = ref_logp.detach() - new_logp
        k3 = torch.exp(d) - d - 1.0
        per_token = per_token + kl_coef * k3
        kl = k3.detach().mean()
    count = new_logp.numel() if token_count is None else token_count
    loss = per_token.sum() / count
    with torch.no_grad():
        was_clipped = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
        stats = {
            "loss": float(loss.item()),
            "clip_frac": float(was_clipped.float().mean().item()),
            "kl": float(kl.item()),
            "ratio_mean": float(ratio.mean().item()),
        }
    return loss, stats
