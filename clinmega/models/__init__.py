"""Mistral / Mixtral as megatron-core GPTModels: presets, HF config mapping, layer specs, builders."""

from clinmega.models.builder import build_model, build_model_chunk, check_layout, transformer_config
from clinmega.models.hf import from_hf_config, to_hf_config
from clinmega.models.presets import (
    PRESETS,
    PUBLISHED_PARAMS,
    count_active_parameters,
    count_parameters,
    get_preset,
)
from clinmega.models.spec import resolve_transformer_impl, transformer_engine_available

__all__ = [
    "PRESETS", "PUBLISHED_PARAMS", "build_model", "build_model_chunk", "check_layout",
    "count_active_parameters", "count_parameters", "from_hf_config", "get_preset",
    "resolve_transformer_impl", "to_hf_config", "transformer_config", "transformer_engine_available",
]
