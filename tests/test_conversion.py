"""HF -> megatron-core -> HF conversion of tiny random Mistral v0.1 / v0.3 and Mixtral models:
logits equal HF's at TP1 (one process) and at TP2 / PP2 / EP2 (2 gloo ranks), and the round trip
is bit-exact and loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch

import conversion_cases as cc
from conversion_cases import assert_bit_exact, read_all
from clinmega.config import ParallelConfig, RuntimeConfig
from clinmega.conversion import export_hf, import_hf
from clinmega.conversion.checkpoint_info import hf_model_config
from clinmega.conversion.dist_io import DistCheckpointReader
from clinmega.runtime import init_model_parallel

KINDS = list(cc.KINDS)
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: (hf folder, TP1 import, HF logits)}; the sliding-window model is saved sharded."""
    root = tmp_path_factory.mktemp("conv")
    out = {}
    for kind in KINDS:
        shard = "100KB" if kind == "mistral-v0.1" else None
        hf = cc.make_hf_model(kind, root / kind / "hf", max_shard_size=shard)
        import_hf(hf, root / kind / "tp1", progress=False)
        cfg = hf_model_config(hf)
        out[kind] = (hf, root / kind / "tp1", cc.hf_logits(hf, cc.tokens(cfg.vocab_size)))
    return root, out


@pytest.mark.parametrize("kind", KINDS)
def test_import_logits_match_hf_single_process(models, kind):
    _, found = models
    hf, ckpt, reference = found[kind]
    cfg = hf_model_config(hf)
    init_model_parallel(ParallelConfig(), RuntimeConfig())
    logits = cc.megatron_logits(cfg, ParallelConfig(), ckpt, cc.tokens(cfg.vocab_size))
    assert reference.std() > 0.5  # random norms/weights: a wrong mapping would show
    assert (logits - reference).abs().max().item() <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_exact_and_loads_in_transformers(models, kind, tmp_path):
    _, found = models
    hf, ckpt, reference = found[kind]
    summary = export_hf(ckpt, tmp_path / "out", progress=False)
    assert summary.tensors == len(read_all(hf)) and summary.peak_rss > 0
    assert_bit_exact(hf, tmp_path / "out")
    tokenizer = (tmp_path / "out" / "tokenizer.model").read_bytes()
    assert tokenizer == (hf / "tokenizer.model").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"
    cfg = hf_model_config(hf)
    logits = cc.hf_logits(tmp_path / "out", cc.tokens(cfg.vocab_size))
    assert torch.equal(logits, reference)


def test_bf16_kept_and_sharded_export(tmp_path):
    hf = cc.make_hf_model("mixtral", tmp_path / "hf", dtype=torch.bfloat16)
    import_hf(hf, tmp_path / "mcore", progress=False)
    stored = DistCheckpointReader(tmp_path / "mcore")
    assert stored.dtype("decoder.layers.mlp.experts.experts.linear_fc1.weight") == torch.bfloat16
    export_hf(tmp_path / "mcore", tmp_path / "out", max_shard_bytes=300_000, progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_bit_exact(hf, tmp_path / "out")


LOAD_CASES = [cc.mistral_v01_load_tp2, cc.mistral_v01_load_pp2, cc.mistral_v03_load_tp2,
              cc.mixtral_load_ep2, cc.mixtral_load_tp2_sp]
IMPORT_CASES = {cc.mistral_v01_import_tp2: "mistral-v0.1", cc.mixtral_import_ep2: "mixtral"}


@pytest.fixture(scope="module")
def group(models):
    """One spawned 2-rank group runs every case of conversion_cases.TABLE."""
    root, found = models
    torch.save({kind: logits for kind, (_, _, logits) in found.items()}, root / cc.REFERENCE_LOGITS)
    return cc.TABLE.spawn(root)


def name(case) -> str:
    return case.__name__


@pytest.mark.distributed
@pytest.mark.parametrize("case", LOAD_CASES + list(IMPORT_CASES), ids=name)
def test_parallel_layout_logits_match_hf(group, case):
    a, b = group.ranks(case)
    assert a == b
    assert a <= TOL, (case.__name__, a)


@pytest.mark.distributed
@pytest.mark.parametrize("case", list(IMPORT_CASES), ids=name)
def test_two_rank_import_exports_the_same_hf_bits(group, models, case, tmp_path):
    """Written by 2 ranks at TP2 / EP2: back to the same HF bits."""
    root, found = models
    group.ranks(case)
    export_hf(root / case.__name__ / "mcore", tmp_path / "out", progress=False)
    assert_bit_exact(found[IMPORT_CASES[case]][0], tmp_path / "out")


@pytest.mark.distributed
def test_resharded_to_tp2_and_saved_exports_the_same_hf_bits(group, models, tmp_path):
    _, found = models
    resaved = group[cc.mistral_v01_resave_tp2]
    hf = found["mistral-v0.1"][0]
    export_hf(resaved, tmp_path / "resaved", hf_model_config(hf), assets=hf, progress=False)
    assert_bit_exact(hf, tmp_path / "resaved")
    cfg = hf_model_config(hf)
    logits = cc.hf_logits(tmp_path / "resaved", cc.tokens(cfg.vocab_size))
    assert torch.equal(logits, found["mistral-v0.1"][2])
