"""The Megatron train step: forward (pipelined on CUDA), vocab-parallel log-probs, GRPO updates."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from ...grpo import policy_loss
from ..base import StepStats, minibatch_parts, note_skipped_update
from .layout import MegatronLayout


def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] bool, True where attention is masked (Megatron's convention)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


class TrainStep(MegatronLayout):
    """The forward and training part of ``MegatronBackend``."""

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
