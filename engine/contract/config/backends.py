"""The backends' own sections: [megatron] (trainer.backend = "megatron"), [sglang] (rollout.backend = "sglang").

Here, not next to the backends, so that loading a job file never imports megatron-core or torch.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from .base import FieldError, Section


class MegatronConfig(Section):
    section = "megatron"

    tensor_model_parallel_size: Annotated[int, Field(ge=1)] = 1
    # > 1 needs CUDA: Megatron's pipeline schedules allocate on the GPU
    pipeline_model_parallel_size: Annotated[int, Field(ge=1)] = 1
    use_distributed_optimizer: bool = True  # CUDA only; on CPU the backend trains with AdamW + DP all-reduce
    # "policy": learned positions, GELU MLP: the same network as engine.model.Policy (the embedded rollout
    # loads its weights). "llama": RoPE, SwiGLU, grouped-query attention: HF LlamaForCausalLM (SGLang).
    architecture: Literal["policy", "llama"] = "policy"
    num_query_groups: Annotated[int, Field(ge=0)] = 0  # llama only; 0: one per head
    rotary_base: Annotated[float, Field(gt=0)] = 10000.0  # llama only
    # llama only; "policy" uses engine.model.Policy's RMSNorm epsilon
    norm_epsilon: Annotated[float, Field(gt=0, lt=1)] = 1e-5
    # The padded vocab is a multiple of this (not of the TP size), so checkpoints reshard across TP sizes.
    make_vocab_size_divisible_by: Annotated[int, Field(ge=1)] = 128
    bf16: bool = False  # CUDA only: bf16 params, fp32 main params in the optimizer
    overlap_grad_reduce: bool = False  # CUDA only (DDP)
    grad_reduce_in_fp32: bool = True

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.num_query_groups and self.architecture != "llama":
            raise FieldError(
                "num_query_groups",
                self.num_query_groups,
                "grouped-query attention needs architecture='llama'",
            )
        return self

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def padded_vocab_size(self, vocab_size: int) -> int:
        m = self.make_vocab_size_divisible_by
        return -(-vocab_size // m) * m

    def weight_format(self) -> str:
        return "hf_llama" if self.architecture == "llama" else "policy"


class SGLangConfig(Section):
    section = "sglang"

    # Attach: the servers' base URLs (rollout worker i drives urls[i::rollout.workers]); a server
    # attached this way that dies is waited for, not restarted (milepost does not own its process).
    urls: list[str] = []
    # Launch (when urls is empty): `python -m sglang.launch_server` per server.
    model_path: str = ""  # an HF model directory; empty: the rollout writes one from the trainer's weights
    servers_per_worker: Annotated[int, Field(ge=1)] = 1
    tp_size: Annotated[int, Field(ge=1)] = 1
    host: str = "127.0.0.1"
    # server j of worker i listens on port_base + i * servers_per_worker + j
    port_base: Annotated[int, Field(ge=1, le=65535)] = 30000
    base_gpu_id: Annotated[int, Field(ge=0)] = (
        0  # first GPU of the first server; each server takes tp_size GPUs
    )
    mem_fraction_static: Annotated[float, Field(ge=0, lt=1)] = 0.0  # 0: SGLang's default
    python: str = ""  # interpreter for launch_server; empty: the rollout worker's own
    # CUDA_VISIBLE_DEVICES for launched servers; empty: inherited (an empty inherited value, as Ray
    # gives actors without GPUs, is dropped so that --base-gpu-id picks the GPU)
    cuda_visible_devices: str = ""
    extra_args: list[str] = []
    # Weight updates: "disk" (POST /update_weights_from_disk with a directory the trainer's weights are
    # written to), "tensor" (/update_weights_from_tensor, same host), "distributed" (NCCL broadcast).
    weight_update: Literal["disk", "tensor", "distributed"] = "disk"
    weight_dir: str = ""  # default: <run_dir>/sglang_weights
    # Health: a launched server is given startup_grace_s to come up; after that a check fails when
    # /health_generate does not answer 200 within check_timeout_s, and failure_threshold consecutive
    # failures (health_interval_s apart) declare it dead.
    startup_grace_s: Annotated[float, Field(gt=0)] = 600.0
    health_interval_s: Annotated[float, Field(gt=0)] = 5.0
    check_timeout_s: Annotated[float, Field(gt=0)] = 20.0
    failure_threshold: Annotated[int, Field(ge=1)] = 3
    request_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    max_restarts: Annotated[int, Field(ge=0)] = 5  # per server

    @model_validator(mode="after")
    def _check(self) -> Self:
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise FieldError("urls", self.urls, f"{url!r} is not an http(s) URL")
        return self
