"""The mapping table and the small IO pieces, without running a conversion."""

from __future__ import annotations

import argparse
import time

import pytest
import torch
from safetensors import safe_open

from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
from clinmega.conversion import ConversionError, dtypes
from clinmega.conversion.cli import parse_size
from clinmega.conversion.hf_io import HFReader, PlannedTensor, SafetensorsWriter
from clinmega.conversion.mapping import (EXPERT, GLOBAL, QKV, GatedMLP, mapping_table,
                                         resolve_param, units)
from clinmega.conversion.prefetch import Prefetcher, exact_storage
from clinmega.conversion.rawio import contiguous_blocks
from clinmega.models import get_preset

# Module parameter names of the Transformer Engine spec (REFERENCE.md §2, models/spec.py).
TE_NAMES = {
    "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight": ("input_layernorm", 3, None),
    "decoder.layers.3.mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm", 3, None),
    "decoder.layers.1.mlp.experts.linear_fc1.weight5": ("experts.5.w1", 1, 5),
    "decoder.layers.1.mlp.experts.linear_fc2.weight7": ("experts.7.w2", 1, 7),
    "decoder.layers.2.pre_mlp_layernorm.weight": ("post_attention_layernorm", 2, None),
}


def test_qkv_rows_are_grouped_per_query_group():
    cfg = get_preset("tiny-mistral-v0.1")  # 4 heads, 2 groups, head_dim 16
    qkv = next(m for m in mapping_table(cfg) if isinstance(m, QKV))
    q = torch.arange(64.).repeat_interleave(64).reshape(64, 64)            # row r holds r
    k = 100 + torch.arange(32.).repeat_interleave(64).reshape(32, 64)
    v = 200 + torch.arange(32.).repeat_interleave(64).reshape(32, 64)
    fused = qkv.hf_to_megatron([q, k, v])
    assert fused.shape == qkv.shape == (128, 64)
    rows = fused[:, 0].tolist()
    group0 = list(range(32)) + [100 + i for i in range(16)] + [200 + i for i in range(16)]
    group1 = list(range(32, 64)) + [116 + i for i in range(16)] + [216 + i for i in range(16)]
    assert rows == group0 + group1
    assert all(torch.equal(a, b) for a, b in zip(qkv.megatron_to_hf(fused), (q, k, v)))


def test_gated_mlp_is_gate_then_up():
    cfg = get_preset("tiny-mistral-v0.1")
    fc1 = next(m for m in mapping_table(cfg) if isinstance(m, GatedMLP))
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    fused = fc1.hf_to_megatron([gate, up])
    assert fused.shape == fc1.shape and torch.equal(fused[:128], gate)
    assert all(torch.equal(a, b) for a, b in zip(fc1.megatron_to_hf(fused), (gate, up)))


@pytest.mark.parametrize("preset, per_layer, hf_per_layer", [
    ("tiny-mistral-v0.1", 6, 9), ("tiny-mixtral", 3 + 2 + 16, 5 + 1 + 24 + 1)])
def test_units_cover_every_hf_tensor_once(preset, per_layer, hf_per_layer):
    cfg = get_preset(preset)
    all_units = units(cfg)
    names = [n for u in all_units for n in u.hf_names]
    assert len(all_units) == 3 + cfg.num_layers * per_layer
    assert len(names) == len(set(names)) == 3 + cfg.num_layers * hf_per_layer
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    experts = [u for u in all_units if u.mapping.scope == EXPERT]
    assert {u.expert for u in experts} == set(range(cfg.num_experts or 0))
    assert all(u.index == () for u in all_units if u.mapping.scope == GLOBAL)


@pytest.mark.parametrize("preset", ["tiny-mistral-v0.1", "tiny-mixtral"])
def test_every_local_spec_parameter_is_mapped(preset):
    """Parameter names of a real (meta-device) model of the local spec resolve, and every
    mapping unit is hit exactly once."""
    from clinmega.models import build_model
    from clinmega.runtime import init_model_parallel, init_process_group

    init_process_group(RuntimeConfig())
    init_model_parallel(ParallelConfig(), RuntimeConfig())
    cfg = get_preset(preset)
    with torch.device("meta"):
        (model,) = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32"),
                               RuntimeConfig(transformer_impl="local"),
                               perform_initialization=False)
    table = mapping_table(cfg)
    hit = [resolve_param(name, table) for name, _ in model.named_parameters()]
    assert sorted(map(repr, hit)) == sorted(map(repr, units(cfg, table)))
    with pytest.raises(KeyError):
        resolve_param("decoder.layers.0.self_attention.linear_qkv._extra_state", table)


def test_transformer_engine_parameter_names_resolve():
    dense, moe = mapping_table(get_preset("tiny-mistral-v0.1")), mapping_table(
        get_preset("tiny-mixtral"))
    for name, (hf, layer, expert) in TE_NAMES.items():
        table = moe if "expert" in name or "pre_mlp" in name else dense
        unit = resolve_param(name, table)
        assert (unit.layer, unit.expert) == (layer, expert)
        assert any(hf in n for n in unit.hf_names), (name, unit.hf_names)
    norm = next(m for m in moe if m.te_key)
    assert norm.ckpt_key("transformer_engine") == "decoder.layers.pre_mlp_layernorm.weight"
    assert norm.ckpt_key("local") == "decoder.layers.mlp.linear_fc1.layer_norm_weight"


def test_safetensors_writer_shards_and_order(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 10).to(torch.bfloat16) for i in range(5)}
    planned = [PlannedTensor(n, (10, 10), torch.bfloat16) for n in tensors]
    writer = SafetensorsWriter(tmp_path, planned, max_shard_bytes=450)
    with pytest.raises(ConversionError, match=r"tensor 't1' .* expected 't0'"):
        writer.write("t1", tensors["t1"])
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                assert torch.equal(f.get_tensor(name), tensors[name])
    unfinished = SafetensorsWriter(tmp_path / "x", planned)
    with pytest.raises(ConversionError, match="'t0' was never written"):
        unfinished.close()


def test_views_are_read_and_written_in_place(tmp_path):
    """HF tensors go into / come out of strided ``hf_views`` (QKV's per-group rows) with the
    bytes a contiguous copy would have, and a bf16 file read into fp32 views is cast."""
    cfg = get_preset("tiny-mistral-v0.1")
    qkv = next(m for m in mapping_table(cfg) if isinstance(m, QKV))
    q, k, v = (torch.randn(*shape).to(torch.bfloat16) for shape in qkv.hf_shapes)
    fused = qkv.hf_to_megatron([q, k, v])
    views = qkv.hf_views(fused)
    assert not views[0].is_contiguous() and len(list(contiguous_blocks(views[0]))) == 2
    names = ["q", "k", "v"]
    writer = SafetensorsWriter(tmp_path, [PlannedTensor(n, t.shape, torch.bfloat16)
                                          for n, t in zip(names, (q, k, v))])
    for name, view in zip(names, views):
        writer.write(name, view)
    writer.close()
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:  # the library's reader
        assert all(torch.equal(f.get_tensor(n), t) for n, t in zip(names, (q, k, v)))
    reader = HFReader(tmp_path)
    assert {n: reader.tensors[n].shape for n in names} == {"q": (64, 64), "k": (32, 64),
                                                           "v": (32, 64)}
    back = torch.full(qkv.shape, float("nan"), dtype=torch.bfloat16)
    wide = torch.full(qkv.shape, float("nan"))
    for name, view, wide_view in zip(names, qkv.hf_views(back), qkv.hf_views(wide)):
        reader.read_into(name, view)
        reader.read_into(name, wide_view)
    assert torch.equal(back, fused) and torch.equal(wide, fused.float())
    with pytest.raises(ConversionError, match=r"tensor 'q' \[64, 64\] does not fit \[32, 64\]"):
        reader.read_into("q", torch.empty(32, 64))
    with pytest.raises(ConversionError, match=r"tensor 'q' \(64, 64\) .* expected 'x'"):
        SafetensorsWriter(tmp_path / "y", [PlannedTensor("x", (64, 64), torch.bfloat16)]
                          ).write("q", q)


def test_exact_storage_shares_memory_and_is_saved_without_clone():
    base = torch.arange(12.)
    half = base[6:].view(2, 3)
    alias = exact_storage(half)
    assert alias.untyped_storage().nbytes() == alias.nbytes == 24
    assert alias.data_ptr() == half.data_ptr() and torch.equal(alias, half)
    with pytest.raises(ValueError, match="contiguous"):
        exact_storage(base.view(3, 4).t())


def test_prefetcher_waits_for_dropped_work_before_going_out_of_order():
    events = []

    def work(item):
        events.append(("start", item))
        if item == 1:
            time.sleep(0.2)
        events.append(("end", item))
        return item * 10

    with Prefetcher(work, [0, 1, 2]) as prefetch:
        assert prefetch.get(0) == 0      # starts 1 in the background
        assert prefetch.get(2) == 20     # out of order: 1 must end before 2 starts
    assert events.index(("end", 1)) < events.index(("start", 2))


def test_cast_keeps_exact_values_and_refuses_loss():
    exact = torch.tensor([1.0, 0.5, -2.0, float("nan")])
    assert dtypes.cast(exact, torch.bfloat16, "w", False).dtype == torch.bfloat16
    lossy = torch.tensor([1.0 + 2**-12])
    with pytest.raises(ConversionError, match=r"tensor 'w': casting torch\.float32 to "
                                              r"torch\.bfloat16 would change values"):
        dtypes.cast(lossy, torch.bfloat16, "w", False)
    assert dtypes.cast(lossy, torch.bfloat16, "w", True).item() == 1.0
    bf16 = torch.randn(8).to(torch.bfloat16)
    assert torch.equal(dtypes.cast(bf16, torch.float32, "w", False), bf16.float())
    with pytest.raises(ConversionError, match="would change values"):
        dtypes.cast(torch.tensor([1e30]).to(torch.bfloat16), torch.float16, "w", False)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1024") == 1024 and parse_size("1.5 MB") == 1_500_000
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("five gigs")
