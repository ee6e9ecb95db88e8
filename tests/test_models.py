"""Presets, parameter counts, HF config round trip, layouts, and single-process forward/backward."""

import dataclasses

import pytest
import torch
import transformers

from clinmega.config import ConfigError, ModelConfig, ParallelConfig
from clinmega.models import (
    PRESETS,
    PUBLISHED_PARAMS,
    check_layout,
    count_active_parameters,
    count_parameters,
    from_hf_config,
    get_preset,
    to_hf_config,
)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_full_size_parameter_counts_equal_published(name):
    assert count_parameters(PRESETS[name]) == PUBLISHED_PARAMS[name]


def test_mixtral_active_parameters():
    # 12.9B active of 46.7B (2 of 8 experts per token).
    assert round(count_active_parameters(PRESETS["mixtral-8x7b"]) / 1e9, 1) == 12.9


def _hf_model_params(cfg: ModelConfig) -> int:
    hf_cls = {"mistral": transformers.MistralConfig, "mixtral": transformers.MixtralConfig}[cfg.arch]
    hf_cfg = hf_cls(**to_hf_config(cfg))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(n for n in PRESETS if n.startswith("tiny")))
def test_tiny_parameter_count_matches_transformers(name):
    assert count_parameters(PRESETS[name]) == _hf_model_params(PRESETS[name])


def test_full_size_count_matches_transformers_on_meta_device():
    assert count_parameters(PRESETS["mixtral-8x7b"]) == _hf_model_params(PRESETS["mixtral-8x7b"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_config_round_trip_through_transformers(name, tmp_path):
    cfg = PRESETS[name]
    hf_cls = {"mistral": transformers.MistralConfig, "mixtral": transformers.MixtralConfig}[cfg.arch]
    hf_cls(**to_hf_config(cfg)).save_pretrained(tmp_path)  # transformers writes config.json
    back = from_hf_config(tmp_path, name=cfg.name)
    assert back == cfg


@pytest.mark.parametrize("field,value", [
    ("hidden_act", "gelu"), ("tie_word_embeddings", True), ("attention_bias", True),
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
])
def test_hf_config_rejects_unrepresentable_fields(field, value):
    hf = to_hf_config(PRESETS["tiny-mistral-v0.1"])
    hf[field] = value
    with pytest.raises(ConfigError, match=field):
        from_hf_config(hf)


def test_hf_config_rejects_other_architectures_and_missing_fields(tmp_path):
    hf = to_hf_config(PRESETS["tiny-mistral-v0.1"])
    with pytest.raises(ConfigError, match="model_type"):
        from_hf_config({**hf, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    del hf["num_hidden_layers"]
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        from_hf_config(hf)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=str(tmp_path / "config.json")):
        from_hf_config(tmp_path)


def test_sliding_window_maps_to_megatron_window():
    from clinmega.config import PrecisionConfig
    from clinmega.models import transformer_config

    tc = transformer_config(PRESETS["tiny-mistral-v0.1"], ParallelConfig(), PrecisionConfig("fp32"))
    assert tc.window_size == (7, 0)
    assert transformer_config(PRESETS["tiny-mistral-v0.2"], ParallelConfig(),
                              PrecisionConfig("fp32")).window_size is None


@pytest.mark.parametrize("parallel,match", [
    (ParallelConfig(tensor_parallel=4), "KV groups"),
    (ParallelConfig(pipeline_parallel=3), "split evenly"),
    (ParallelConfig(expert_parallel=2), "no experts"),
])
def test_impossible_layouts_are_rejected(parallel, match):
    with pytest.raises(ConfigError, match=match):
        check_layout(PRESETS["tiny-mistral-v0.1"], parallel)


def test_moe_layouts_are_checked():
    mixtral = PRESETS["tiny-mixtral"]
    with pytest.raises(ConfigError, match="num_experts"):
        check_layout(mixtral, ParallelConfig(expert_parallel=3))
    with pytest.raises(ConfigError, match="sequence_parallel"):
        check_layout(mixtral, ParallelConfig(tensor_parallel=2))
    check_layout(mixtral, ParallelConfig(tensor_parallel=2, sequence_parallel=True,
                                         expert_parallel=8))
    # megatron-core refuses MoE + TP without SP in training mode only: an evaluation model may
    check_layout(mixtral, ParallelConfig(tensor_parallel=2), training=False)


def test_fp8_without_transformer_engine_is_refused():
    from clinmega.config import PrecisionConfig
    from clinmega.models import transformer_config

    with pytest.raises(ConfigError, match="precision.fp8: FP8 needs Transformer Engine"):
        transformer_config(PRESETS["tiny-mistral-v0.1"], ParallelConfig(),
                           PrecisionConfig(dtype="bf16", fp8="hybrid"))


def test_get_preset_overrides_and_unknown_name():
    assert get_preset("tiny-mixtral", num_layers=2).num_layers == 2
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("llama-70b")
    with pytest.raises(ConfigError, match="num_query_groups"):
        dataclasses.replace(PRESETS["tiny-mistral-v0.1"], num_query_groups=3)


def test_context_parallel_needs_transformer_engine():
    from clinmega.config import PrecisionConfig
    from clinmega.models import transformer_config
    from clinmega.models.spec import resolve_transformer_impl

    if resolve_transformer_impl("auto") == "local":
        with pytest.raises(ConfigError, match="parallel.context_parallel"):
            transformer_config(PRESETS["tiny-mistral-v0.1"], ParallelConfig(context_parallel=2),
                               PrecisionConfig("fp32"))


@pytest.mark.parametrize("name", ["tiny-mistral-v0.1", "tiny-mistral-v0.3"])
def test_random_hf_checkpoint_loads_offline_with_the_real_tokenizer(name, tmp_path):
    from clinmega.demo.hf_checkpoint import save_random_hf_checkpoint

    cfg = PRESETS[name]
    save_random_hf_checkpoint(cfg, tmp_path, seed=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == cfg.vocab_size
    ids = tok("The patient has a fever.")["input_ids"]
    assert ids[0] == 1 and len(ids) > 3
    assert from_hf_config(tmp_path, name=name) == cfg
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)
