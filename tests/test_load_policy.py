"""The one strict-load policy (``_extra_state`` tolerated, every other key named) and checkpoints
moving between the Transformer Engine and the local spec's keys (``CHECKPOINT_KEY_DIFFERENCES``)."""

import pytest
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

import conversion_cases as cc
from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
from clinmega.conversion import export_hf, import_hf
from clinmega.conversion.checkpoint_info import hf_model_config
from clinmega.models import build_model
from clinmega.models.dist_ckpt import (
    CheckpointKeyError,
    load_model_weights,
    load_module_state,
    load_sharded,
    model_sharded_state_dict,
    save_model_weights,
)
from clinmega.models.spec import CHECKPOINT_KEY_DIFFERENCES, checkpoint_key_alternative
from clinmega.runtime import initialize
from test_conversion import assert_bit_exact


class FP8Meta(torch.nn.Module):
    """A module with extra state the way Transformer Engine's modules carry FP8 metadata."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.meta = torch.tensor([1.0])

    def get_extra_state(self):
        return {"scale": self.meta.clone()}

    def set_extra_state(self, state):
        self.meta = state["scale"]


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.norm = FP8Meta(), torch.nn.LayerNorm(3)


def test_policy_tolerates_exactly_extra_state():
    block = Block()
    state = block.state_dict()
    assert "attn._extra_state" in state
    without = {k: v for k, v in state.items() if k != "attn._extra_state"}
    with pytest.raises(RuntimeError, match="_extra_state"):  # what torch's strict load does
        Block().load_state_dict(without)
    fresh = Block()
    load_module_state(fresh, without, "ckpt")
    assert torch.equal(fresh.attn.linear.weight, block.attn.linear.weight)
    load_module_state(fresh, {**state, "other._extra_state": b""}, "ckpt")  # unexpected extra state
    with pytest.raises(CheckpointKeyError, match=r"ckpt: missing 'norm.weight'"):
        load_module_state(Block(), {k: v for k, v in state.items() if k != "norm.weight"}, "ckpt")
    with pytest.raises(CheckpointKeyError, match=r"unexpected 'attn.linear.scale'"):
        load_module_state(Block(), {**state, "attn.linear.scale": torch.ones(1)}, "ckpt")
    with pytest.raises(CheckpointKeyError, match="norm.bias"):  # extra state does not hide it
        load_module_state(Block(), {k: v for k, v in without.items() if k != "norm.bias"}, "c")


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny HF Mixtral imported TE-keyed (no TE needed) and local-keyed."""
    root = tmp_path_factory.mktemp("keys")
    hf = cc.make_hf_model("mixtral", root / "hf")
    import_hf(hf, root / "te", transformer_impl="transformer_engine", progress=False)
    import_hf(hf, root / "local", transformer_impl="local", progress=False)
    initialize(ParallelConfig(), RuntimeConfig())
    return root, hf, hf_model_config(hf)


def _stored(path) -> set:
    return set(dist_checkpointing.load_tensors_metadata(str(path)))


def test_te_keyed_import_loads_into_local_and_exports_bit_exact(mixtral, tmp_path):
    root, hf, cfg = mixtral
    [(local_key, te_key)] = CHECKPOINT_KEY_DIFFERENCES.items()
    assert te_key in _stored(root / "te") and local_key not in _stored(root / "te")
    assert local_key in _stored(root / "local") and te_key not in _stored(root / "local")
    (model,) = build_model(cfg, ParallelConfig(), PrecisionConfig("fp32"),
                           RuntimeConfig(transformer_impl="local"))
    load_model_weights([model], root / "te")  # the local model asks for local_key: renamed
    toks = cc.tokens(cfg.vocab_size)
    model.eval()
    with torch.no_grad():
        logits = model(toks, torch.arange(toks.shape[1]).repeat(toks.shape[0], 1), None)
    assert (logits - cc.hf_logits(hf, toks)).abs().max() <= 1e-5
    save_model_weights([model], tmp_path / "resaved")  # written local-keyed
    assert local_key in _stored(tmp_path / "resaved")
    export_hf(tmp_path / "resaved", tmp_path / "out", model=cfg, assets=hf, progress=False)
    assert_bit_exact(hf, tmp_path / "out")
    export_hf(root / "te", tmp_path / "out_te", progress=False)
    assert_bit_exact(hf, tmp_path / "out_te")


def test_local_keyed_checkpoint_serves_a_te_keyed_request(mixtral):
    """What a TE model asks for (the TE keys and its _extra_state objects) loads from a local-keyed
    checkpoint; a key neither spec has still fails, named."""
    root, _, cfg = mixtral
    (model,) = build_model(cfg, ParallelConfig(), PrecisionConfig("fp32"),
                           RuntimeConfig(transformer_impl="local"))

    def te_request():
        sharded = model_sharded_state_dict([model])
        for sh in sharded["model"].values():
            if isinstance(sh, ShardedTensor) and sh.key in CHECKPOINT_KEY_DIFFERENCES:
                sh.key = CHECKPOINT_KEY_DIFFERENCES[sh.key]
        sharded["model"]["decoder.final_layernorm._extra_state"] = ShardedObject(
            "decoder.final_layernorm._extra_state", None, (1,), (0,), replica_id=0)
        return sharded

    loaded = load_sharded(te_request(), root / "local")["model"]
    assert "decoder.final_layernorm._extra_state" not in loaded
    reference = load_sharded(model_sharded_state_dict([model]), root / "local")["model"]
    norm = [k for k in reference if k.endswith("pre_mlp_layernorm.weight")]
    assert norm and all(torch.equal(loaded[k], reference[k]) for k in norm)
    bad = te_request()
    weight = next(sh for sh in bad["model"].values() if isinstance(sh, ShardedTensor))
    weight.key = "decoder.layers.self_attention.linear_qkv.bias"
    with pytest.raises(CheckpointKeyError, match=r"missing 'decoder.layers.self_attention.linear_qkv.bias'"):
        load_sharded(bad, root / "local")


def test_key_alternative_goes_both_ways():
    for local, te in CHECKPOINT_KEY_DIFFERENCES.items():
        assert checkpoint_key_alternative(local) == te and checkpoint_key_alternative(te) == local
    assert checkpoint_key_alternative("decoder.layers.mlp.linear_fc2.weight") is None
