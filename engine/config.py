"""The job file: one TOML document, validated on load into typed config objects.

Sections: [run] [model] [task] [grpo] [trainer] [rollout] [checkpoint] [ray], and the
backends' own: [megatron] (trainer.backend = "megatron"), [sglang] (rollout.backend = "sglang").
Each component owns its config dataclass (next to the class it configures); this
module holds the root and the sections that belong to the engine's wiring.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .backends.megatron_config import MegatronConfig
from .backends.sglang_config import SGLangConfig
from .checkpoint import CheckpointConfig
from .cluster import RayConfig
from .configio import ConfigError, build
from .grpo import GRPOConfig
from .jobspec import (
    DetectionConfig,
    FaultSpec,
    RolloutConfig,
    RunConfig,
    SupervisorConfig,
    TrainerConfig,
    build_faults,
)
from .model import ModelConfig
from .task import Task, TaskConfig

__all__ = ["ConfigError", "JobConfig", "load_job", "job_from_dict"]


@dataclass(kw_only=True)
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    sglang: SGLangConfig = field(default_factory=SGLangConfig)
    faults: list[FaultSpec] = field(default_factory=list)
    source: str = ""  # the file it came from, for messages

    def __post_init__(self) -> None:
        task = Task(self.task)
        need = task.prompt_len + task.response_len
        if self.model.max_seq_len < need:
            raise ConfigError(
                f"model.max_seq_len={self.model.max_seq_len}: the task needs {need} "
                f"(prompt {task.prompt_len} + response {task.response_len})"
            )
        samples = self.grpo.prompts_per_step * self.grpo.group_size
        if samples % self.grpo.minibatches:
            raise ConfigError(
                f"grpo.minibatches={self.grpo.minibatches}: must divide prompts_per_step*group_size={samples}"
            )
        per_mb = samples // self.grpo.minibatches
        if per_mb < self.trainer.max_world_size:
            raise ConfigError(
                f"trainer.max_world_size={self.trainer.max_world_size}: a minibatch of {per_mb} samples "
                "gives some rank nothing to train on"
            )
        if self.grpo.prompts_per_step < self.rollout.workers:
            raise ConfigError(
                f"rollout.workers={self.rollout.workers}: more workers than prompts_per_step={self.grpo.prompts_per_step}"
            )
        if self.trainer.backend == "megatron":
            self._check_megatron()
        if self.rollout.backend == "sglang":
            self._check_sglang()

    def _check_megatron(self) -> None:
        m, t = self.megatron, self.trainer
        mp = m.model_parallel_size
        for name in ("world_size", "max_world_size"):
            if getattr(t, name) % mp:
                raise ConfigError(
                    f"trainer.{name}={getattr(t, name)}: must be a multiple of megatron tensor x pipeline "
                    f"parallel size {m.tensor_model_parallel_size}x{m.pipeline_model_parallel_size}={mp}"
                )
        tp, pp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size
        groups = m.num_query_groups or self.model.n_heads
        for name, value, by, what in (
            ("model.n_heads", self.model.n_heads, tp, "megatron.tensor_model_parallel_size"),
            ("model.d_ff", self.model.d_ff, tp, "megatron.tensor_model_parallel_size"),
            ("model.n_layers", self.model.n_layers, pp, "megatron.pipeline_model_parallel_size"),
            ("megatron.num_query_groups", groups, tp, "megatron.tensor_model_parallel_size"),
            ("model.n_heads", self.model.n_heads, groups, "megatron.num_query_groups"),
        ):
            if value % by:
                raise ConfigError(f"{name}={value}: must be divisible by {what}={by}")
        if m.architecture == "llama" and self.rollout.backend == "torch":
            raise ConfigError(
                "megatron.architecture='llama': the embedded torch rollout runs engine.model.Policy; "
                "use architecture='policy' or rollout.backend='sglang'"
            )

    def _check_sglang(self) -> None:
        if self.trainer.backend != "megatron" or self.megatron.architecture != "llama":
            raise ConfigError(
                f"rollout.backend='sglang': SGLang serves HF Llama weights; needs trainer.backend='megatron' "
                f"with megatron.architecture='llama' (got trainer.backend={self.trainer.backend!r}, "
                f"megatron.architecture={self.megatron.architecture!r})"
            )
        s = self.sglang
        if s.urls and len(s.urls) < self.rollout.workers:
            raise ConfigError(
                f"sglang.urls={s.urls!r}: fewer servers than rollout.workers={self.rollout.workers}"
            )

    def run_dir(self, override: str | None = None) -> Path:
        return Path(override or self.run.run_dir or f"runs/{self.run.name}")

    def checkpoint_root(self, run_dir: str | Path) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(run_dir) / "checkpoints"


_SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "task": TaskConfig,
    "grpo": GRPOConfig,
    "trainer": TrainerConfig,
    "rollout": RolloutConfig,
    "checkpoint": CheckpointConfig,
    "ray": RayConfig,
    "supervisor": SupervisorConfig,
    "detection": DetectionConfig,
    "megatron": MegatronConfig,
    "sglang": SGLangConfig,
}


def job_from_dict(doc: dict[str, Any], *, source: str = "") -> JobConfig:
    for key, value in doc.items():
        if key not in _SECTIONS and key != "faults":
            raise ConfigError(f"{key}={value!r}: unknown section; known sections: {', '.join(_SECTIONS)}")
    sections: dict[str, Any] = {name: build(cls, doc.get(name), name) for name, cls in _SECTIONS.items()}
    sections["faults"] = build_faults(doc.get("faults"))
    try:
        return JobConfig(**sections, source=source)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from e


def load_job(path: str | Path) -> JobConfig:
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job file {str(path)!r}: not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    try:
        return job_from_dict(doc, source=str(path))
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from e
