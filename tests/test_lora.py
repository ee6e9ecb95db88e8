"""LoRA on megatron-core (clinmega.models.lora / lora_layers / lora_model): B = 0 is the base
model, merged weights equal base + adapter, loss and adapter gradients under TP2, TP2+SP, PP2,
PP2xVPP2 and Mixtral EP2 (aux loss on) equal the single-process ones, only adapters train, the
optimizer state and gradient buffers hold the adapters only, adapter checkpoints (base found
through the LoRA record) resume bit-exactly after SIGKILL. Multi-rank cases: lora_cases.TABLE,
one spawned 2-rank gloo group; the SIGKILL run is a subprocess."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lora_cases as lc
import training_cases as tc
from clinmega.checkpoints import METADATA_FILE
from clinmega.config import ConfigError
from clinmega.models.lora import LoRAConfig, is_adapter_key, read_peft_record
from clinmega.models.lora_model import lora_base
from test_training import PY, run_ok, sigkill_after_checkpoint

LAYOUT_CASES = [lc.mistral_tp2, lc.mistral_tp2_sp, lc.mistral_pp2, lc.mistral_pp2_vpp2,
                lc.mixtral_ep2]
REL_TOL = 1e-5


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    return lc.TABLE.spawn(tmp_path_factory.mktemp("lora"))


@pytest.mark.distributed
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: c.__name__)
def test_lora_layout_matches_single_process(group, case):
    a, b = group.ranks(case)
    r = a
    assert math.isfinite(r["loss"]) and abs(r["loss"] - r["ref_loss"]) <= 1e-5, r
    assert r["tensors"] > 0 and r["grad_scale"] > 0, r
    assert r["min_grad_norm"] > 1e-6, r  # every adapter tensor gets a real gradient
    assert r["max_rel_diff"] <= REL_TOL, r
    for rank in (a, b):  # frozen weights: no gradient buffer, only the adapters'
        assert rank["frozen_with_grad"] == [], rank["frozen_with_grad"][:5]
        assert rank["grad_buffer_numel"] >= rank["adapter_numel"] > 0
        assert rank["grad_buffer_numel"] < 2 * rank["adapter_numel"] + 1024  # bucket padding


@pytest.mark.distributed
def test_lora_b0_is_the_base_model_and_merged_weights_equal_the_adapter(group):
    r = group[lc.sft_lora_dp2]
    assert torch.equal(r["step0"], r["base_logits"])  # B = 0: exactly the base logits
    assert not torch.allclose(r["lora_logits"], r["base_logits"], atol=1e-4)  # it trained
    assert (r["merged_logits"] - r["lora_logits"]).abs().max().item() <= 1e-5


@pytest.mark.distributed
def test_lora_trains_only_the_adapters(group):
    r = group[lc.sft_lora_dp2]
    assert all(math.isfinite(v) for v in r["losses"]), r["losses"]
    assert r["trainable"] and all(is_adapter_key(n) for n in r["trainable"]), r["trainable"]
    assert r["changed"], "no parameter changed"
    assert all(is_adapter_key(n) for n in r["changed"]), [n for n in r["changed"]
                                                           if not is_adapter_key(n)]
    lora_b = [n for n in r["trainable"] if n.endswith("lora_b.weight")]
    assert set(lora_b) <= set(r["changed"])  # every B moved away from 0
    # packed SFT with NEFTune: the noise still reaches the (frozen) embedding output
    assert 0 < r["neftune_noise"] <= r["neftune_alpha"] / r["hidden"] ** 0.5, r["neftune_noise"]


@pytest.mark.distributed
def test_lora_optimizer_state_and_grad_buffers_hold_only_the_adapters(group):
    r = group[lc.sft_lora_dp2]
    assert r["opt_numel"] == 2 * r["adapter_numel"], r  # Adam's exp_avg + exp_avg_sq (fp32)
    assert r["adapter_numel"] <= r["grad_buffer_numel"] < 2 * r["adapter_numel"] + 1024, r


def test_load_policy_parts_tolerate_exactly_the_other_part():
    from clinmega.models.dist_ckpt import CheckpointKeyError, check_load_keys

    adapter = "decoder.layers.0.mlp.linear_fc1.lora_a.weight"
    weight = "decoder.layers.0.mlp.linear_fc1.weight"
    check_load_keys([adapter], [], "base", part="base")  # the base lacks the adapters
    check_load_keys([weight], [], "adapters", part="adapters")  # adapters lack the base
    with pytest.raises(CheckpointKeyError, match="missing 'decoder.layers.0.mlp.linear_fc1.weight'"):
        check_load_keys([adapter, weight], [], "base", part="base")
    with pytest.raises(CheckpointKeyError, match="lora_a.weight"):
        check_load_keys([adapter, weight], [], "adapters", part="adapters")
    with pytest.raises(CheckpointKeyError, match="lora_a.weight"):
        check_load_keys([adapter], [], "whole model")  # a full load needs the adapters too
    with pytest.raises(CheckpointKeyError, match="unexpected"):
        check_load_keys([], [adapter], "base", part="base")


def test_te_layernorm_linear_adapter_input_is_the_normed_input():
    """TE's fused norm-linear: the adapter sees RMSNorm(x) recomputed from the module's own norm
    weight (also zero-centred gamma), as torch's RMSNorm (the local spec's norm) computes it."""
    from types import SimpleNamespace

    from clinmega.models.lora_layers import _rms_norm

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 2, 16, generator=gen), torch.rand(16, generator=gen) + 0.5
    ref = torch.nn.RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(w)
        expected = ref(x)
    for weight, centred in ((w, False), (w - 1, True)):
        te = SimpleNamespace(layer_norm_weight=weight, eps=1e-5, normalization="RMSNorm",
                             zero_centered_gamma=centred)
        assert (_rms_norm(te, x) - expected).abs().max().item() <= 1e-6
    with pytest.raises(ConfigError, match="only RMSNorm"):
        _rms_norm(SimpleNamespace(layer_norm_weight=w, eps=1e-5, normalization="LayerNorm"), x)


# --- the base a LoRA run trains on --------------------------------------------------------------
def test_lora_base_errors(tmp_path):
    from clinmega.checkpoints import CheckpointInfo

    with pytest.raises(ConfigError, match="needs checkpoint.load_weights"):
        lora_base(LoRAConfig(), None, None, resumed=False)
    full = CheckpointInfo(tmp_path, None, {})
    with pytest.raises(ConfigError, match="full fine-tuning checkpoint"):
        lora_base(LoRAConfig(), tmp_path, full, resumed=True)
    record = {"peft": {"method": "lora", "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.0,
                                                  "targets": ["linear_qkv"]},
                       "base": {"path": str(tmp_path), "description_sha256": None}}}
    adapters = CheckpointInfo(tmp_path, None, record)
    with pytest.raises(ConfigError, match="is a LoRA adapter checkpoint"):
        lora_base(LoRAConfig(), tmp_path, adapters, resumed=False)
    with pytest.raises(ConfigError, match="trained with lora="):
        lora_base(LoRAConfig(rank=8), tmp_path, adapters, resumed=True)
    assert lora_base(LoRAConfig(rank=4, alpha=8.0, targets=["linear_qkv"]), tmp_path, adapters,
                     resumed=True) == tmp_path


# --- kill and resume (subprocesses, single process) ---------------------------------------------
LORA_STEPS = ["train.steps=8", "train.decay_steps=8", "train.warmup_steps=1", "train.save_interval=4",
              "logging.tensorboard=false", "train.peft=lora", "lora.rank=4", "lora.alpha=16"]


def sft(run_dir: Path, *overrides: str) -> list[str]:
    return [PY, "-m", "clinmega.cli", "train", str(tc.SFT_RECIPE), f"run_dir={run_dir}", *overrides]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora_base")
    run_ok(sft(run_dir, "train.steps=1", "train.warmup_steps=0", "logging.tensorboard=false"))
    return run_dir


@pytest.fixture(scope="module")
def lora_reference(base, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora_reference")
    run_ok(sft(run_dir, *LORA_STEPS, f"checkpoint.load_weights={base}"))
    return run_dir


def test_lora_checkpoint_holds_adapters_and_the_base_record(base, lora_reference):
    from megatron.core import dist_checkpointing

    ckpt = lora_reference / "checkpoints" / "iter_0000008"
    keys = set(dist_checkpointing.load_tensors_metadata(str(ckpt)))
    model_keys = {k for k in keys if not k.startswith("optimizer")}
    assert model_keys and all(is_adapter_key(k) for k in model_keys), sorted(model_keys)[:5]
    assert "decoder.layers.self_attention.linear_qkv.lora_b.weight" in model_keys
    opt_keys = {k for k in keys if k.startswith("optimizer")}
    assert opt_keys and all(".lora_" in k for k in opt_keys), sorted(opt_keys)[:5]
    meta = json.loads((ckpt / METADATA_FILE).read_text())
    lora, found = read_peft_record(meta["provenance"], str(ckpt))
    assert found == (base / "checkpoints" / "iter_0000001").resolve()
    assert (lora.rank, lora.alpha) == (4, 16.0)
    # the adapter checkpoint is a small fraction of the base checkpoint
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*.distcp"))  # noqa: E731
    assert size(ckpt) < size(found) / 10


def test_lora_kill_and_resume_is_bit_exact(base, lora_reference, tmp_path):
    run_dir = tmp_path / "killed"
    ckpt = run_dir / "checkpoints"
    args = sft(run_dir, *LORA_STEPS, f"checkpoint.load_weights={base}")
    sigkill_after_checkpoint([*args, "train.steps=1000"], ckpt, 4)
    run_ok(args)  # resumes from latest = 4 (the base comes from the adapter checkpoint's record)
    ref, got = tc.losses(lora_reference), tc.losses(run_dir)
    assert sorted(got) == list(range(1, 9)), got
    for step in range(5, 9):
        assert got[step] == ref[step], (step, got[step], ref[step])  # bit-exact


def test_megatron_eval_backend_scores_base_plus_adapters(base, lora_reference):
    """The eval backend loads a LoRA run dir as base + adapters: its logits equal the merged
    weights' and differ from the base's, whose weights it holds bit-identically."""
    from eval_fixtures import tiny_hf_model_dir

    from clinmega.evaluation.backends.megatron import MegatronBackend
    from clinmega.models.lora import delta
    from clinmega.models.lora_layers import lora_modules

    tokenizer = tiny_hf_model_dir()
    lora = MegatronBackend.from_checkpoint(lora_reference, tokenizer=tokenizer)
    plain = MegatronBackend.from_checkpoint(base, tokenizer=tokenizer)
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with_adapters, base_logits = lora._logits(tokens, [12, 12]), plain._logits(tokens, [12, 12])
    assert not torch.allclose(with_adapters, base_logits, atol=1e-4)
    base_state = plain.model.state_dict()
    modules = dict(lora_modules([lora.model]))
    assert modules
    for name, tensor in lora.model.state_dict().items():
        if not is_adapter_key(name) and torch.is_tensor(tensor):
            assert torch.equal(tensor, base_state[name]), name
    with torch.no_grad():
        for module in modules.values():
            assert module.lora_b.weight.abs().max() > 0  # the trained adapters, not the init
            module.weight += delta(module.lora_a.weight, module.lora_b.weight, module.lora_scale)
            module.lora_b.weight.zero_()
        merged = lora._logits(tokens, [12, 12])
    assert (merged - with_adapters).abs().max().item() <= 1e-5
