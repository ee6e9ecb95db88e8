"""Typed configuration: dataclass schemas, OmegaConf loading and dotlist overrides."""

from clinmega.config.errors import ConfigError
from clinmega.config.loader import load_config, to_yaml
from clinmega.config.schema import (
    ClusterConfig,
    FoundationConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    RuntimeConfig,
)

__all__ = [
    "ClusterConfig", "ConfigError", "FoundationConfig", "ModelConfig", "ParallelConfig", "PrecisionConfig",
    "RuntimeConfig", "load_config", "to_yaml",
]
