"""Every recipe loads and resolves; paper-scale recipes fit their declared cluster by the planner."""

from pathlib import Path

import pytest

from clinmega.config import ConfigError
from clinmega.launch.planner import PlanConfig, estimate, plan_of
from clinmega.models import check_layout
from clinmega.training.config import load_experiment

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAIN_RECIPES = sorted(p for p in RECIPES.glob("*.yaml") if p.name != "data-tiny.yaml")
PAPER = [p for p in TRAIN_RECIPES if not p.name.startswith("tiny_")]


def test_all_paper_recipes_exist():
    names = {p.stem for p in PAPER}
    assert names == {"mistral_7b_cpt", "mixtral_8x7b_cpt", "mistral_7b_sft", "mistral_7b_sft_neftune",
                     "mixtral_8x7b_sft", "mixtral_8x7b_sft_neftune", "mistral_7b_lora_sft",
                     "mixtral_8x7b_lora_sft"}


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_its_layout_is_valid(recipe):
    cfg = load_experiment([recipe])
    check_layout(cfg.model, cfg.parallel)
    if "neftune" in recipe.stem or "lora" in recipe.stem:  # LoRA SFT recipes use NEFTune too
        assert cfg.train.stage == "sft" and cfg.train.neftune_alpha == 5.0
        assert (cfg.train.peft == "lora") == ("lora" in recipe.stem)
    elif recipe.stem.endswith("_sft"):
        assert cfg.train.neftune_alpha is None


@pytest.mark.parametrize("recipe", PAPER, ids=lambda p: p.stem)
def test_paper_recipe_fits_its_cluster(recipe):
    cfg = load_experiment([recipe])
    assert cfg.cluster is not None, "paper-scale recipes declare their cluster"
    t = cfg.train
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.clip_grad) == (0.9, 0.95, 0.1, 1.0)
    # FP8 for full training; the LoRA recipes stay bf16 (FP8 not validated with adapters).
    assert cfg.precision.dtype == "bf16"
    assert cfg.precision.fp8 == (None if t.peft == "lora" else "hybrid")
    dp = cfg.parallel.data_parallel_size(cfg.cluster.num_gpus)
    t.num_microbatches(dp)  # the global batch divides over DP
    est = estimate(cfg.model, cfg.parallel, plan_of(cfg), cfg.cluster)
    assert est.total_gb <= cfg.cluster.gpu_memory_gb, (est.layout(), est.memory_gb)


def test_a_recipe_that_cannot_fit_is_caught():
    cfg = load_experiment([RECIPES / "mixtral_8x7b_cpt.yaml"],
                          ["parallel.pipeline_parallel=1", "parallel.virtual_pipeline_parallel=null",
                           "parallel.expert_parallel=1", "cluster.num_gpus=8"])
    plan = PlanConfig(seq_length=4096, global_batch=256, recompute="selective")
    assert estimate(cfg.model, cfg.parallel, plan, cfg.cluster).total_gb > 80
    with pytest.raises(ConfigError, match="cluster.num_gpus"):
        load_experiment([RECIPES / "mistral_7b_cpt.yaml"], ["cluster.num_gpus=0"])
