"""Layer implementation choice: Transformer Engine specs on GPU when TE imports, megatron-core's
local specs otherwise.

Parameter names (``decoder.layers.N.<...>``) for the two implementations (REFERENCE.md §2):

=====================================  =============================================  =========================================
what                                   TE spec                                        local spec
=====================================  =============================================  =========================================
input RMSNorm                          self_attention.linear_qkv.layer_norm_weight    input_layernorm.weight
fused QKV                              self_attention.linear_qkv.weight               same
attention output                       self_attention.linear_proj.weight              same
pre-MLP RMSNorm (dense)                mlp.linear_fc1.layer_norm_weight               pre_mlp_layernorm.weight
pre-MLP RMSNorm (MoE)                  pre_mlp_layernorm.weight                       same
gate+up / down (dense)                 mlp.linear_fc1.weight / mlp.linear_fc2.weight  same
router                                 mlp.router.weight                              same
expert e gate+up / down                mlp.experts.linear_fc1.weight{e} / fc2         mlp.experts.local_experts.{e}.linear_fc1.weight / fc2
=====================================  =============================================  =========================================

plus ``embedding.word_embeddings.weight``, ``decoder.final_layernorm.weight``,
``output_layer.weight``. Distributed checkpoints of dense models use the TE names for both (the local
spec's ``sharded_state_dict_keys_map``), so they move between implementations. For MoE layers that map
still renames the local ``pre_mlp_layernorm`` to ``mlp.linear_fc1.layer_norm_weight`` while TE saves
``pre_mlp_layernorm.weight`` (megatron-core 0.19 behaviour). :data:`CHECKPOINT_KEY_DIFFERENCES` is the
one table of such checkpoint keys; loads (:mod:`clinmega.models.dist_ckpt`) rename a requested key to
its other-spec name when only that one is stored, ``import-hf --transformer-impl`` writes either
(without importing TE) and ``export-hf`` reads either. TE modules also carry ``_extra_state`` entries
the local spec has not; the load policy tolerates exactly those.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from clinmega.config.errors import ConfigError


# checkpoint key the local spec saves -> the key the TE spec saves for the same tensor, where they
# differ (sharded keys: layers stacked under ``decoder.layers.``). Only MoE layers differ.
CHECKPOINT_KEY_DIFFERENCES = {
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight",
}


def checkpoint_key_alternative(key: str) -> str | None:
    """The other spec's checkpoint key for ``key`` (either direction), or None."""
    if key in CHECKPOINT_KEY_DIFFERENCES:
        return CHECKPOINT_KEY_DIFFERENCES[key]
    for local, te in CHECKPOINT_KEY_DIFFERENCES.items():
        if key == te:
            return local
    return None


@functools.cache
def transformer_engine_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that cannot load its CUDA extension
        return False
    return True


def resolve_transformer_impl(requested: str) -> str:
    """'auto' -> 'transformer_engine' when TE imports and CUDA is present, else 'local'."""
    if requested == "auto":
        usable = transformer_engine_available() and torch.cuda.is_available()
        return "transformer_engine" if usable else "local"
    if requested == "transformer_engine" and not transformer_engine_available():
        raise ConfigError("runtime.transformer_impl: 'transformer_engine' requested but Transformer "
                          "Engine does not import (install clinmega[gpu] on a CUDA machine)")
    return requested


class SequenceParallelRMSNorm:
    """torch RMSNorm usable under sequence parallelism without Apex or TE.

    megatron-core's ``WrappedTorchNorm`` asserts ``not config.sequence_parallel``. The norm itself
    is per-token, so it is correct on a sequence shard; what sequence parallelism needs is that its
    weight gradient is all-reduced across the TP group, which ``finalize_model_grads`` does for
    parameters tagged ``sequence_parallel = True``.
    """

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def _with_sp_norms(layer_spec):
    sub = layer_spec.submodules
    changes = {}
    for field in ("input_layernorm", "pre_mlp_layernorm"):
        module = getattr(sub, field)
        if getattr(module, "__name__", "") == "WrappedTorchNorm":
            changes[field] = SequenceParallelRMSNorm
    if not changes:
        return layer_spec
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(sub, **changes))


def decoder_block_spec(config: TransformerConfig, impl: str, vp_stage: int | None = None,
                       pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """The decoder block spec for this pipeline (and virtual) stage."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    block = get_gpt_decoder_block_spec(config, use_transformer_engine=impl == "transformer_engine",
                                       normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank)
    if impl == "local" and config.sequence_parallel:
        layer_norm = block.layer_norm
        if getattr(layer_norm, "__name__", "") == "WrappedTorchNorm":
            layer_norm = SequenceParallelRMSNorm
        block = TransformerBlockSubmodules(
            layer_specs=[_with_sp_norms(s) for s in block.layer_specs], layer_norm=layer_norm)
    return block
