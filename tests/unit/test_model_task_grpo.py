"""Unit tests for the policy model, the digit task, the generator and the GRPO math."""

from __future__ import annotations

import pytest
import torch
from milepost.engine.generate import generate
from milepost.engine.grpo import (
    GRPOConfig,
    group_advantages,
    policy_loss,
    response_logprobs,
    token_logprobs,
)
from milepost.engine.model import ModelConfig, Policy, build_policy
from milepost.engine.task import TASK_NAMES, Task, TaskConfig

TINY = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _policy(seed: int = 0, vocab: int = 11) -> Policy:
    return build_policy(TINY, vocab, seed)


def test_forward_shapes_and_dtype() -> None:
    policy = _policy()
    logits = policy(torch.randint(0, 11, (3, 7)))
    assert logits.shape == (3, 7, 11)
    assert logits.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert len(policy.layers) == TINY.n_layers


def test_build_policy_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = _policy(seed=5), _policy(seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = _policy(seed=6)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_cached_decoding_matches_full_forward() -> None:
    policy = _policy()
    tokens = torch.randint(0, 11, (4, 10), generator=torch.Generator().manual_seed(0))
    full = policy(tokens)
    cache = policy.new_cache(4, 10)
    parts = [policy.forward_cached(tokens[:, :6], cache, 0)]
    parts += [policy.forward_cached(tokens[:, i : i + 1], cache, i) for i in range(6, 8)]
    parts.append(policy.forward_cached(tokens[:, 8:], cache, 8))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_forward_rejects_too_long_sequences() -> None:
    with pytest.raises(ValueError, match="exceeds max length"):
        _policy()(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))


def test_generate_deterministic_and_logprobs_consistent() -> None:
    task = Task(TaskConfig())
    policy = build_policy(TINY, task.vocab_size, 0)
    prompts = task.prompts(0, 1, 6)

    def sample(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        return generate(
            policy,
            prompts,
            task.response_len,
            temperature=1.0,
            top_p=1.0,
            generator=torch.Generator().manual_seed(seed),
        )

    r1, lp1 = sample(7)
    r2, lp2 = sample(7)
    assert r1.shape == lp1.shape == (6, task.response_len)
    assert r1.dtype == torch.long and lp1.dtype == torch.float32
    assert torch.equal(r1, r2) and torch.equal(lp1, lp2)
    assert not torch.equal(r1, sample(8)[0])
    torch.testing.assert_close(lp1, response_logprobs(policy, prompts, r1), rtol=1e-5, atol=1e-5)


def test_small_top_p_is_greedy() -> None:
    task = Task(TaskConfig())
    policy = build_policy(TINY, task.vocab_size, 1)
    prompts = task.prompts(0, 2, 8)
    nucleus, _ = generate(
        policy,
        prompts,
        task.response_len,
        temperature=1.0,
        top_p=1e-6,
        generator=torch.Generator().manual_seed(0),
    )
    greedy, _ = generate(
        policy,
        prompts,
        task.response_len,
        temperature=0.0,
        top_p=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    seq = torch.cat([prompts, greedy], dim=1)
    argmax = policy(seq[:, :-1])[:, prompts.shape[1] - 1 :].argmax(-1)
    assert torch.equal(nucleus, greedy)
    assert torch.equal(greedy, argmax)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_prompts_and_rewards(name: str) -> None:
    task = Task(TaskConfig(name=name, num_digits=5, base=10))
    p = task.prompts(3, 4, 32)
    assert p.shape == (32, task.prompt_len) and p.dtype == torch.long
    assert int(p.max()) < task.vocab_size
    torch.manual_seed(0)
    a = task.prompts(3, 4, 32)
    torch.manual_seed(1)
    assert torch.equal(a, task.prompts(3, 4, 32)) and torch.equal(a, p)
    assert not torch.equal(p, task.prompts(3, 5, 32))
    assert not torch.equal(p, task.prompts(4, 4, 32))

    perfect = task.targets(p)
    assert torch.equal(task.rewards(p, perfect), torch.ones(32))
    wrong = perfect.clone()
    wrong[:, 0] = (wrong[:, 0] + 1) % task.cfg.base
    r = task.rewards(p, wrong)
    assert r.dtype == torch.float32
    assert torch.all(r < 1.0) and torch.allclose(r, torch.full((32,), 0.8))
    random = torch.randint(0, task.vocab_size, perfect.shape, generator=torch.Generator().manual_seed(0))
    rr = task.rewards(p, random)
    assert torch.all((rr >= 0) & (rr <= 1)) and float(rr.mean()) < 0.3


def test_task_reverse_target_and_decode() -> None:
    task = Task(TaskConfig(name="reverse", num_digits=4, base=10))
    prompts = torch.tensor([[1, 2, 3, 4, task.sep_token]])
    assert task.targets(prompts).tolist() == [[4, 3, 2, 1]]
    assert task.decode(prompts[0]) == "1234|"
    assert task.decode(torch.tensor([[4, 3], [2, 1]])) == "43\n21"


def test_group_advantages_zero_mean_per_group() -> None:
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv = group_advantages(rewards, 4)
    groups = adv.view(2, 4)
    torch.testing.assert_close(groups.mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    assert torch.equal(groups[1], torch.zeros(4))
    assert adv[1] > 0 > adv[0]
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)


def test_token_logprobs_matches_log_softmax() -> None:
    logits = torch.randn(2, 3, 5)
    tokens = torch.tensor([[0, 1, 2], [4, 3, 2]])
    expected = torch.log_softmax(logits, -1)[torch.arange(2)[:, None], torch.arange(3), tokens]
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)


def test_policy_loss_clipping() -> None:
    old = torch.zeros(2, 3)
    new = torch.log(torch.full((2, 3), 1.5)).requires_grad_()
    adv = torch.tensor([1.0, -1.0])
    loss, stats = policy_loss(new, old, adv, clip_eps=0.2)
    loss.backward()
    assert new.grad is not None
    # Ratio 1.5 > 1.2 with positive advantage is clipped: no gradient.
    assert torch.equal(new.grad[0], torch.zeros(3))
    # With negative advantage the unclipped (pessimistic) term is active.
    assert torch.all(new.grad[1] > 0)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.5)
    assert stats["kl"] == 0.0


def test_policy_loss_token_count_and_kl() -> None:
    new = torch.randn(4, 3)
    old = new + 0.01 * torch.randn(4, 3)
    adv = torch.randn(4)
    full, _ = policy_loss(new, old, adv, clip_eps=0.2)
    halves = [
        policy_loss(new[i : i + 2], old[i : i + 2], adv[i : i + 2], clip_eps=0.2, token_count=12)[0]
        for i in (0, 2)
    ]
    torch.testing.assert_close(halves[0] + halves[1], full)
    with_kl, stats = policy_loss(new, old, adv, clip_eps=0.2, kl_coef=0.1, ref_logp=new + 0.3)
    assert stats["kl"] > 0 and float(with_kl) > float(full)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(new, old, adv, clip_eps=0.2, kl_coef=0.1)


@pytest.mark.parametrize(
    ("factory", "pattern"),
    [
        (lambda: ModelConfig(n_heads=3), r"model\.n_heads=3: must divide model\.d_model=64"),
        (lambda: ModelConfig(d_model=0), r"model\.d_model=0"),
        (lambda: TaskConfig(name="nope"), r"task\.name='nope'"),
        (lambda: TaskConfig(num_digits=0), r"task\.num_digits=0"),
        (lambda: TaskConfig(base=1), r"task\.base=1"),
        (lambda: GRPOConfig(group_size=1), r"grpo\.group_size=1"),
        (lambda: GRPOConfig(lr=0.0), r"grpo\.lr=0\.0"),
        (lambda: GRPOConfig(top_p=1.5), r"grpo\.top_p=1\.5"),
        (lambda: GRPOConfig(kl_coef=-1.0), r"grpo\.kl_coef=-1\.0"),
        (lambda: GRPOConfig(minibatches=3), r"grpo\.minibatches=3"),
    ],
)
def test_config_validation_names_field_and_value(factory: object, pattern: str) -> None:
    assert callable(factory)
    with pytest.raises(ValueError, match=pattern):
        factory()


def test_defaults_are_consistent() -> None:
    task = Task(TaskConfig())
    assert task.prompt_len + task.response_len <= ModelConfig().max_seq_len
    GRPOConfig()


def test_short_grpo_run_improves_reward() -> None:
    task = Task(TaskConfig(name="reverse", num_digits=3, base=4))
    cfg = GRPOConfig(prompts_per_step=16, group_size=8, lr=3e-3, minibatches=1)
    policy = build_policy(TINY, task.vocab_size, 0)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    curve = []
    for step in range(40):
        prompts = task.prompts(0, step, cfg.prompts_per_step).repeat_interleave(cfg.group_size, 0)
        responses, _ = generate(policy, prompts, task.response_len, temperature=1.0, top_p=1.0, generator=gen)
        rewards = task.rewards(prompts, responses)
        adv = group_advantages(rewards, cfg.group_size)
        with torch.no_grad():
            old = response_logprobs(policy, prompts, responses)
        loss, _ = policy_loss(response_logprobs(policy, prompts, responses), old, adv, clip_eps=cfg.clip_eps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        opt.step()
        curve.append(float(rewards.mean()))
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last > first + 0.2, curve


@pytest.mark.parametrize("world", [2, 3])
def test_reported_loss_does_not_depend_on_the_data_parallel_size(world: int) -> None:
    from milepost.engine.backends.base import StepStats

    g = torch.Generator().manual_seed(5)
    new, old = torch.randn(12, 6, generator=g), torch.randn(12, 6, generator=g)
    adv = torch.randn(12, generator=g)

    def step_loss(ranks: int) -> float:
        shards = [StepStats() for _ in range(ranks)]
        for mb in (slice(0, 6), slice(6, 12)):  # two minibatches, each split over the ranks
            idx = torch.arange(12)[mb].chunk(ranks)
            for r, part in enumerate(idx):
                _, stats = policy_loss(new[part], old[part], adv[part], clip_eps=0.2, token_count=6 * 6)
                shards[r].add(stats, local_tokens=len(part) * 6, grad_norm=1.0, dp=ranks)
        total = StepStats()
        total.totals = sum((s.totals for s in shards), torch.zeros(5, dtype=torch.float64))  # all-reduce
        return total.result(2)["loss"]

    assert step_loss(world) == pytest.approx(step_loss(1), rel=1e-6)
