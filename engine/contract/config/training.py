"""The sections of the RL loop: [model] [task] [grpo] [checkpoint] [ray]."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from .base import FieldError, Section

TaskName = Literal["copy", "reverse", "sort"]  # engine.task holds a target function for each
MAX_BASE = 36  # digits are spelled 0-9a-z


class ModelConfig(Section):
    section = "model"

    d_model: Annotated[int, Field(ge=1)] = 64
    n_layers: Annotated[int, Field(ge=1)] = 2
    n_heads: Annotated[int, Field(ge=1)] = 4
    d_ff: Annotated[int, Field(ge=1)] = 256
    max_seq_len: Annotated[int, Field(ge=1)] = 32

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.d_model % self.n_heads:
            raise FieldError("n_heads", self.n_heads, f"must divide model.d_model={self.d_model}")
        return self


class TaskConfig(Section):
    section = "task"

    name: TaskName = "reverse"
    num_digits: Annotated[int, Field(ge=1, le=16)] = 4
    base: Annotated[int, Field(ge=2, le=MAX_BASE)] = 10

    @property
    def prompt_len(self) -> int:
        return self.num_digits + 1  # the digits, then a separator token

    @property
    def response_len(self) -> int:
        return self.num_digits


class GRPOConfig(Section):
    section = "grpo"

    group_size: Annotated[int, Field(ge=2)] = 8  # >= 2: advantages are relative within a group
    prompts_per_step: Annotated[int, Field(ge=1)] = 64
    clip_eps: Annotated[float, Field(gt=0)] = 0.2
    kl_coef: Annotated[float, Field(ge=0)] = 0.0
    lr: Annotated[float, Field(gt=0)] = 2e-3
    minibatches: Annotated[int, Field(ge=1)] = 2
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    temperature: Annotated[float, Field(gt=0)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.group_size

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.samples_per_step % self.minibatches:
            raise FieldError(
                "minibatches",
                self.minibatches,
                f"must divide prompts_per_step*group_size={self.samples_per_step}",
            )
        return self


class CheckpointConfig(Section):
    section = "checkpoint"

    interval: Annotated[int, Field(ge=0)] = 10  # steps between saves; 0 disables periodic saves
    keep_last: Annotated[int, Field(ge=1)] = 3  # committed checkpoints kept (older ones are pruned)
    async_save: bool = True  # DCP async_save: training continues while shards are written
    dir: str = ""  # default: <run_dir>/checkpoints


class RayConfig(Section):
    section = "ray"

    # "local" starts a loopback cluster; else e.g. "127.0.0.1:6379" or "ray://..."
    address: Annotated[str, Field(min_length=1)] = "local"
    num_cpus: Annotated[int, Field(ge=0)] = (
        0  # logical CPUs of a local cluster; 0: exactly what the job's actors need
    )
