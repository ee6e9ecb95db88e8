"""The model a checkpoint holds, as conversion needs it (errors as :class:`ConversionError`)."""

from __future__ import annotations

from pathlib import Path

from clinmega.checkpoints import CheckpointInfo, read_checkpoint_info, resolve_checkpoint
from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig
from clinmega.conversion.errors import ConversionError
from clinmega.models.hf import from_hf_config


def hf_model_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a HF ``config.json`` (or its folder), errors as ConversionError."""
    try:
        return from_hf_config(path)
    except ConfigError as err:
        raise ConversionError(str(err)) from None


def resolve_described(path: str | Path) -> CheckpointInfo:
    """The newest complete checkpoint ``path`` names (run dir, checkpoint root or checkpoint) and
    what it records about itself."""
    try:
        return read_checkpoint_info(resolve_checkpoint(path))
    except ConfigError as err:
        raise ConversionError(str(err)) from None
