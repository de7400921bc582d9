"""The ``[megatron]`` section of a job file (read only when ``trainer.backend = "megatron"``).

Kept apart from engine/backends/megatron.py so that loading a job file never imports
megatron-core (seconds of imports).
"""

from __future__ import annotations

from dataclasses import dataclass

ARCHITECTURES = ("policy", "llama")


@dataclass(kw_only=True)
class MegatronConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1  # > 1 needs CUDA: Megatron's pipeline schedules allocate on the GPU
    use_distributed_optimizer: bool = True  # CUDA only; on CPU the backend trains with AdamW + DP all-reduce
    # "policy": learned positions, GELU MLP: the same network as engine.model.Policy (the embedded rollout
    # loads its weights). "llama": RoPE, SwiGLU, grouped-query attention: HF LlamaForCausalLM (SGLang).
    architecture: str = "policy"
    num_query_groups: int = 0  # llama only; 0: one per head
    rotary_base: float = 10000.0  # llama only
    norm_epsilon: float = 1e-5  # llama only; "policy" uses engine.model.Policy's RMSNorm epsilon
    # The padded vocab is a multiple of this (not of the TP size), so checkpoints reshard across TP sizes.
    make_vocab_size_divisible_by: int = 128
    bf16: bool = False  # CUDA only: bf16 params, fp32 main params in the optimizer
    overlap_grad_reduce: bool = False  # CUDA only (DDP)
    grad_reduce_in_fp32: bool = True

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "make_vocab_size_divisible_by",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}: must be one of {list(ARCHITECTURES)}")
        if self.num_query_groups < 0:
            raise ValueError(f"num_query_groups={self.num_query_groups}: must be >= 0")
        if self.num_query_groups and self.architecture != "llama":
            raise ValueError(
                f"num_query_groups={self.num_query_groups}: grouped-query attention needs architecture='llama'"
            )
        if self.rotary_base <= 0:
            raise ValueError(f"rotary_base={self.rotary_base}: must be > 0")
        if not 0 < self.norm_epsilon < 1:
            raise ValueError(f"norm_epsilon={self.norm_epsilon}: must be in (0, 1)")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def padded_vocab_size(self, vocab_size: int) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-vocab_size // m) * m

    def weight_format(self) -> str:
        return "hf_llama" if self.architecture == "llama" else "policy"
