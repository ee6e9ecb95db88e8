"""Padded and extended vocabularies: a tiny Mistral whose vocabulary (32,000 pieces + 3 added
tokens = 32,003) 2 does not divide converts, trains and evaluates at TP1, TP2 and PP2 with the
logits, loss, scores and generations of transformers' unpadded model; export writes exactly the
real vocabulary; ``--add-tokens`` gives a model + tokenizer pair that transformers loads."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

import conversion_cases as cc
from conversion_cases import assert_bit_exact, read_all
import vocab_cases as vc
from clinmega.config import ConfigError, ParallelConfig, PrecisionConfig, RuntimeConfig
from clinmega.config.schema import ModelConfig
from clinmega.conversion import export_hf, import_hf
from clinmega.conversion.added_tokens import parse_tokens
from clinmega.checkpoints import ASSETS_DIR, METADATA_FILE
from clinmega.conversion.checkpoint_info import hf_model_config
from clinmega.conversion.dist_io import DistCheckpointReader
from clinmega.conversion.errors import ConversionError
from clinmega.models import build_model, check_layout
from clinmega.models.dist_ckpt import load_model_weights
from clinmega.models.vocab import mask_padded_logits
from clinmega.runtime import init_model_parallel
from clinmega.runtime.local_group import run_local_group

TOL = 1e-5
NEW = ["metoprolol", "<|im_end|>"]  # added by import-hf --add-tokens (the second as special)


def with_vocab(cfg, vocab_size):
    return dataclasses.replace(cfg, vocab_size=vocab_size)


def hf_loss(folder, toks) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(toks, labels=toks).loss.item()


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """(root, cfg, tokens, HF logits, HF loss) of the 32,003-token model imported on one process."""
    root = tmp_path_factory.mktemp("vocab")
    hf = vc.make_padded_hf_model(root / "hf")
    import_hf(hf, root / "tp1", progress=False)
    cfg = hf_model_config(hf)
    toks, loss_toks = vc.sample_tokens(), vc.sample_tokens(vc.LOSS_SEQ)
    return root, cfg, toks, cc.hf_logits(hf, toks), (loss_toks, hf_loss(hf, loss_toks))


@pytest.mark.parametrize("vocab", [1, 127, 32000, 32003, 32768, 50257, 128256, 151665])
@pytest.mark.parametrize("multiple", [1, 64, 128])
def test_padded_vocab_size_is_megatron_lms_rule(vocab, multiple):
    from megatron.core.tokenizers.utils.build_tokenizer import vocab_size_with_padding

    cfg = ModelConfig(vocab_size=vocab, make_vocab_size_divisible_by=multiple)
    for tp in (1, 2, 3, 4, 8):
        args = SimpleNamespace(make_vocab_size_divisible_by=multiple, tensor_model_parallel_size=tp,
                               rank=0)
        assert cfg.padded_vocab_size(tp) == vocab_size_with_padding(vocab, args, False)
    assert ModelConfig(vocab_size=32000).padded_vocab_size(4) == 32256  # 128 x TP by default


def test_tp_that_does_not_divide_the_vocabulary_is_accepted():
    cfg = ModelConfig(vocab_size=32003, num_query_groups=8)
    check_layout(cfg, ParallelConfig(tensor_parallel=2))  # padding, not a refusal
    with pytest.raises(ConfigError, match="make_vocab_size_divisible_by"):
        ModelConfig(make_vocab_size_divisible_by=0)


def test_mask_padded_logits_per_shard():
    full = torch.randn(2, 3, 16)
    shards = [mask_padded_logits(s.clone(), 11, i * 8) for i, s in enumerate(full.split(8, -1))]
    masked = mask_padded_logits(full.clone(), 11)
    assert torch.equal(torch.cat(shards, -1), masked)
    assert torch.equal(masked[..., :11], full[..., :11]) and masked[..., 11:].eq(-torch.inf).all()


def test_padded_import_logits_loss_and_gradients_at_tp1(padded):
    root, cfg, toks, reference, (loss_toks, reference_loss) = padded
    stored = DistCheckpointReader(root / "tp1")
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert stored.shape(key) == (32128, cfg.hidden_size)  # 32003 -> a multiple of 128
        pad = stored.read(key, (vc.VOCAB, 0), (32128 - vc.VOCAB, cfg.hidden_size))
        assert pad.eq(0).all()
    info = json.loads((root / "tp1" / METADATA_FILE).read_text())
    assert info["model"]["vocab_size"] == vc.VOCAB
    assert info["provenance"]["vocabulary"]["padded_vocab_size"] == 32128
    init_model_parallel(ParallelConfig(), RuntimeConfig())
    logits = cc.megatron_logits(cfg, ParallelConfig(), root / "tp1", toks)
    assert logits.shape == reference.shape and (logits - reference).abs().max().item() <= TOL
    loss = vc.training_loss(cfg, ParallelConfig(), root / "tp1", loss_toks)
    assert abs(loss - reference_loss) <= TOL
    # The padded rows take no part: zero gradient for the output layer's and embedding's.
    [model] = build_model(cfg, ParallelConfig(), PrecisionConfig(dtype="fp32"), RuntimeConfig())
    load_model_weights([model], root / "tp1")
    with torch.no_grad():
        model.output_layer.weight[vc.VOCAB:] = torch.randn(32128 - vc.VOCAB, cfg.hidden_size)
    batch = vc.lm_batch(loss_toks)
    loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
    assert abs(loss.item() - reference_loss) <= TOL  # whatever the padded rows hold
    loss.backward()
    for weight in (model.output_layer.weight, model.embedding.word_embeddings.weight):
        assert weight.grad[vc.VOCAB:].eq(0).all() and weight.grad[:vc.VOCAB].abs().sum() > 0


def test_padded_round_trip_is_bit_exact(padded, tmp_path):
    root, cfg, toks, reference, _ = padded
    export_hf(root / "tp1", tmp_path / "out", progress=False)
    assert_bit_exact(root / "hf", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == vc.VOCAB
    assert torch.equal(cc.hf_logits(tmp_path / "out", toks), reference)


@pytest.mark.distributed
def test_padded_vocabulary_on_two_ranks(padded, tmp_path):
    """TP2 / PP2 logits and training loss, a 2-rank TP2 import (32,256 rows) loaded at
    TP1 and exported bit-exact, and the Megatron eval backend at TP2 against the HF backend."""
    from clinmega.evaluation.backends.hf import HFBackend

    root, cfg, toks, reference, (_, reference_loss) = padded
    ranks = run_local_group(vc.padded_cases, 2, (str(root),))
    got = ranks[0]
    for name in ("tp2", "pp2"):
        diff = (got[f"logits/{name}"] - reference).abs().max().item()
        assert got[f"logits/{name}"].shape == reference.shape and diff <= TOL, (name, diff)
        assert abs(got[f"loss/{name}"] - reference_loss) <= TOL, name
    assert (got["logits/import2_tp2_at_tp1"] - reference).abs().max().item() <= TOL
    assert DistCheckpointReader(root / "import2_tp2").shape("output_layer.weight")[0] == 32256
    export_hf(root / "import2_tp2", tmp_path / "from_tp2", progress=False)
    assert_bit_exact(root / "hf", tmp_path / "from_tp2")

    hf = HFBackend.from_pretrained(root / "hf", batch_size=4, max_length=64)
    scores = hf.loglikelihood(vc.REQUESTS)
    assert max(abs(a - b) for a, b in zip(scores, got["loglikelihood"])) <= 1e-4
    assert ranks[1]["loglikelihood"] == got["loglikelihood"]
    assert hf.generate(vc.PROMPTS, vc.NEW_TOKENS) == got["greedy"] == ranks[1]["greedy"]
    sampled = hf.generate(vc.PROMPTS, vc.NEW_TOKENS, temperature=1.0, seed=3)
    assert sampled == got["sampled"] == ranks[1]["sampled"]


def test_add_tokens_exports_a_pair_transformers_loads(padded, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _, toks, _, _ = padded
    ckpt = tmp_path / "extended"
    import_hf(root / "hf", ckpt, progress=False, add_tokens=[NEW[0], "hypertension", "the"],
              add_special_tokens=NEW[1:])
    info = json.loads((ckpt / METADATA_FILE).read_text())["provenance"]["vocabulary"]
    new_ids = {NEW[0]: vc.VOCAB, NEW[1]: vc.VOCAB + 1}
    assert info["added_tokens"] == new_ids and info["vocab_size"] == vc.VOCAB + 2
    assert set(info["already_present"]) == {"hypertension", "the"}  # skipped, ids unchanged
    assets = AutoTokenizer.from_pretrained(str(ckpt / ASSETS_DIR))  # what prepare/eval can use
    assert len(assets) == vc.VOCAB + 2
    assert json.loads((ckpt / ASSETS_DIR / "config.json").read_text())["vocab_size"] == vc.VOCAB + 2

    out = tmp_path / "hf_out"
    export_hf(ckpt, out, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert len(tokenizer) == model.config.vocab_size == vc.VOCAB + 2
    ids = tokenizer.encode(f"Start {NEW[0]} now {NEW[1]}", add_special_tokens=False)
    assert new_ids[NEW[0]] in ids and new_ids[NEW[1]] in ids
    assert tokenizer.decode(ids, skip_special_tokens=True).count(NEW[1]) == 0
    # Old rows bit-exact, new rows the float64 mean of the source rows.
    source, exported = read_all(root / "hf"), read_all(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        old = source[name]
        assert torch.equal(exported[name][: vc.VOCAB], old)
        mean = old.double().mean(dim=0).to(old.dtype)
        assert torch.equal(exported[name][vc.VOCAB:], mean.expand(2, -1))
    # The exported pair computes what the Megatron model computes, on the new ids too.
    cfg = hf_model_config(out)
    toks = toks.clone()
    toks[:, 7] = new_ids[NEW[0]]
    toks[:, 9] = new_ids[NEW[1]]
    init_model_parallel(ParallelConfig(), RuntimeConfig())
    megatron = cc.megatron_logits(cfg, ParallelConfig(), ckpt, toks)
    with torch.no_grad():
        reference = model(toks).logits.float()
    assert megatron.shape == reference.shape and (megatron - reference).abs().max().item() <= TOL
    # With the source's config (32,003) the added rows would be cut off: refused.
    with pytest.raises(ConversionError, match="vocabulary has 32005 tokens .* vocab_size=32003"):
        export_hf(ckpt, tmp_path / "cut", hf_model_config(root / "hf"), progress=False)
    (ckpt / METADATA_FILE).unlink()  # no record: the stored rows must still be a padding of 32,003
    with pytest.raises(ConversionError, match="or 31877 padded for a tensor-parallel size"):
        export_hf(ckpt, tmp_path / "cut", with_vocab(hf_model_config(root / "hf"), 32005 - 128),
                  progress=False)
    assert not (tmp_path / "cut").exists()


def test_add_tokens_input_errors(padded, tmp_path):
    root = padded[0]
    listed = tmp_path / "tokens.txt"
    listed.write_text("\ufeffalpha\n\n beta gamma\n", encoding="utf-8")
    assert parse_tokens(str(listed)) == ["alpha", " beta gamma"]
    assert parse_tokens("a,b,,c") == ["a", "b", "c"]
    with pytest.raises(ConversionError, match="no tokens"):
        parse_tokens(",,")
    # A model whose config has more rows than its tokenizer: new ids would be ambiguous.
    hf = tmp_path / "hf"
    hf.mkdir()
    for name in ("config.json", "tokenizer.model"):  # the 32,000-piece tokenizer alone
        (hf / name).write_bytes((root / "hf" / name).read_bytes())
    with pytest.raises(ConversionError, match="32000 tokens but config.json vocab_size is 32003"):
        import_hf(hf, tmp_path / "out", progress=False, add_tokens=["alpha"])
    assert not (tmp_path / "out").exists()
