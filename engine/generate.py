"""Batched autoregressive sampling from a Policy with a KV cache.

All randomness comes from the caller's ``torch.Generator``, so a fixed generator state
gives identical samples. The returned log-probabilities are those of the sampled tokens
under the raw policy distribution (temperature 1, no top-p truncation), i.e. the same
quantity that ``grpo.response_logprobs`` recomputes with a full forward pass.
"""

from __future__ import annotations

import torch

from .model import Policy


def _sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """[B, V] logits -> [B] sampled ids. temperature == 0 means greedy."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the top token is always kept.
        keep = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
        keep[:, 0] = True
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    policy: Policy,
    prompts: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample exactly ``max_new_tokens`` tokens per prompt.

    Returns ``(responses [N, R] long, logprobs [N, R] float32)``; see the module docstring
    for which distribution the log-probabilities refer to.
    """
    if temperature < 0.0:
        raise ValueError(f"temperature={temperature}: must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p}: must be in (0, 1]")
    n, p = prompts.shape
    cache = policy.new_cache(n, p + max_new_tokens)
    logits = policy.forward_cached(prompts, cache, 0)[:, -1]
    responses = torch.empty(n, max_new_tokens, dtype=torch.long, device=prompts.device)
    logprobs = torch.empty(n, max_new_tokens, dtype=torch.float32, device=prompts.device)
    for i in range(max_new_tokens):
        tok = _sample(logits, temperature, top_p, generator)
        responses[:, i] = tok
        logprobs[:, i] = torch.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
        if i + 1 < max_new_tokens:
            logits = policy.forward_cached(tok[:, None], cache, p + i)[:, -1]
    return responses, logprobs
