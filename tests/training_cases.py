"""Multi-rank training cases for test_training.py, all inside one spawned 2-rank gloo group.

Each case returns plain data (losses, flags) that the tests assert on; the recipe is the tiny CPU
CPT recipe with overrides, the same one the subprocess tests run single-process.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from clinmega.config import ConfigError
from clinmega.training.config import load_experiment

ROOT = Path(__file__).resolve().parents[1]
CPT_RECIPE = ROOT / "recipes" / "tiny_cpu_cpt.yaml"
SFT_RECIPE = ROOT / "recipes" / "tiny_cpu_sft_neftune.yaml"
# The geometry every loss comparison uses (also in test_training.py's subprocess runs).
CPT_STEPS = ["train.steps=20", "train.decay_steps=20", "train.save_interval=10",
             "train.eval_interval=0", "logging.tensorboard=false"]


def experiment(recipe: Path, run_dir: Path, *overrides: str):
    return load_experiment([recipe], [f"run_dir={run_dir}", *overrides])


def losses(run_dir: Path) -> dict[int, float]:
    from clinmega.training.logging import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def run(recipe: Path, run_dir: Path, *overrides: str) -> dict:
    from clinmega.training.loop import train

    summary = train(experiment(recipe, run_dir, *overrides))
    dist.barrier()
    return dict(summary=summary, losses=losses(run_dir), records=_records(run_dir))


def _records(run_dir: Path) -> list[dict]:
    from clinmega.training.logging import read_metrics

    return read_metrics(run_dir)


def initial_weights(path: Path) -> Path:
    """The tiny recipe's freshly initialised weights (single-stage layout) as a dist checkpoint."""
    from clinmega.models import build_model
    from clinmega.models.dist_ckpt import save_model_weights
    from clinmega.runtime import initialize

    cfg = experiment(CPT_RECIPE, path)
    initialize(cfg.parallel, cfg.runtime)
    save_model_weights(build_model(cfg.model, cfg.parallel, cfg.precision, cfg.runtime), path)
    return path


# --- NEFTune probes -----------------------------------------------------------------------------
def neftune_probe(tmp: Path, parallel: list[str], same_data: bool) -> dict:
    """Embedding outputs of one packed SFT microbatch with and without NEFTune, on this rank
    (gathered to the full sequence under sequence parallel)."""
    from megatron.core import parallel_state as ps

    from clinmega.models.dist_ckpt import unwrap
    from clinmega.runtime import initialize
    from clinmega.training.loop import build_trainer

    cfg = experiment(SFT_RECIPE, tmp / "probe", "checkpoint.resume=false", *parallel)
    initialize(cfg.parallel, cfg.runtime)
    trainer = build_trainer(cfg)
    model = trainer.model[0]
    embedding = unwrap(model).embedding
    captured = []
    embedding.register_forward_hook(lambda m, i, out: captured.append(out.detach().clone()))

    step = 3
    dp_rank = 0 if same_data else trainer.dp_rank
    mb = trainer.sampler.microbatches(step, dp_rank, ps.get_data_parallel_world_size())[0]
    ctx = trainer.neftune.context(mb, step, trainer.dp_rank, 0)

    def embed(context, training=True, at_step=step):
        model.train(training)
        if context is not None and at_step != step:
            context = trainer.neftune.context(mb, at_step, trainer.dp_rank, 0)
        from clinmega.training.neftune import NEFTune

        NEFTune.set_context(model, context)
        with torch.no_grad():
            embedding(mb["tokens"], position_ids=mb["position_ids"])
        out = captured.pop()
        if cfg.parallel.sequence_parallel:
            parts = [torch.empty_like(out) for _ in range(ps.get_tensor_model_parallel_world_size())]
            dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
            out = torch.cat(parts)
        return out

    clean = embed(None)
    noise = embed(ctx) - clean
    return dict(noise=noise, scale=ctx["scale"], loss_mask=mb["loss_mask"],
                cu_seqlens=mb["cu_seqlens"], eval_noise=embed(ctx, training=False) - clean,
                other_step_noise=embed(ctx, at_step=step + 1) - clean,
                tp_rank=ps.get_tensor_model_parallel_rank(), dp_rank=trainer.dp_rank)


# --- NaN policy ---------------------------------------------------------------------------------
def nan_run(tmp: Path, policy: str) -> dict:
    """Loss forced to NaN at step 4 (a patched forward/backward): stop raises and saves nothing
    after step 2's checkpoint; skip logs the step as skipped and continues."""
    import math

    from clinmega.training import loop

    real = loop.forward_backward
    calls = {"n": 0}

    def poisoned(model, microbatches, forward_only=False):
        value = real(model, microbatches, forward_only)
        calls["n"] += 1
        return math.nan if calls["n"] == 4 and not forward_only else value

    loop.forward_backward = poisoned
    run_dir = tmp / f"nan_{policy}"
    try:
        out = run(CPT_RECIPE, run_dir, "train.steps=6", "train.save_interval=2",
                  f"train.nan_policy={policy}", "logging.tensorboard=false")
        out["error"] = None
    except loop.NonFiniteLossError as err:
        out = dict(error=str(err), records=_records(run_dir))
    finally:
        loop.forward_backward = real
    from clinmega.training.checkpoint import read_latest

    out["latest"] = read_latest(run_dir / "checkpoints")
    return out


def all_cases(tmp: str) -> dict:
    from clinmega.runtime import init_process_group
    from clinmega.config import RuntimeConfig

    init_process_group(RuntimeConfig())
    tmp = Path(tmp)
    out = {}
    # DP2 with and without the distributed optimizer (DP1 runs as a subprocess in the test).
    out["dp2_distopt"] = run(CPT_RECIPE, tmp / "dp2_distopt", *CPT_STEPS)["losses"]
    out["dp2_plain"] = run(CPT_RECIPE, tmp / "dp2_plain", *CPT_STEPS,
                           "train.use_distributed_optimizer=false")["losses"]
    # Pipeline parallel with virtual stages (4 layers = PP2 x VPP2 chunks of one layer), started
    # from the DP runs' initial weights (megatron seeds each pipeline stage differently).
    out["pp2_vpp2"] = run(CPT_RECIPE, tmp / "pp2_vpp2", *CPT_STEPS, "train.steps=5",
                          "parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2",
                          f"checkpoint.load_weights={initial_weights(tmp / 'init')}")["losses"]
    out["recompute_full"] = run(CPT_RECIPE, tmp / "recompute", *CPT_STEPS, "train.steps=3",
                                "train.recompute_granularity=full",
                                "train.recompute_method=uniform")["losses"]
    # CPT re-warm: 4 steps, then the same run extended to 8 steps with train.rewarm.
    short = ["train.warmup_steps=1", "train.save_interval=0", "logging.tensorboard=false"]
    run(CPT_RECIPE, tmp / "rewarm", "train.steps=4", *short)
    out["rewarm"] = run(CPT_RECIPE, tmp / "rewarm", "train.steps=8", "train.rewarm=true",
                        *short)["records"]
    # Tiny Mixtral SFT (packed) with EP2.
    moe = run(SFT_RECIPE, tmp / "mixtral_ep2", "model.preset=tiny-mixtral",
              "parallel.expert_parallel=2", "train.steps=4", "logging.tensorboard=false")
    out["mixtral_ep2"] = moe["records"]
    # SFT: alpha 0 equals the path without NEFTune exactly.
    out["sft_alpha0"] = run(SFT_RECIPE, tmp / "sft_a0", "train.steps=3", "train.warmup_steps=1",
                            "train.neftune_alpha=0.0")["losses"]
    out["sft_off"] = run(SFT_RECIPE, tmp / "sft_off", "train.steps=3", "train.warmup_steps=1",
                         "train.neftune_alpha=null")["losses"]
    out["sft_alpha5"] = run(SFT_RECIPE, tmp / "sft_a5", "train.steps=3",
                            "train.warmup_steps=1")["losses"]
    # NEFTune probes: TP2 (no SP and SP: identical noise on TP ranks), DP2 (different).
    out["probe_tp2"] = neftune_probe(tmp / "tp2", ["parallel.tensor_parallel=2"], True)
    out["probe_tp2_sp"] = neftune_probe(tmp / "tp2sp", ["parallel.tensor_parallel=2",
                                                         "parallel.sequence_parallel=true"], True)
    out["probe_dp2"] = neftune_probe(tmp / "dp2", [], True)
    out["nan_stop"] = nan_run(tmp, "stop")
    out["nan_skip"] = nan_run(tmp, "skip")
    try:
        run(CPT_RECIPE, tmp / "fp8", "precision.fp8=hybrid")
        out["fp8_error"] = None
    except ConfigError as err:
        out["fp8_error"] = str(err)
    return out
