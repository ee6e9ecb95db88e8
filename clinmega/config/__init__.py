"""Typed configuration: dataclass schemas, OmegaConf loading and dotlist overrides.

Names are exported lazily (:mod:`clinmega.utils.lazy`): ``clinmega.config.errors`` and the schemas
import without OmegaConf; ``load_config`` loads it.
"""

from typing import TYPE_CHECKING

from clinmega.utils.lazy import lazy_exports

_SCHEMA = ("ClusterConfig", "FoundationConfig", "ModelConfig", "ParallelConfig", "PrecisionConfig", "RuntimeConfig")
_WHERE = {"ConfigError": "clinmega.config.errors", "load_config": "clinmega.config.loader",
          "to_yaml": "clinmega.config.loader", **dict.fromkeys(_SCHEMA, "clinmega.config.schema")}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)

if TYPE_CHECKING:
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
