"""GRPO math: group-normalised advantages, token log-probs and the clipped policy loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import Policy


@dataclass(kw_only=True)
class GRPOConfig:
    group_size: int = 8
    prompts_per_step: int = 64
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    lr: float = 2e-3
    minibatches: int = 2
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"grpo.{name}={getattr(self, name)!r}: {why}")

        for name in ("group_size", "prompts_per_step", "minibatches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "must be a positive integer")
        if self.group_size < 2:
            raise bad("group_size", "must be >= 2 (advantages are relative within a group)")
        if (self.prompts_per_step * self.group_size) % self.minibatches != 0:
            raise bad(
                "minibatches",
                f"must divide prompts_per_step*group_size={self.prompts_per_step * self.group_size}",
            )
        for name in ("clip_eps", "lr", "max_grad_norm", "temperature"):
            if not float(getattr(self, name)) > 0.0:
                raise bad(name, "must be > 0")
        if not float(self.kl_coef) >= 0.0:
            raise bad("kl_coef", "must be >= 0")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise bad("top_p", "must be in (0, 1]")


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
