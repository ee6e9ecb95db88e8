"""Self-describing checkpoints: the journey import-hf -> CPT -> SFT -> export-hf -> eval with paths
only, model-config mismatches refused by field, an allowed change recorded, the newest-checkpoint
resolver (never a half-written checkpoint) and Megatron-LM's tracker file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from clinmega.checkpoints import (
    ASSETS_DIR,
    LATEST,
    METADATA_FILE,
    TRACKER,
    CheckpointError,
    check_model_config,
    iteration_dir,
    publish_latest,
    read_checkpoint_info,
    read_latest,
    resolve_checkpoint,
)
from clinmega.config import ConfigError
from clinmega.models import get_preset
from clinmega.training.config import load_experiment
from clinmega.training.lineage import start_source

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
PRESET = "tiny-mistral-v0.1"


def clinmega(*args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "clinmega.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def recipe(path: Path, run_dir: Path, stage: str, load_weights: Path, data: dict, **extra) -> Path:
    """A training recipe with no model preset: the model comes from ``load_weights``."""
    body = {"run_dir": str(run_dir), "precision": {"dtype": "fp32"},
            "train": {"stage": stage, "steps": 2, "global_batch_size": 4, "micro_batch_size": 2,
                      "seq_length": 32, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1,
                      "eval_interval": 0},
            "data": data, "checkpoint": {"load_weights": str(load_weights), "keep_last": 1},
            "logging": {"tensorboard": False, "progress": False}}
    for key, value in extra.items():
        body.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A random tiny Mistral v0.1 HF folder (real Mistral tokenizer) and its import-hf output."""
    from clinmega.conversion import import_hf
    from clinmega.demo.hf_checkpoint import save_random_hf_checkpoint

    root = tmp_path_factory.mktemp("imported")
    hf = save_random_hf_checkpoint(get_preset(PRESET), root / "hf", seed=0)
    import_hf(hf, root / "base", progress=False)
    return hf, root / "base"


def test_journey_with_paths_only(imported, tmp_path):
    """import-hf -> CPT (with an allowed RoPE theta change) -> SFT -> export-hf -> eval, with no
    --preset/--tokenizer/model.preset anywhere; transformers' logits equal the Megatron model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from clinmega.cli import main as clinmega_main
    from clinmega.data.pretrain import output_paths
    from clinmega.evaluation.backends.megatron import MegatronBackend

    hf, _ = imported
    base = tmp_path / "base"
    clinmega("import-hf", hf, base, "--no-progress")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"patient {i} has a fever and a cough, day {i}."})
                              + "\n" for i in range(64)))
    prefix = tmp_path / "data" / "clinical"
    clinmega("prepare", "pretrain", "--inputs", corpus, "--output-prefix", prefix,
             "--tokenizer", "mistral-v1", "--workers", "1", "--no-progress")

    cpt, sft = tmp_path / "runs" / "cpt", tmp_path / "runs" / "sft"
    clinmega("train", recipe(tmp_path / "cpt.yaml", cpt, "cpt", base,
                             {"kind": "indexed", "prefixes": [str(prefix)], "split": "100,0,0"},
                             model={"rope_theta": 20000.0},
                             checkpoint={"allow_config_change": ["rope_theta"]}))
    clinmega("train", recipe(tmp_path / "sft.yaml", sft, "sft", cpt,
                             {"kind": "synthetic", "synthetic_packed": True, "synthetic_vocab": 64}))
    out = tmp_path / "hf-sft"
    clinmega("export-hf", sft, out, "--no-progress")

    # Every checkpoint describes itself; the trackers agree.
    for run in (cpt, sft):
        root = run / "checkpoints"
        assert (root / TRACKER).read_text() == (root / LATEST).read_text() == "2\n"
    sft_ckpt = resolve_checkpoint(sft)
    assert sft_ckpt == sft / "checkpoints" / "iter_0000002"
    info = read_checkpoint_info(sft_ckpt)
    recorded_base = read_checkpoint_info(base).model
    assert info.model == dataclasses.replace(recorded_base, rope_theta=20000.0)
    assert json.loads((sft_ckpt / ASSETS_DIR / "config.json").read_text())["rope_theta"] == 20000.0
    assert (sft_ckpt / ASSETS_DIR / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()
    p = info.provenance
    assert (p["kind"], p["stage"], p["step"]) == ("train", "sft", 2)
    assert p["source_checkpoint"] == str((cpt / "checkpoints" / "iter_0000002").resolve())
    parent = p["parent"]
    assert (parent["kind"], parent["stage"]) == ("train", "cpt")
    assert parent["config_changes"] == {"rope_theta": {"checkpoint": 10000.0, "now": 20000.0}}
    manifest = output_paths(prefix)["manifest"]
    assert parent["data_manifests"] == {str(manifest): hashlib.sha256(manifest.read_bytes()).hexdigest()}
    assert parent["parent"]["kind"] == "import-hf"
    assert parent["parent"]["source"] == str(hf.resolve())

    # The export carries the recorded config and the tokenizer given at import.
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 20000.0
    assert (out / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    ids = torch.tensor([tokenizer("The patient has a fever and a cough since Monday.")["input_ids"]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
        megatron = MegatronBackend.from_checkpoint(sft)  # run directory only
        got = megatron._logits(ids, [ids.shape[1]]).float()
    assert megatron.model.rotary_base == 20000.0
    assert (got - expected).abs().max().item() < 1e-4

    # eval takes the run directory too: the megatron backend is picked, nothing else needed.
    assert clinmega_main(["eval", str(sft), "--benchmarks", "pubmedqa", "--limit", "2",
                          "--bootstrap", "20", "--out", str(tmp_path / "eval")]) == 0
    meta = json.loads((tmp_path / "eval" / "results.json").read_text())["meta"]
    assert meta["backend"] == "megatron" and meta["model"] == str(sft_ckpt)


MISMATCHES = [("rope_theta", 1e6), ("sliding_window", 16), ("sliding_window", None),
              ("norm_eps", 1e-6), ("vocab_size", 32768), ("num_attention_heads", 8),
              ("num_query_groups", 4), ("head_dim", 32), ("ffn_hidden_size", 96), ("num_layers", 2)]


@pytest.mark.parametrize("key,value", MISMATCHES, ids=[f"{k}={v}" for k, v in MISMATCHES])
def test_loading_weights_into_another_model_is_refused(imported, tmp_path, key, value):
    _, base = imported
    recorded = read_checkpoint_info(base).model
    overrides = [f"run_dir={tmp_path}", f"checkpoint.load_weights={base}",
                 f"model.{key}={'null' if value is None else value}"]
    cfg = load_experiment([], overrides)
    with pytest.raises(ConfigError, match=rf"checkpoint\.load_weights: {base}: the model differs"
                                          rf".*model\.{key}: checkpoint {getattr(recorded, key)!r}, "
                                          rf"now {value!r}\. .*allow_config_change=\[{key}\]"):
        start_source(cfg, cfg.checkpoint_dir)
    allowed = load_experiment([], overrides + [f"checkpoint.allow_config_change=[{key}]"])
    assert start_source(allowed, allowed.checkpoint_dir).changes == {
        key: {"checkpoint": getattr(recorded, key), "now": value}}


def test_every_differing_field_is_listed_and_experts_are_checked():
    mixtral = get_preset("tiny-mixtral")
    other = dataclasses.replace(mixtral, num_experts=mixtral.num_experts * 2, moe_router_topk=1,
                                name="renamed", init_method_std=0.01, moe_aux_loss_coeff=0.0)
    with pytest.raises(ConfigError) as err:
        check_model_config(mixtral, other, [], "here", "checkpoint.allow_config_change")
    message = str(err.value)
    assert (f"model.moe_router_topk: checkpoint {mixtral.moe_router_topk}, now 1" in message
            and f"model.num_experts: checkpoint {mixtral.num_experts}, now "
                f"{mixtral.num_experts * 2}" in message)
    for label in ("name", "init_method_std", "moe_aux_loss_coeff"):  # do not change the function
        assert f"model.{label}:" not in message
    assert "arch" not in message
    with pytest.raises(ConfigError, match=r"checkpoint\.allow_config_change: \['rope_thta'\] are "
                                          r"not model fields"):
        check_model_config(mixtral, mixtral, ["rope_thta"], "here", "checkpoint.allow_config_change")


def test_train_without_preset_takes_the_recorded_model(imported, tmp_path):
    hf, base = imported
    recorded = read_checkpoint_info(base).model
    cfg = load_experiment([], [f"run_dir={tmp_path}", f"checkpoint.load_weights={base}"])
    assert cfg.model == recorded and recorded.sliding_window == 8
    preset = load_experiment([], [f"run_dir={tmp_path}", f"checkpoint.load_weights={base}",
                                  f"model.preset={PRESET}"])
    assert start_source(preset, preset.checkpoint_dir).changes == {}  # same function as recorded
    with pytest.raises(ConfigError, match=r"checkpoint\.load_weights: .*missing: no such checkpoint"):
        load_experiment([], [f"run_dir={tmp_path}", f"checkpoint.load_weights={tmp_path}/missing"])


def test_resuming_with_another_model_is_refused(imported, tmp_path):
    _, base = imported
    root = tmp_path / "checkpoints"
    shutil.copytree(base, iteration_dir(root, 5))
    publish_latest(root, 5)
    cfg = load_experiment([], [f"run_dir={tmp_path}", "model.norm_eps=1e-3"])
    with pytest.raises(ConfigError, match=rf"resuming from {iteration_dir(root, 5)}: .*model\.norm_eps: "
                                          r"checkpoint 1e-05, now 0\.001"):
        start_source(cfg, cfg.checkpoint_dir)
    assert load_experiment([], [f"run_dir={tmp_path}"]).model == read_checkpoint_info(base).model


def _fake_checkpoint(path: Path) -> Path:
    """A folder as megatron-core leaves it after a finished save (its marker written last)."""
    path.mkdir(parents=True)
    (path / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    return path


def test_resolver_never_returns_a_half_written_checkpoint(tmp_path):
    run = tmp_path / "run"
    root = run / "checkpoints"
    ten = _fake_checkpoint(iteration_dir(root, 10))
    _fake_checkpoint(iteration_dir(root, 20).with_suffix(".tmp"))  # renamed only when complete
    (iteration_dir(root, 30)).mkdir()  # shards written, megatron-core's marker not yet
    publish_latest(root, 10)
    assert (root / TRACKER).read_text() == (root / LATEST).read_text() == "10\n"
    for given in (run, root, ten):
        assert resolve_checkpoint(given) == ten
    (root / LATEST).unlink()
    assert read_latest(root) == 10 and resolve_checkpoint(run) == ten  # Megatron-LM's tracker alone
    (root / TRACKER).unlink()
    assert resolve_checkpoint(run) == ten  # no pointer: the newest complete iter_*
    with pytest.raises(CheckpointError, match=r"iter_0000020\.tmp: a checkpoint still being written"):
        resolve_checkpoint(iteration_dir(root, 20).with_suffix(".tmp"))
    with pytest.raises(CheckpointError, match=r"iter_0000030: not a megatron-core distributed"):
        resolve_checkpoint(iteration_dir(root, 30))
    (root / LATEST).write_text("30\n")
    with pytest.raises(CheckpointError, match=r"latest says 30 but .*iter_0000030 is missing or "
                                              r"incomplete"):
        resolve_checkpoint(run)
    shutil.rmtree(ten)
    (root / LATEST).unlink()
    with pytest.raises(CheckpointError, match=r"run: not a megatron-core distributed checkpoint"):
        resolve_checkpoint(run)


def test_import_output_describes_itself(imported):
    hf, base = imported
    assert (base / METADATA_FILE).is_file() and (base / ASSETS_DIR / "tokenizer.model").is_file()
    provenance = read_checkpoint_info(base).provenance
    assert (provenance["kind"], provenance["source"], provenance["tokenizer"]) == (
        "import-hf", str(hf.resolve()), str(hf.resolve()))
    assert json.loads((base / ASSETS_DIR / "config.json").read_text())["sliding_window"] == 8
