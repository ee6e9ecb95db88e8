"""YAML + dotlist loading, presets, and errors that name the key path."""

import pytest

from clinmega.config import ConfigError, FoundationConfig, load_config, to_yaml
from clinmega.models import PRESETS


def _write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_preset_then_yaml_then_overrides(tmp_path):
    path = _write(tmp_path, "model:\n  preset: mixtral-8x7b\n  num_layers: 4\nparallel:\n"
                            "  expert_parallel: 8\n")
    cfg = load_config(FoundationConfig, [path], ["parallel.tensor_parallel=2",
                                                  "parallel.sequence_parallel=true",
                                                  "precision.dtype=fp32"])
    assert cfg.model.num_experts == 8 and cfg.model.num_layers == 4
    assert cfg.model.hidden_size == PRESETS["mixtral-8x7b"].hidden_size
    assert cfg.parallel.tensor_parallel == 2 and cfg.parallel.expert_parallel == 8
    assert cfg.precision.dtype == "fp32"
    # the resolved YAML loads back to the same config
    again = load_config(FoundationConfig, [_write(tmp_path, to_yaml(cfg), "resolved.yaml")])
    assert again == cfg


def test_preset_from_the_command_line(tmp_path):
    cfg = load_config(FoundationConfig, [], ["model.preset=tiny-mistral-v0.3"])
    assert cfg.model == PRESETS["tiny-mistral-v0.3"]


@pytest.mark.parametrize("overrides,match", [
    (["model.hidden_sise=4"], r"model\.hidden_sise"),
    (["parallel.tensor_parallel=two"], r"parallel\.tensor_parallel"),
    (["precision.dtype=fp64"], r"precision\.dtype"),
    (["parallel.sequence_parallel=true"], r"parallel\.sequence_parallel"),
    (["runtime.backend=mpi"], r"runtime\.backend"),
    (["model.preset=gpt-5"], r"model\.preset"),
    (["tensor_parallel"], "key.path=value"),
    (["nosuchsection.x=1"], "nosuchsection"),
])
def test_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(FoundationConfig, [], overrides)


def test_yaml_errors_name_the_file(tmp_path):
    bad = _write(tmp_path, "model:\n  num_layers: [1\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_config(FoundationConfig, [bad])
    unknown = _write(tmp_path, "model:\n  numlayers: 2\n", "unknown.yaml")
    with pytest.raises(ConfigError, match=r"model\.numlayers.*unknown\.yaml"):
        load_config(FoundationConfig, [unknown])
    with pytest.raises(ConfigError, match="not found"):
        load_config(FoundationConfig, [tmp_path / "missing.yaml"])
