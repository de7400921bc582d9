"""Generated, verifiable digit-string tasks with partial-credit rewards.

A prompt is ``num_digits`` random digits in base ``base`` followed by a separator token;
the response is ``num_digits`` tokens. The reward is the fraction of response positions
that match the target string, so it lies in [0, 1] and a uniformly random policy scores
about ``1 / vocab_size``.

Tasks:
  copy     target = the digits as given
  reverse  target = the digits in reverse order
  sort     target = the digits sorted ascending
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .contract.config import TaskConfig

_DIGIT_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"

_TARGETS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "copy": lambda d: d,
    "reverse": lambda d: d.flip(-1),
    "sort": lambda d: d.sort(dim=-1).values,
}
TASK_NAMES = tuple(sorted(_TARGETS))


class Task:
    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.sep_token = cfg.base
        self.vocab_size = cfg.base + 1
        self.prompt_len = cfg.prompt_len
        self.response_len = cfg.response_len
        self._target_fn = _TARGETS[cfg.name]

    def prompts(self, seed: int, step: int, n: int) -> torch.Tensor:
        """[n, prompt_len] long, a pure function of (seed, step, n)."""
        gen = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + step) % (2**63))
        digits = torch.randint(0, self.cfg.base, (n, self.cfg.num_digits), generator=gen)
        sep = torch.full((n, 1), self.sep_token, dtype=torch.long)
        return torch.cat([digits, sep], dim=1)

    def targets(self, prompts: torch.Tensor) -> torch.Tensor:
        """[n, response_len] long: the correct response for each prompt."""
        return self._target_fn(prompts[:, : self.cfg.num_digits])

    def rewards(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """float32 [n] in [0, 1]: fraction of response positions equal to the target."""
        if responses.shape != (prompts.shape[0], self.response_len):
            raise ValueError(
                f"responses shape {tuple(responses.shape)} != ({prompts.shape[0]}, {self.response_len})"
            )
        return (responses == self.targets(prompts)).float().mean(dim=1)

    def decode(self, tokens: torch.Tensor) -> str:
        """Readable form of a 1-D token row (2-D: one line per row); the separator shows as '|'."""
        if tokens.dim() == 2:
            return "\n".join(self.decode(row) for row in tokens)
        return "".join(
            "|" if t == self.sep_token else _DIGIT_CHARS[t] if 0 <= t < self.cfg.base else "?"
            for t in tokens.tolist()
        )
