"""Which parallel layouts a model can be split into: pure arithmetic on the configs, no torch, so the
planner and ``clinmega plan`` use it without importing megatron-core."""

from __future__ import annotations

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig, ParallelConfig


def check_layout(model: ModelConfig, parallel: ParallelConfig, training: bool = True) -> None:
    """Reject layouts the model cannot be split into, naming the field. ``training=False`` (a model
    built for evaluation only) also accepts MoE with tensor parallelism and no sequence parallelism,
    which megatron-core's MoE layer refuses in training mode only."""
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    if model.num_query_groups % tp:
        raise ConfigError(f"parallel.tensor_parallel: {tp} does not divide the "
                          f"{model.num_query_groups} KV groups (model.num_query_groups)")
    if model.ffn_hidden_size % tp:
        raise ConfigError(f"parallel.tensor_parallel: {tp} does not divide "
                          f"model.ffn_hidden_size={model.ffn_hidden_size}")
    stages = pp * (parallel.virtual_pipeline_parallel or 1)
    if model.num_layers % stages:
        raise ConfigError(f"parallel.pipeline_parallel: {model.num_layers} layers cannot be split "
                          f"evenly into PP*VPP = {stages} stages")
    if parallel.expert_parallel > 1 and not model.is_moe:
        raise ConfigError("parallel.expert_parallel: the model has no experts")
    if training and model.is_moe and tp > 1 and not parallel.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: megatron-core's MoE layer requires sequence "
                          "parallelism whenever tensor_parallel > 1; set it to true")
    if model.is_moe and model.num_experts % parallel.expert_parallel:
        raise ConfigError(f"parallel.expert_parallel: {parallel.expert_parallel} does not divide "
                          f"model.num_experts={model.num_experts}")
