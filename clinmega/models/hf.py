"""Hugging Face ``config.json`` <-> :class:`ModelConfig`.

Only what megatron-core's GPTModel reproduces exactly is accepted: a config using anything else
(biases, tied embeddings, RoPE scaling, another activation, ...) is rejected with a message that
names the field, instead of converting into a model that silently differs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig

ARCHITECTURES = {"MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral"}
MODEL_TYPES = {"mistral": "mistral", "mixtral": "mixtral"}

# (field, value that clinmega requires, why) — checked only when the field is present.
_REQUIRED = (
    ("hidden_act", "silu", "the MLP is SwiGLU with SiLU"),
    ("tie_word_embeddings", False, "input and output embeddings are separate tensors"),
    ("attention_bias", False, "attention projections have no bias"),
    ("mlp_bias", False, "MLP projections have no bias"),
    ("rope_scaling", None, "RoPE scaling is not implemented"),
    ("attention_dropout", 0.0, "attention dropout is not supported by conversion checks"),
)


def _get(hf: Mapping[str, Any], key: str, where: str):
    if key not in hf:
        raise ConfigError(f"{where}: missing field {key!r}")
    return hf[key]


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
    if "rope_theta" in hf:
        return float(hf["rope_theta"])
    params = hf.get("rope_parameters")  # transformers >= 5 nests it here
    if isinstance(params, Mapping):
        if params.get("rope_type", "default") != "default":
            raise ConfigError(f"{where}: field 'rope_parameters.rope_type'={params['rope_type']!r}"
                              " is not supported (only 'default' RoPE)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    raise ConfigError(f"{where}: missing field 'rope_theta'")


def from_hf_config(hf: Mapping[str, Any] | str | Path, name: str | None = None) -> ModelConfig:
    """Build a ModelConfig from a HF config mapping, a ``config.json`` path or a model folder."""
    where = "config"
    if not isinstance(hf, Mapping):
        path = Path(hf)
        path = path / "config.json" if path.is_dir() else path
        where = str(path)
        try:
            hf = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON: {err}") from None
    archs = hf.get("architectures") or []
    arch = MODEL_TYPES.get(hf.get("model_type", ""))
    if arch is None or any(a not in ARCHITECTURES for a in archs):
        raise ConfigError(
            f"{where}: field 'model_type'={hf.get('model_type')!r} / 'architectures'={archs} is not "
            f"supported; clinmega converts {sorted(ARCHITECTURES)}")
    for key, required, why in _REQUIRED:
        if key in hf and hf[key] != required and not (required is None and not hf[key]):
            raise ConfigError(f"{where}: field {key!r}={hf[key]!r} is not supported ({why}); "
                              f"expected {required!r}")
    heads = _get(hf, "num_attention_heads", where)
    hidden = _get(hf, "hidden_size", where)
    head_dim = hf.get("head_dim") or hidden // heads
    sliding = hf.get("sliding_window")
    if arch == "mixtral" and sliding:
        raise ConfigError(f"{where}: field 'sliding_window'={sliding} is not supported for Mixtral")
    fields = dict(
        name=name or hf.get("_name_or_path") or f"hf-{arch}",
        arch=arch,
        vocab_size=_get(hf, "vocab_size", where),
        hidden_size=hidden,
        ffn_hidden_size=_get(hf, "intermediate_size", where),
        num_layers=_get(hf, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_position_embeddings=_get(hf, "max_position_embeddings", where),
        rope_theta=_rope_theta(hf, where),
        sliding_window=sliding or None,
        norm_eps=float(_get(hf, "rms_norm_eps", where)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
    )
    if arch == "mixtral":
        fields.update(num_experts=_get(hf, "num_local_experts", where),
                      moe_router_topk=_get(hf, "num_experts_per_tok", where),
                      moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.02)))
    try:
        return ModelConfig(**fields)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def to_hf_config(cfg: ModelConfig, torch_dtype: str = "bfloat16") -> dict[str, Any]:
    """The HF ``config.json`` for ``cfg`` (what ``export-hf`` writes)."""
    hf: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if cfg.is_moe else "MistralForCausalLM"],
        "model_type": cfg.arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "sliding_window": cfg.sliding_window,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }
    if cfg.is_moe:
        hf.update(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_router_topk,
                  router_aux_loss_coef=cfg.moe_aux_loss_coeff, output_router_logits=False)
    return hf
