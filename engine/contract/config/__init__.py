"""The job file (TOML) as frozen pydantic models: one per section, the root JobConfig, the loaders.

Torch-free like the rest of the contract: the daemon validates job files with it too.
"""

from .alerts import (
    AlertsConfig,
    InhibitRule,
    ReceiverConfig,
    RouteConfig,
    RulesConfig,
    parse_matcher,
)
from .backends import MegatronConfig, SGLangConfig
from .base import ConfigError, Section
from .job import (
    SCHEMA_FILE,
    JobConfig,
    OpsView,
    job_from_dict,
    job_json_schema,
    job_schema_text,
    load_job,
    load_ops_view,
)
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

__all__ = [
    "SCHEMA_FILE",
    "AlertsConfig",
    "CheckpointConfig",
    "ConfigError",
    "DetectionConfig",
    "FaultSpec",
    "GRPOConfig",
    "InhibitRule",
    "JobConfig",
    "MegatronConfig",
    "ModelConfig",
    "OpsView",
    "RayConfig",
    "ReceiverConfig",
    "RetentionConfig",
    "RolloutConfig",
    "RouteConfig",
    "RulesConfig",
    "RunConfig",
    "SGLangConfig",
    "Section",
    "SupervisorConfig",
    "TaskConfig",
    "TrainerConfig",
    "job_from_dict",
    "job_json_schema",
    "job_schema_text",
    "load_job",
    "load_ops_view",
    "parse_matcher",
]
