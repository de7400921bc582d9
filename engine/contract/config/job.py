"""The job file as a whole: the root :class:`JobConfig` with its cross-section checks, and the loaders.

``load_job`` validates everything (torch-free: the daemon may call it too); ``load_ops_view``
reads only what the daemon supervises by and ignores the other sections, as the daemon
always has. ``job_json_schema`` is the file's JSON Schema (committed as job.schema.json).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator

from .alerts import AlertsConfig
from .backends import MegatronConfig, SGLangConfig
from .base import ConfigError, FieldError, config_error
from .ops import (
    DetectionConfig,
    FaultSpec,
    RetentionConfig,
    RolloutConfig,
    RunConfig,
    SupervisorConfig,
    TrainerConfig,
)
from .training import CheckpointConfig, GRPOConfig, ModelConfig, RayConfig, TaskConfig

SCHEMA_FILE = Path(__file__).with_name("job.schema.json")


class JobConfig(BaseModel):
    """The whole job file: one field per ``[section]``, and ``[[faults]]``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    grpo: GRPOConfig = GRPOConfig()
    trainer: TrainerConfig = TrainerConfig()
    rollout: RolloutConfig = RolloutConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    ray: RayConfig = RayConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    detection: DetectionConfig = DetectionConfig()
    retention: RetentionConfig = RetentionConfig()
    megatron: MegatronConfig = MegatronConfig()
    sglang: SGLangConfig = SGLangConfig()
    alerts: AlertsConfig = AlertsConfig()
    faults: list[FaultSpec] = []
    _source: str = PrivateAttr("")  # the file it came from, for messages; not a key of the file

    @property
    def source(self) -> str:
        return self._source

    @model_validator(mode="after")
    def _check(self) -> Self:
        task, need = self.task, self.task.prompt_len + self.task.response_len
        if self.model.max_seq_len < need:
            raise FieldError(
                "model.max_seq_len",
                self.model.max_seq_len,
                f"the task needs {need} (prompt {task.prompt_len} + response {task.response_len})",
            )
        per_mb = self.grpo.samples_per_step // self.grpo.minibatches
        if per_mb < self.trainer.max_world_size:
            raise FieldError(
                "trainer.max_world_size",
                self.trainer.max_world_size,
                f"a minibatch of {per_mb} samples gives some rank nothing to train on",
            )
        if self.grpo.prompts_per_step < self.rollout.workers:
            raise FieldError(
                "rollout.workers",
                self.rollout.workers,
                f"more workers than prompts_per_step={self.grpo.prompts_per_step}",
            )
        if self.faults and not self.supervisor.allow_faults:
            raise FieldError(
                "supervisor.allow_faults",
                False,
                f"the job lists {len(self.faults)} [[faults]]; fault injection is opt-in per run: "
                "set allow_faults = true in [supervisor] (tests, benchmarks and demos only)",
            )
        if self.trainer.backend == "megatron":
            self._check_megatron()
        if self.rollout.backend == "sglang":
            self._check_sglang()
        return self

    def _check_megatron(self) -> None:
        m, t, model = self.megatron, self.trainer, self.model
        tp, pp, mp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.model_parallel_size
        for name in ("world_size", "max_world_size"):
            if getattr(t, name) % mp:
                raise FieldError(
                    f"trainer.{name}",
                    getattr(t, name),
                    f"must be a multiple of megatron tensor x pipeline parallel size {tp}x{pp}={mp}",
                )
        groups = m.num_query_groups or model.n_heads
        for name, value, by, what in (
            ("model.n_heads", model.n_heads, tp, "megatron.tensor_model_parallel_size"),
            ("model.d_ff", model.d_ff, tp, "megatron.tensor_model_parallel_size"),
            ("model.n_layers", model.n_layers, pp, "megatron.pipeline_model_parallel_size"),
            ("megatron.num_query_groups", groups, tp, "megatron.tensor_model_parallel_size"),
            ("model.n_heads", model.n_heads, groups, "megatron.num_query_groups"),
        ):
            if value % by:
                raise FieldError(name, value, f"must be divisible by {what}={by}")
        if m.architecture == "llama" and self.rollout.backend == "torch":
            raise FieldError(
                "megatron.architecture",
                m.architecture,
                "the embedded torch rollout runs engine.model.Policy; "
                "use architecture='policy' or rollout.backend='sglang'",
            )

    def _check_sglang(self) -> None:
        if self.trainer.backend != "megatron" or self.megatron.architecture != "llama":
            raise FieldError(
                "rollout.backend",
                self.rollout.backend,
                "SGLang serves HF Llama weights; needs trainer.backend='megatron' with "
                f"megatron.architecture='llama' (got trainer.backend={self.trainer.backend!r}, "
                f"megatron.architecture={self.megatron.architecture!r})",
            )
        urls = self.sglang.urls
        if urls and len(urls) < self.rollout.workers:
            raise FieldError(
                "sglang.urls", urls, f"fewer servers than rollout.workers={self.rollout.workers}"
            )

    def run_dir(self, override: str | None = None) -> Path:
        return Path(override or self.run.run_dir or f"runs/{self.run.name}")

    def checkpoint_root(self, run_dir: str | Path) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(run_dir) / "checkpoints"

    def replace(self, section: str, **changes: Any) -> JobConfig:
        """A copy with ``[section]``'s keys changed, validated like a job file."""
        doc = self.model_dump()
        doc[section] = {**doc[section], **changes}
        return job_from_dict(doc, source=self.source)


class OpsView(BaseModel):
    """What the daemon reads of a job file; the other sections are the engine's to validate."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    run: RunConfig = RunConfig()
    trainer: TrainerConfig = TrainerConfig()
    rollout: RolloutConfig = RolloutConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    detection: DetectionConfig = DetectionConfig()
    retention: RetentionConfig = RetentionConfig()
    alerts: AlertsConfig = AlertsConfig()


def job_from_dict(doc: dict[str, Any], *, source: str = "") -> JobConfig:
    try:
        cfg = JobConfig.model_validate(doc)
    except ValidationError as e:
        lines = str(config_error(e, JobConfig)).splitlines()
        raise ConfigError("\n".join(f"{source}: {line}" if source else line for line in lines)) from None
    cfg._source = source
    return cfg


def _read(path: Path) -> dict[str, Any]:
    """The TOML document in ``path``; every way of failing is a ConfigError naming the file."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"job file {str(path)!r}: not found") from None
    except IsADirectoryError:
        raise ConfigError(f"job file {str(path)!r}: is a directory, not a TOML file") from None
    except OSError as e:
        raise ConfigError(f"job file {str(path)!r}: cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_job(path: str | Path) -> JobConfig:
    path = Path(path)
    return job_from_dict(_read(path), source=str(path))


def load_ops_view(path: str | Path) -> OpsView:
    path = Path(path)
    doc = _read(path)
    try:
        return OpsView.model_validate(doc)
    except ValidationError as e:
        lines = str(config_error(e, OpsView)).splitlines()
        raise ConfigError("\n".join(f"{path}: {line}" for line in lines)) from None


def job_json_schema() -> dict[str, Any]:
    """The job file's JSON Schema (draft 2020-12), as pydantic generates it."""
    schema = JobConfig.model_json_schema()
    schema["title"] = "milepost job file"
    return schema


def job_schema_text() -> str:
    """The schema as committed in job.schema.json (and printed by ``milepost schema``)."""
    return json.dumps(job_json_schema(), indent=2) + "\n"
