"""What import records next to the distributed checkpoint, so export needs no extra arguments."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig
from clinmega.conversion.errors import ConversionError
from clinmega.models.hf import from_hf_config

INFO_FILE = "clinmega_conversion.json"   # model config, source, dtype, layout
ASSETS_DIR = "hf_assets"                 # tokenizer + generation config of the source model


def write_info(directory: Path, model: ModelConfig, **fields) -> None:
    info = {"format": "megatron-core torch_dist model weights", "model": dataclasses.asdict(model),
            **fields}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")


def hf_model_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a HF ``config.json`` (or its folder), errors as ConversionError."""
    try:
        return from_hf_config(path)
    except ConfigError as err:
        raise ConversionError(str(err)) from None


def read_model_config(ckpt_dir: str | Path) -> ModelConfig:
    """The ModelConfig recorded by import in ``ckpt_dir``."""
    path = Path(ckpt_dir) / INFO_FILE
    if not path.is_file():
        raise ConversionError(f"{path}: not found; pass the model's HF config (--config) or a "
                              "preset (--preset) to say which architecture the checkpoint holds")
    try:
        return ModelConfig(**json.loads(path.read_text())["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
        raise ConversionError(f"{path}: invalid model description: {err}") from None
