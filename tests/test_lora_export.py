"""export-hf of a LoRA run, merged and --adapter-only (HF PEFT), against real peft and transformers
on tiny random Mistral and Mixtral models. The adapter checkpoints are written by
tests/lora_fixture.py straight from random tensors per the contract (clinmega/models/lora.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import conversion_cases as cc
from lora_fixture import save_random_adapters
from clinmega.cli import main as cli_main
from clinmega.conversion import ConversionError, export_hf, import_hf
from clinmega.conversion.lora_export import PEFT_CONFIG, PEFT_WEIGHTS, export_peft_adapter
from clinmega.models.lora import LoRAConfig

KINDS = ["mistral-v0.1", "mixtral"]
LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.1)
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{kind: (folder, adapter tensors)}: HF model, its import (the base), a LoRA run on it, the
    base exported, the run exported merged (CLI) and as a PEFT folder (CLI)."""
    out = {}
    for kind in KINDS:
        root = tmp_path_factory.mktemp(kind)
        cc.make_hf_model(kind, root / "hf")
        import_hf(root / "hf", root / "base", progress=False)
        made = save_random_adapters(root / "base", root / "run", LORA)
        export_hf(root / "base", root / "base_hf", progress=False)
        assert cli_main(["export-hf", str(root / "run"), str(root / "merged"),
                         "--no-progress"]) == 0
        assert cli_main(["export-hf", str(root / "run"), str(root / "adapter"), "--adapter-only",
                         "--no-progress"]) == 0
        out[kind] = root, made
    return out


def split_qkv(rows: torch.Tensor, heads: int, groups: int, head_dim: int):
    """megatron's fused q/k/v rows [groups * (heads/groups + 2) * d, n] -> q, k, v rows."""
    per = heads // groups
    g = rows.reshape(groups, per + 2, head_dim, rows.shape[-1])
    return (g[:, :per].reshape(-1, rows.shape[-1]), g[:, per].reshape(-1, rows.shape[-1]),
            g[:, per + 1].reshape(-1, rows.shape[-1]))


def expected_merged(kind: str, hf: dict, made: dict) -> dict[str, torch.Tensor]:
    """HF tensors W + scale * B_hf @ A, the B rows split from the fixture's fused tensors here."""
    heads, groups, d = (cc.HF_SHAPES[k] for k in ("num_attention_heads", "num_key_value_heads",
                                                   "head_dim"))
    f = cc.HF_SHAPES["intermediate_size"]
    s = LORA.scale
    want = dict(hf)
    for layer in range(cc.HF_SHAPES["num_hidden_layers"]):
        attn = f"model.layers.{layer}.self_attn."
        _, a, b = made["linear_qkv"]
        for name, rows in zip("qkv", split_qkv(b[layer], heads, groups, d)):
            want[attn + f"{name}_proj.weight"] = hf[attn + f"{name}_proj.weight"] + s * rows @ a[layer]
        _, a, b = made["linear_proj"]
        want[attn + "o_proj.weight"] = hf[attn + "o_proj.weight"] + s * b[layer] @ a[layer]
        (_, a1, b1), (_, a2, b2) = made["linear_fc1"], made["linear_fc2"]
        if kind == "mixtral":
            for e in range(cc.KINDS["mixtral"]["num_local_experts"]):
                ex = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
                want[ex + "w1.weight"] = hf[ex + "w1.weight"] + s * b1[layer, e, :f] @ a1[layer, e]
                want[ex + "w3.weight"] = hf[ex + "w3.weight"] + s * b1[layer, e, f:] @ a1[layer, e]
                want[ex + "w2.weight"] = hf[ex + "w2.weight"] + s * b2[layer, e] @ a2[layer, e]
        else:
            mlp = f"model.layers.{layer}.mlp."
            want[mlp + "gate_proj.weight"] = hf[mlp + "gate_proj.weight"] + s * b1[layer, :f] @ a1[layer]
            want[mlp + "up_proj.weight"] = hf[mlp + "up_proj.weight"] + s * b1[layer, f:] @ a1[layer]
            want[mlp + "down_proj.weight"] = hf[mlp + "down_proj.weight"] + s * b2[layer] @ a2[layer]
    return want


@pytest.mark.parametrize("kind", KINDS)
def test_merged_export_is_w_plus_scaled_ba(runs, kind):
    root, made = runs[kind]
    hf = cc.read_all(root / "hf")
    merged = cc.read_all(root / "merged")
    want = expected_merged(kind, hf, made)
    assert sorted(merged) == sorted(want)
    changed = 0
    for name, tensor in want.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)
        if not torch.equal(tensor, hf[name]):
            changed += 1
        else:
            assert torch.equal(merged[name], hf[name]), name  # norms, router, embeddings: as-is
    assert changed == {"mistral-v0.1": 7, "mixtral": 4 + 3 * 8}[kind] * 4
    assert json.loads((root / "merged" / "clinmega_checkpoint.json").read_text())[
        "provenance"]["peft"]["lora"]["rank"] == LORA.rank
    assert (root / "merged" / "tokenizer.model").is_file()


def peft_logits(base_hf, adapter, toks):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_hf, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    loaded = get_peft_model_state_dict(model)
    stored = load_file(adapter / PEFT_WEIGHTS)
    assert sorted(loaded) == sorted(stored)  # every tensor in the folder found its module
    for name, tensor in stored.items():
        assert torch.equal(loaded[name], tensor), name
    with torch.no_grad():
        return model(toks).logits.float()


@pytest.mark.parametrize("kind", KINDS)
def test_peft_folder_on_the_exported_base_gives_the_merged_logits(runs, kind):
    root, _ = runs[kind]
    config = json.loads((root / "adapter" / PEFT_CONFIG).read_text())
    if kind == "mixtral":
        assert config["target_parameters"] == ["experts.gate_up_proj", "experts.down_proj"]
        assert config["lora_dropout"] == 0.0
    else:
        assert config["target_parameters"] is None and config["lora_dropout"] == LORA.dropout
    toks = cc.tokens(32000)
    with_adapter = peft_logits(root / "base_hf", root / "adapter", toks)
    merged = cc.hf_logits(root / "merged", toks)
    base = cc.hf_logits(root / "base_hf", toks)
    assert (merged - base).abs().max().item() > 0.05  # the adapters matter
    assert (with_adapter - merged).abs().max().item() <= TOL


def test_mixtral_target_subset_single_expert_wrapper(runs, tmp_path):
    """Only o_proj and the experts' down_proj: one ParamWrapper on the experts (no nesting)."""
    root, _ = runs["mixtral"]
    lora = LoRAConfig(rank=2, alpha=3.0, targets=["linear_proj", "linear_fc2"])
    save_random_adapters(root / "base", tmp_path / "run", lora, seed=5)
    export_hf(tmp_path / "run", tmp_path / "merged", progress=False)
    export_peft_adapter(tmp_path / "run", tmp_path / "adapter", progress=False)
    config = json.loads((tmp_path / "adapter" / PEFT_CONFIG).read_text())
    assert (config["target_modules"], config["target_parameters"]) == (["o_proj"],
                                                                        ["experts.down_proj"])
    toks = cc.tokens(32000)
    merged = cc.hf_logits(tmp_path / "merged", toks)
    assert (merged - cc.hf_logits(root / "base_hf", toks)).abs().max().item() > 0.05
    assert (peft_logits(root / "base_hf", tmp_path / "adapter", toks) - merged
            ).abs().max().item() <= TOL


def test_bf16_merge_rounds_once_to_the_base_dtype(tmp_path):
    """bf16 base and adapters: merged = bf16(W + scale * B @ A in fp32); the adapter folder keeps
    bf16."""
    from safetensors.torch import load_file

    hf = cc.make_hf_model("mistral-v0.3", tmp_path / "hf", dtype=torch.bfloat16)
    import_hf(hf, tmp_path / "base", progress=False)
    lora = LoRAConfig(rank=4, alpha=8.0, targets=["linear_proj"])
    made = save_random_adapters(tmp_path / "base", tmp_path / "run", lora, dtype=torch.bfloat16)
    export_hf(tmp_path / "run", tmp_path / "merged", progress=False)
    export_peft_adapter(tmp_path / "run", tmp_path / "adapter", progress=False)
    source, merged = cc.read_all(hf), cc.read_all(tmp_path / "merged")
    _, a, b = made["linear_proj"]
    for layer in range(cc.HF_SHAPES["num_hidden_layers"]):
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        want = (source[name].float() + lora.scale * b[layer].float() @ a[layer].float())
        assert merged[name].dtype == torch.bfloat16
        assert torch.equal(merged[name], want.to(torch.bfloat16)), name
    assert not torch.equal(merged[name], source[name])
    adapter = load_file(tmp_path / "adapter" / PEFT_WEIGHTS)
    assert {t.dtype for t in adapter.values()} == {torch.bfloat16}
    assert torch.equal(adapter["base_model.model.model.layers.3.self_attn.o_proj.lora_B.weight"],
                       b[3])


def test_adapter_only_refuses_a_full_checkpoint(runs, tmp_path):
    root, _ = runs["mistral-v0.1"]
    with pytest.raises(ConversionError, match="not a LoRA checkpoint"):
        export_peft_adapter(root / "base", tmp_path / "out", progress=False)


def test_changed_base_or_missing_adapter_is_refused(runs, tmp_path):
    root, _ = runs["mistral-v0.1"]
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    meta = run / "checkpoints" / "iter_0000002" / "clinmega_checkpoint.json"
    record = json.loads(meta.read_text())
    record["provenance"]["peft"]["lora"]["rank"] = 8
    meta.write_text(json.dumps(record))
    with pytest.raises(ConversionError, match=r"lora_a\.weight.*has shape \[4, 4, 64\].*\[4, 8, 64\]"):
        export_hf(run, tmp_path / "merged", progress=False)
    record["provenance"]["peft"]["lora"]["rank"] = 4
    record["provenance"]["peft"]["base"]["description_sha256"] = "0" * 64
    meta.write_text(json.dumps(record))
    with pytest.raises(ConversionError, match="has changed since the adapters were trained"):
        export_peft_adapter(run, tmp_path / "adapter", progress=False)


def test_trained_lora_run_exports_both_ways_to_the_megatron_logits(tmp_path):
    """End to end (needs the LoRA training of issue 15): `clinmega train ... train.peft=lora`
    (2 steps, NEFTune) on an imported base, then export-hf merged and --adapter-only; transformers
    on the merged folder and peft on the base export + adapter folder give the Megatron LoRA
    model's logits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from clinmega.demo.hf_checkpoint import save_random_hf_checkpoint
    from clinmega.evaluation.backends.megatron import MegatronBackend
    from clinmega.models import get_preset

    hf = save_random_hf_checkpoint(get_preset("tiny-mistral-v0.1"), tmp_path / "hf", seed=0)
    import_hf(hf, tmp_path / "base", progress=False)
    run = tmp_path / "run"
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(run), "precision": {"dtype": "fp32"},
        "train": {"stage": "sft", "steps": 2, "global_batch_size": 4, "micro_batch_size": 2,
                  "seq_length": 32, "lr": 5e-3, "min_lr": 5e-4, "warmup_steps": 1,
                  "eval_interval": 0, "neftune_alpha": 5.0},
        "lora": {"rank": 4, "alpha": 8.0},
        "data": {"kind": "synthetic", "synthetic_packed": True, "synthetic_vocab": 64},
        "checkpoint": {"load_weights": str(tmp_path / "base"), "keep_last": 1},
        "logging": {"tensorboard": False, "progress": False}}))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "clinmega.cli", "train", str(recipe),
                           "train.peft=lora"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    export_hf(tmp_path / "base", tmp_path / "base_hf", progress=False)
    assert cli_main(["export-hf", str(run), str(tmp_path / "merged"), "--no-progress"]) == 0
    assert cli_main(["export-hf", str(run), str(tmp_path / "adapter"), "--adapter-only",
                     "--no-progress"]) == 0

    toks = cc.tokens(32000, seq=16)
    merged = cc.hf_logits(tmp_path / "merged", toks)
    base = cc.hf_logits(tmp_path / "base_hf", toks)
    assert (merged - base).abs().max().item() > 1e-4  # two steps moved B off zero
    with torch.no_grad():
        megatron = MegatronBackend.from_checkpoint(run)._logits(toks, [toks.shape[1]] * 2).float()
    assert (megatron - merged).abs().max().item() < 1e-4
    assert (peft_logits(tmp_path / "base_hf", tmp_path / "adapter", toks) - merged
            ).abs().max().item() <= TOL
