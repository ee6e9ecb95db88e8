"""Bad inputs and interrupted runs: each gives a ConversionError naming the file / tensor, and no
output folder that looks complete."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import conversion_cases as cc
from clinmega.checkpoints import METADATA_FILE
from clinmega.config import ParallelConfig
from clinmega.conversion import ConversionError, export_hf, import_hf
from clinmega.conversion import importer as importer_module
from clinmega.conversion.checkpoint_info import hf_model_config
from clinmega.cli import main as clinmega_main
from clinmega.conversion.dist_io import DistCheckpointReader
from clinmega.conversion.hf_io import SafetensorsWriter
from clinmega.conversion.staging import staging_dir
from clinmega.models import get_preset


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny HF Mistral (single file) and its import."""
    root = tmp_path_factory.mktemp("bad")
    hf = cc.make_hf_model("mistral-v0.1", root / "hf")
    import_hf(hf, root / "mcore", progress=False)
    return hf, root / "mcore"


@pytest.fixture
def hf(source, tmp_path):
    """A private copy of the HF folder to break."""
    return shutil.copytree(source[0], tmp_path / "hf")


def edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_architecture(hf, tmp_path):
    edit_config(hf, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConversionError, match=r"config\.json: field 'model_type'='llama'"):
        import_hf(hf, tmp_path / "out", progress=False)


def test_missing_shard(tmp_path):
    hf = cc.make_hf_model("mistral-v0.1", tmp_path / "hf", max_shard_size="100KB")
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ConversionError, match=rf"{shard.name}: shard listed in .* is missing"):
        import_hf(hf, tmp_path / "out", progress=False)


def test_missing_tensor(hf, tmp_path):
    edit_weights(hf, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ConversionError, match=r"missing tensor\(s\) \['model\.layers\.1\.mlp\."
                                              r"up_proj\.weight'\]"):
        import_hf(hf, tmp_path / "out", progress=False)


def test_unexpected_tensor(hf, tmp_path):
    edit_weights(hf, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight":
                                         torch.ones(16)}))
    with pytest.raises(ConversionError, match=r"model\.safetensors: unexpected tensor "
                                              r"'model\.layers\.0\.self_attn\.q_norm\.weight'"):
        import_hf(hf, tmp_path / "out", progress=False)


def test_shape_mismatch_with_config(hf, tmp_path):
    edit_config(hf, intermediate_size=96)
    with pytest.raises(ConversionError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp"
                                              r"\.gate_proj\.weight' has shape \[128, 64\], "
                                              r"config\.json implies \[96, 64\]"):
        import_hf(hf, tmp_path / "out", progress=False)


def test_damaged_safetensors(hf, tmp_path):
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) - 1000])  # a download cut short
    with pytest.raises(ConversionError, match=r"model\.safetensors: tensor 'model\.[^']+': "
                                              r"data_offsets .* \(truncated file\?\)"):
        import_hf(hf, tmp_path / "out", progress=False)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ConversionError, match=r"model\.safetensors: cannot read safetensors "
                                              r"header: Expecting property name"):
        import_hf(hf, tmp_path / "out", progress=False)
    weights.write_bytes(b"\xff" * 8 + data[8:100])
    with pytest.raises(ConversionError, match=r"header length \d+ does not fit the file"):
        import_hf(hf, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, message", [
    (dict(tensor_parallel=4, sequence_parallel=True), "4 does not divide the 2 KV groups"),
    (dict(expert_parallel=2), "the model has no experts"),
    (dict(pipeline_parallel=3), "4 layers cannot be split evenly"),
])
def test_impossible_layout(source, tmp_path, layout, message):
    with pytest.raises(ConversionError, match=message):
        import_hf(source[0], tmp_path / "out", ParallelConfig(**layout), progress=False)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_needs_overwrite(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ConversionError, match=r"out: output folder is not empty; pass --overwrite"):
        import_hf(source[0], out, progress=False)
    assert (out / "old.txt").exists()
    import_hf(source[0], out, overwrite=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "metadata.json").exists()
    with pytest.raises(ConversionError, match="not empty"):
        export_hf(source[1], out, progress=False)


def test_pickle_refused_unless_allowed(source, tmp_path):
    (tmp_path / "bin").mkdir()  # transformers 5 no longer writes .bin: write one like it did
    torch.save(load_file(source[0] / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(source[0] / "config.json", tmp_path / "bin")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin: pickle .* --allow-pickle"):
        import_hf(tmp_path / "bin", tmp_path / "out", progress=False)
    import_hf(tmp_path / "bin", tmp_path / "out", allow_pickle=True, progress=False)
    export_hf(tmp_path / "out", tmp_path / "hf", progress=False)
    original, back = load_file(source[0] / "model.safetensors"), load_file(tmp_path / "hf" /
                                                                          "model.safetensors")
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_lossy_downcast_refused_unless_allowed(source, tmp_path):
    with pytest.raises(ConversionError, match=r"tensor 'model\.embed_tokens\.weight': casting "
                                              r"torch\.float32 to torch\.bfloat16 would change"):
        import_hf(source[0], tmp_path / "out", dtype="bf16", progress=False)
    assert not (tmp_path / "out").exists() and not staging_dir(tmp_path / "out").exists()
    with pytest.raises(ConversionError, match="would change values"):
        export_hf(source[1], tmp_path / "hf", dtype="fp16", progress=False)
    import_hf(source[0], tmp_path / "out", dtype="bf16", allow_downcast=True, progress=False)
    assert DistCheckpointReader(tmp_path / "out").dtype("output_layer.weight") == torch.bfloat16


def test_interrupted_import_leaves_no_output(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []
    real = importer_module._Producer.__call__

    def dying(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(importer_module._Producer, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        import_hf(source[0], out, progress=False)
    assert not out.exists() and not staging_dir(out).exists()


def test_stale_staging_folder_is_replaced(source, tmp_path):
    out = tmp_path / "out"
    staging_dir(out).mkdir()
    (staging_dir(out) / "__0_0.distcp").write_bytes(b"half written by a killed run")
    import_hf(source[0], out, progress=False)
    assert not staging_dir(out).exists() and (out / "metadata.json").exists()
    assert not (out / "__0_0.distcp").exists() or (out / "__0_0.distcp").stat().st_size > 100


def test_interrupted_export_leaves_no_output(source, tmp_path, monkeypatch):
    real = SafetensorsWriter.write

    def dying(self, name, tensor):
        if self._next == 3:
            raise OSError("disk full")
        return real(self, name, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", dying)
    with pytest.raises(OSError, match="disk full"):
        export_hf(source[1], tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists() and not staging_dir(tmp_path / "hf").exists()


def test_export_bad_checkpoints(source, tmp_path):
    with pytest.raises(ConversionError, match=r"hf: not a megatron-core distributed checkpoint"):
        export_hf(source[0], tmp_path / "out", progress=False)
    bare = shutil.copytree(source[1], tmp_path / "bare")
    (bare / METADATA_FILE).unlink()
    with pytest.raises(ConversionError, match=r"bare: records no model config \(not written by "
                                              r"clinmega\); pass the model's HF"):
        export_hf(bare, tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match=r"tensor 'decoder\.layers\.mlp\.router\.weight' is "
                                              r"missing"):
        export_hf(bare, tmp_path / "out", get_preset("tiny-mixtral"), progress=False)
    wider = get_preset("tiny-mistral-v0.1", ffn_hidden_size=96)
    with pytest.raises(ConversionError, match=r"'decoder\.layers\.mlp\.linear_fc1\.weight' has "
                                              r"shape \[4, 256, 64\], the model config implies "
                                              r"\[4, 192, 64\]"):
        export_hf(bare, tmp_path / "out", wider, progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_exit_codes_and_messages(source, tmp_path, capsys):
    assert clinmega_main(["import-hf", str(source[0]), str(tmp_path / "m"), "--tp", "4",
                              "--no-progress"]) == 2
    assert "parallel.tensor_parallel: 4 does not divide" in capsys.readouterr().err
    assert clinmega_main(["import-hf", str(source[0]), str(tmp_path / "m"), "--no-progress"]) == 0
    assert "import hf: 31 tensors" in capsys.readouterr().out
    assert clinmega_main(["export-hf", str(tmp_path / "m"), str(tmp_path / "h"), "--no-progress",
                              "--max-shard-size", "200KB"]) == 0
    assert "export m: 39 tensors" in capsys.readouterr().out
    assert hf_model_config(tmp_path / "h") == hf_model_config(source[0])
    assert (tmp_path / "h" / "model.safetensors.index.json").exists()
