"""Multi-rank training cases for test_training.py: a table of named case functions, all run by
one spawned 2-rank gloo group (tests/case_table.py); each test names the case it asserts on.

Each case returns plain data (losses, records, captured tensors); the recipe is the tiny CPU CPT
(or SFT) recipe with overrides, the same one the subprocess tests run single-process.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from case_table import CaseTable
from clinmega.config import ConfigError
from clinmega.training.config import load_experiment

TABLE = CaseTable(__name__)
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


def initial_weights(path: Path, recipe: Path = CPT_RECIPE, *overrides: str) -> Path:
    """The recipe's freshly initialised weights (single-stage layout, no EP) as a dist checkpoint."""
    from clinmega.models import build_model
    from clinmega.models.dist_ckpt import save_model_weights
    from clinmega.runtime import initialize

    cfg = experiment(recipe, path, *overrides)
    initialize(cfg.parallel, cfg.runtime)
    save_model_weights(build_model(cfg.model, cfg.parallel, cfg.precision, cfg.runtime), path)
    return path


class LayerForwards:
    """Counts ``TransformerLayer.forward`` calls (a full-recompute backward runs each one again)."""

    def __enter__(self):
        from megatron.core.transformer.transformer_layer import TransformerLayer

        self.cls, self.real, self.calls = TransformerLayer, TransformerLayer.forward, 0

        def counting(layer, *args, **kwargs):
            self.calls += 1
            return self.real(layer, *args, **kwargs)

        TransformerLayer.forward = counting
        return self

    def __exit__(self, *exc):
        self.cls.forward = self.real


# --- DP / distributed optimizer / PP+VPP / recompute --------------------------------------------
@TABLE.case
def dp2_distopt(tmp: Path) -> dict:
    """DP2 with the distributed optimizer (DP1 runs as a subprocess in the test)."""
    with LayerForwards() as count:
        out = run(CPT_RECIPE, tmp, *CPT_STEPS)
    return dict(losses=out["losses"], layer_forwards_per_step=count.calls / 20)


@TABLE.case
def dp2_plain(tmp: Path) -> dict:
    out = run(CPT_RECIPE, tmp, *CPT_STEPS, "train.use_distributed_optimizer=false")
    return dict(losses=out["losses"])


@TABLE.case
def pp2_vpp2(tmp: Path) -> dict:
    """Pipeline parallel with virtual stages (4 layers = PP2 x VPP2 chunks of one layer), started
    from the DP runs' initial weights (megatron seeds each pipeline stage differently)."""
    return run(CPT_RECIPE, tmp / "run", *CPT_STEPS, "train.steps=5",
               "parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2",
               f"checkpoint.load_weights={initial_weights(tmp / 'init')}")["losses"]


# --- train.eval_benchmarks (single process: test_training_benchmark_eval.py) --------------------
BENCHMARKS = ["medqa_4options", "pubmedqa"]


@contextlib.contextmanager
def dropout(p: float = 0.1):
    """Training models built with hidden and attention dropout ``p`` (the presets have none), so the
    trajectory depends on the RNG streams (torch's generator, megatron's tensor-parallel tracker)."""
    from clinmega.training.config import TrainConfig

    real = TrainConfig.transformer_overrides
    TrainConfig.transformer_overrides = lambda self: {**real(self), "hidden_dropout": p,
                                                      "attention_dropout": p}
    try:
        yield
    finally:
        TrainConfig.transformer_overrides = real


def benchmark_overrides(tokenizer: Path, interval: int = 2) -> list[str]:
    return [f"train.eval_benchmarks=[{','.join(BENCHMARKS)}]", "train.eval_benchmark_limit=4",
            f"train.eval_benchmark_interval={interval}", f"train.eval_benchmark_tokenizer={tokenizer}"]


@TABLE.case
def pp2_vpp2_benchmark_eval(tmp: Path) -> dict:
    """PP2 x VPP2 with dropout, 4 steps from the DP runs' initial weights, with and without benchmark
    accuracy every 2 steps (scored on the live interleaved-pipeline model)."""
    from eval_fixtures import write_tokenizer

    if dist.get_rank() == 0:
        write_tokenizer(tmp / "tokenizer")
    dist.barrier()
    common = [*CPT_STEPS, "train.steps=4", "parallel.pipeline_parallel=2",
              "parallel.virtual_pipeline_parallel=2", f"checkpoint.load_weights={initial_weights(tmp / 'init')}"]
    with dropout():
        plain = run(CPT_RECIPE, tmp / "plain", *common)
        scored = run(CPT_RECIPE, tmp / "scored", *common, *benchmark_overrides(tmp / "tokenizer"))
    return dict(plain=plain["losses"], scored=scored["losses"], records=scored["records"])


@TABLE.case
def recompute_full(tmp: Path) -> dict:
    with LayerForwards() as count:
        out = run(CPT_RECIPE, tmp, *CPT_STEPS, "train.steps=3", "train.recompute_granularity=full",
                  "train.recompute_method=uniform")
    return dict(losses=out["losses"], layer_forwards_per_step=count.calls / 3)


# --- schedule, MoE, NaN policy, FP8 gating ------------------------------------------------------
@TABLE.case
def rewarm(tmp: Path) -> list[dict]:
    """CPT re-warm: 4 steps, then the same run extended to 8 steps with train.rewarm."""
    short = ["train.warmup_steps=1", "train.save_interval=0", "logging.tensorboard=false"]
    run(CPT_RECIPE, tmp, "train.steps=4", *short)
    return run(CPT_RECIPE, tmp, "train.steps=8", "train.rewarm=true", *short)["records"]


@TABLE.case
def mixtral_ep2(tmp: Path) -> list[dict]:
    """Tiny Mixtral SFT (packed) with EP2."""
    return run(SFT_RECIPE, tmp, "model.preset=tiny-mixtral", "parallel.expert_parallel=2",
               "train.steps=4", "logging.tensorboard=false")["records"]


class RouterTrace:
    """Forward hooks on every router (``TopKRouter``) of the model, registered on the first
    training ``forward_backward``: per router call of a training forward, its layer, its input
    ``x`` [S, b, h], its weight and its routing map (the top-k experts of each token). The
    first step's ``forward_backward`` also runs once with the aux loss switched off (same
    weights, same microbatches), to measure what the aux loss adds to the last layer's router
    weight gradient (plain DDP: every rank holds the full reduced gradient)."""

    def __init__(self):
        self.calls: list[dict] = []
        self.microbatches: list[list[dict]] = []  # per step: T (tokens) and loss tokens per mb
        self.routers: list = []
        self.grad_without = self.grad_with = None
        self.active = False

    def _hook(self, router, args, out):
        if self.active and router.training and torch.is_grad_enabled():
            self.calls.append(dict(step=len(self.microbatches) - 1, layer=router.layer_number,
                                   x=args[0].detach().clone(), weight=router.weight.detach().clone(),
                                   routing_map=out[1].detach().clone()))

    def _last_router_grad(self) -> torch.Tensor:
        last = max(self.routers, key=lambda r: r.layer_number)
        return last.weight.main_grad.detach().clone()

    def __enter__(self):
        from clinmega.training import loop

        self.loop, self.real = loop, loop.forward_backward

        def traced(model, microbatches, forward_only=False):
            if forward_only:
                return self.real(model, microbatches, forward_only)
            if not self.routers:
                from megatron.core.transformer.moe.router import TopKRouter

                self.routers = [m for chunk in model for m in chunk.modules()
                                if isinstance(m, TopKRouter)]
                for router in self.routers:
                    router.register_forward_hook(self._hook)
            self.microbatches.append([dict(tokens=mb["tokens"].numel(),
                                           loss_tokens=float(mb["loss_mask"].sum()))
                                      for mb in microbatches])
            if self.grad_without is None:
                coeff = self.routers[0].config.moe_aux_loss_coeff
                for router in self.routers:
                    router.config.moe_aux_loss_coeff = 0.0
                self.real(model, microbatches)
                for router in self.routers:
                    router.config.moe_aux_loss_coeff = coeff
                self.grad_without = self._last_router_grad()
            self.active = True
            try:
                value = self.real(model, microbatches)
            finally:
                self.active = False
            if self.grad_with is None:
                self.grad_with = self._last_router_grad()
            return value

        loop.forward_backward = traced
        return self

    def __exit__(self, *exc):
        self.loop.forward_backward = self.real


def mixtral_aux(tmp: Path, *parallel: str) -> dict:
    """Tiny Mixtral SFT (packed), aux loss on, 2 steps with plain DDP, routers traced; started
    from the same initial weights in every layout (``initial_weights``)."""
    from megatron.core import parallel_state as ps

    init = initial_weights(tmp / "init", SFT_RECIPE, "model.preset=tiny-mixtral")
    with RouterTrace() as trace:
        out = run(SFT_RECIPE, tmp / "run", *MIXTRAL_AUX, *parallel, f"checkpoint.load_weights={init}")
    router = trace.routers[0]
    return dict(records=out["records"], calls=trace.calls, microbatches=trace.microbatches,
                grad_with=trace.grad_with, grad_without=trace.grad_without,
                coeff=router.config.moe_aux_loss_coeff, topk=router.topk,
                num_experts=router.config.num_moe_experts, num_layers=router.config.num_layers,
                dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                ep_size=ps.get_expert_model_parallel_world_size(), init=str(init))


# The aux-loss runs' recipe overrides (also the single-process run in test_training.py).
MIXTRAL_AUX = ["model.preset=tiny-mixtral", "train.steps=2", "train.warmup_steps=0",
               "train.neftune_alpha=null",
               "train.use_distributed_optimizer=false", "checkpoint.resume=false",
               "logging.tensorboard=false"]


@TABLE.case
def mixtral_aux_ep2(tmp: Path) -> dict:
    return mixtral_aux(tmp, "parallel.expert_parallel=2")


@TABLE.case
def mixtral_aux_dp2(tmp: Path) -> dict:
    return mixtral_aux(tmp)


def nan_run(tmp: Path, policy: str) -> dict:
    """Loss forced to NaN at step 4 (a patched forward/backward): stop raises and saves nothing
    after step 2's checkpoint; skip logs the step as skipped and continues. Also returns a
    snapshot of the weights as each step's forward/backward starts."""
    from clinmega.training import loop

    real = loop.forward_backward
    calls = {"n": 0}
    weights: dict[int, torch.Tensor] = {}

    def poisoned(model, microbatches, forward_only=False):
        if not forward_only:
            weights[calls["n"] + 1] = torch.cat([p.detach().flatten().clone()
                                                 for c in model for p in c.module.parameters()])
        value = real(model, microbatches, forward_only)
        calls["n"] += 1
        return math.nan if calls["n"] == 4 and not forward_only else value

    loop.forward_backward = poisoned
    try:
        out = run(CPT_RECIPE, tmp, "train.steps=6", "train.save_interval=2",
                  f"train.nan_policy={policy}", "logging.tensorboard=false")
        out["error"] = None
    except loop.NonFiniteLossError as err:
        out = dict(error=str(err), records=_records(tmp))
    finally:
        loop.forward_backward = real
    from clinmega.training.checkpoint import read_latest

    out["latest"] = read_latest(tmp / "checkpoints")
    out["weights_before_step"] = weights
    return out


@TABLE.case
def nan_stop(tmp: Path) -> dict:
    return nan_run(tmp, "stop")


@TABLE.case
def nan_skip(tmp: Path) -> dict:
    return nan_run(tmp, "skip")


@TABLE.case
def fp8_without_te(tmp: Path) -> str | None:
    try:
        run(CPT_RECIPE, tmp, "precision.fp8=hybrid")
    except ConfigError as err:
        return str(err)
    return None


# --- NEFTune ------------------------------------------------------------------------------------
@TABLE.case
def sft_alpha0(tmp: Path) -> dict:
    """SFT: alpha 0 equals the path without NEFTune exactly."""
    return run(SFT_RECIPE, tmp, "train.steps=3", "train.warmup_steps=1",
               "train.neftune_alpha=0.0")["losses"]


@TABLE.case
def sft_off(tmp: Path) -> dict:
    return run(SFT_RECIPE, tmp, "train.steps=3", "train.warmup_steps=1",
               "train.neftune_alpha=null")["losses"]


@TABLE.case
def sft_alpha5(tmp: Path) -> dict:
    return run(SFT_RECIPE, tmp, "train.steps=3", "train.warmup_steps=1")["losses"]


# The NEFTune probes' data: every item is one of two hand-made packed rows (S = the SFT recipe's
# 48), so both DP ranks see the same microbatches. (start, end, loss start, loss end) per packed
# segment; L is the length up to the last loss token, which is not the segment's length where
# the segment ends in non-loss tokens; a segment without loss and the padding tail get no noise.
PROBE_SEQ = 48
PROBE_ROWS = [
    dict(segments=[(0, 20, 8, 16), (20, 40, 26, 40), (40, 44, None, None)], pad_from=44,
         L=[(0, 16), (20, 20)]),
    dict(segments=[(0, 30, 10, 25), (30, 48, 35, 41)], pad_from=48, L=[(0, 25), (30, 11)]),
]


def _probe_item(row: dict) -> dict:
    rng = np.random.default_rng(len(row["segments"]))
    tokens = torch.as_tensor(rng.integers(1, 64, PROBE_SEQ), dtype=torch.int64)
    loss_mask = torch.zeros(PROBE_SEQ)
    positions, cu = [], [0]
    for start, end, a, b in row["segments"]:
        if a is not None:
            loss_mask[a:b] = 1.0
        positions.append(torch.arange(end - start))
        cu.append(end)
    if row["pad_from"] < PROBE_SEQ:
        tokens[row["pad_from"]:] = 0
        positions.append(torch.arange(PROBE_SEQ - row["pad_from"]))
        cu.append(PROBE_SEQ)
    labels = torch.roll(tokens, -1)
    labels[loss_mask == 0] = -100
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask,
                position_ids=torch.cat(positions), cu_seqlens=torch.tensor(cu, dtype=torch.int32))


class ProbeSource:
    def __len__(self) -> int:
        return 64

    def __getitem__(self, index: int) -> dict:
        return _probe_item(PROBE_ROWS[index % 2])


def neftune_probe(tmp: Path, *parallel: str) -> dict:
    """The embedding output before and after the NEFTune hook, captured in real ``Trainer.step``
    calls (one forward hook prepended before NEFTune's, one after) of the SFT recipe on the probe
    data, per microbatch, as this rank holds it (its sequence-parallel shard under SP); plus an
    eval-mode forward that carries NEFTune contexts, and the step after."""
    from megatron.core import parallel_state as ps

    from clinmega.models.dist_ckpt import unwrap
    from clinmega.runtime import initialize
    from clinmega.training.data import GlobalBatchSampler
    from clinmega.training.loop import build_trainer
    from clinmega.training.step import forward_backward

    cfg = experiment(SFT_RECIPE, tmp, "checkpoint.resume=false", "data.shuffle=false", *parallel)
    initialize(cfg.parallel, cfg.runtime)
    trainer = build_trainer(cfg)
    trainer.sampler = GlobalBatchSampler(ProbeSource(), cfg.train.global_batch_size,
                                         cfg.train.micro_batch_size, 0, False)
    embedding = unwrap(trainer.model[0]).embedding
    clean, noisy = [], []
    embedding.register_forward_hook(lambda m, i, out: clean.append(out.detach().clone()),
                                    prepend=True)
    embedding.register_forward_hook(lambda m, i, out: noisy.append(out.detach().clone()))

    def captured() -> list[dict]:
        out = [dict(clean=c, noise=n - c) for c, n in zip(clean, noisy)]
        clean.clear(), noisy.clear()
        return out

    step = 3
    trainer.step(step)
    at_step = captured()
    for chunk in trainer.model:
        chunk.eval()
    forward_backward(trainer.model, trainer.microbatches(step), forward_only=True)  # contexts set
    at_eval = captured()
    trainer.step(step + 1)
    at_next = captured()
    mbs = trainer.microbatches(step)
    return dict(step=step, at_step=at_step, at_eval=at_eval, at_next=at_next,
                loss_mask=[mb["loss_mask"] for mb in mbs], cu_seqlens=[mb["cu_seqlens"] for mb in mbs],
                scale=[mb["neftune"]["scale"] for mb in mbs],
                sequence_parallel=cfg.parallel.sequence_parallel, seed=cfg.runtime.seed,
                alpha=cfg.train.neftune_alpha, hidden=cfg.model.hidden_size,
                tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
                dp_rank=trainer.dp_rank)


@TABLE.case
def neftune_probe_tp2(tmp: Path) -> dict:
    return neftune_probe(tmp, "parallel.tensor_parallel=2")


@TABLE.case
def neftune_probe_tp2_sp(tmp: Path) -> dict:
    return neftune_probe(tmp, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true")


@TABLE.case
def neftune_probe_dp2(tmp: Path) -> dict:
    return neftune_probe(tmp)
