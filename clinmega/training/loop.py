"""``train(cfg)``: the CPT / SFT training loop, top to bottom.

1. runtime (process groups, parallel state, seeds); 2. model chunks (+ weights of
``checkpoint.load_weights``, weights only; the model is checked against the one the checkpoint
records) wrapped in megatron DDP; with ``train.peft=lora`` LoRA adapters on a frozen base (the
base is ``checkpoint.load_weights``, or on resume the base the checkpoint's LoRA record names, and
checkpoints hold the adapters and their optimizer state only: :mod:`clinmega.models.lora`); 3. optimizer + LR schedule; 4. resume from
``<checkpoint dir>/latest`` if there is one; 5. per step: this DP rank's microbatches of the global
batch through megatron-core's schedule (any PP / virtual PP), NaN/inf check, optimizer step, log,
evaluate (validation loss; benchmark accuracy with ``train.eval_benchmarks``), checkpoint; SIGTERM
saves and exits. Returns a summary dict.

Run as ``python -m clinmega.training.loop recipe.yaml [key=value ...]`` (or ``clinmega train``),
under ``torchrun`` for several ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallelConfig

from clinmega.config import to_yaml
from clinmega.models import build_model
from clinmega.models.builder import DTYPES
from clinmega.models import lora_model as lora
from clinmega.models.dist_ckpt import load_model_weights
from clinmega.models.lora import PEFT_KEY, peft_record
from clinmega.models.lora_layers import apply_lora, lora_transformer_overrides
from clinmega.runtime import initialize
from clinmega.training.benchmark_eval import BenchmarkEvaluator
from clinmega.training.checkpoint import Checkpointer, TerminationFlag, TrainingState
from clinmega.training.config import ExperimentConfig
from clinmega.training.data import GlobalBatchSampler, build_sources, is_packed
from clinmega.training.lineage import provenance, start_source
from clinmega.models.flops import training_flops_per_token
from clinmega.training.logging import MetricsLogger, StepTimer, peak_tflops
from clinmega.training.neftune import NEFTune
from clinmega.training.optimizer import (
    build_optimizer,
    build_scheduler,
    current_lr,
    schedule_signature,
)
from clinmega.training.step import forward_backward, sync_params, wire_optimizer, wrap_ddp


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf and ``train.nan_policy`` is ``stop``."""

    exit_code = 3  # `clinmega train` exits with it (clinmega.cli's error handler)


@dataclass
class Trainer:
    """The built pieces of a run (also what the benchmark drives step by step)."""

    cfg: ExperimentConfig
    model: list
    optimizer: Any
    scheduler: Any
    sampler: GlobalBatchSampler
    valid_sampler: GlobalBatchSampler | None
    neftune: NEFTune | None
    checkpointer: Checkpointer
    state: TrainingState
    benchmarks: BenchmarkEvaluator | None = None  # train.eval_benchmarks

    @property
    def dp_rank(self) -> int:
        return ps.get_data_parallel_rank()

    def microbatches(self, step: int, sampler: GlobalBatchSampler | None = None,
                     training: bool = True) -> list[dict]:
        sampler = sampler or self.sampler
        mbs = sampler.microbatches(step, self.dp_rank, ps.get_data_parallel_world_size())
        if training and self.neftune is not None:
            for i, mb in enumerate(mbs):
                mb["neftune"] = self.neftune.context(mb, step, self.dp_rank, i)
        return mbs

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step on global batch ``step`` (0-based); returns its metrics."""
        for chunk in self.model:
            chunk.train()
        self.optimizer.zero_grad()
        microbatches = self.microbatches(step)
        loss = forward_backward(self.model, microbatches)
        aux = moe_aux_loss(self.cfg, len(microbatches))
        if not math.isfinite(loss):
            if self.cfg.train.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step + 1}; stopping without saving (train.nan_policy="
                    f"stop). Last good checkpoint: {self.checkpointer.latest()} in "
                    f"{self.checkpointer.root}. Lower train.lr, check the data, or set "
                    "train.nan_policy=skip to skip such batches.")
            return dict(loss=loss, skipped=1, lr=current_lr(self.optimizer))
        lr = current_lr(self.optimizer)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        return dict(loss=loss, lr=lr, grad_norm=grad_norm,
                    moe_aux_loss=aux, skipped=0 if ok else 1)

    def evaluate(self, step: int) -> float | None:
        if self.valid_sampler is None:
            return None
        for chunk in self.model:
            chunk.eval()
        losses = []
        with torch.no_grad():
            for i in range(self.cfg.train.eval_iters):
                mbs = self.microbatches(step * self.cfg.train.eval_iters + i, self.valid_sampler,
                                        training=False)
                losses.append(forward_backward(self.model, mbs, forward_only=True))
        for chunk in self.model:
            chunk.train()
        moe_aux_loss(self.cfg, 1)  # drop any router statistics of the eval forwards
        return sum(losses) / len(losses)

    def evaluate_benchmarks(self) -> dict[str, float]:
        """``eval/<benchmark>/acc`` and ``eval/seconds`` of the live model (train.eval_benchmarks);
        the training state is left as it was (clinmega.training.benchmark_eval)."""
        metrics = self.benchmarks.evaluate(self.model)
        moe_aux_loss(self.cfg, len(self.model))  # drop the eval forwards' router statistics
        return metrics


def moe_aux_loss(cfg: ExperimentConfig, num_microbatches: int) -> float | None:
    """Mean load-balancing loss of the step (unscaled by its coefficient): megatron-core's MoE
    metrics tracker holds, per layer, the sum of the per-microbatch losses of this rank's
    ``num_microbatches`` microbatches; the report averages them over microbatches (as
    Megatron-LM's ``loss_scale=1/num_microbatches``), data-parallel ranks and MoE layers, so the
    value is the mean over the global batch's microbatches whatever the DP size. Clears the
    tracker. None for dense models."""
    if not cfg.model.is_moe:
        return None
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    totals: dict[str, torch.Tensor] = {}
    get_moe_metrics_tracker().report(loss_scale=1.0 / num_microbatches, iteration=0,
                                     total_loss_dict=totals,
                                     force_initialize=True, track_names=["load_balancing_loss"],
                                     num_layers=cfg.model.num_layers)
    value = totals.get("load_balancing_loss")
    return None if value is None else float(value)


def _ddp_config(cfg: ExperimentConfig, cuda: bool | None = None) -> DistributedDataParallelConfig:
    """Megatron DDP settings: fp32 gradient reduction; the overlaps on by default on CUDA with the
    distributed optimizer (``train.overlap_*`` decide when set); FP8 parameter all-gather with
    ``precision.fp8_param_gather`` (TransformerConfig.fp8_param and the optimizer's fp8_recipe are
    set from the same flag)."""
    t = cfg.train
    cuda = torch.cuda.is_available() if cuda is None else cuda
    default = cuda and t.use_distributed_optimizer
    grad = default if t.overlap_grad_reduce is None else t.overlap_grad_reduce
    param = default if t.overlap_param_gather is None else t.overlap_param_gather
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=t.use_distributed_optimizer,
        overlap_grad_reduce=grad or param, overlap_param_gather=param,
        fp8_param_gather=cfg.precision.fp8_param_gather, check_for_nan_in_grad=False)


def _packed_overrides(cfg: ExperimentConfig) -> dict:
    """Packed data on Transformer Engine under pipelining: THD microbatches are one row whose
    length depends on the per-sample padding, so stages exchange shapes (megatron-core's
    ``variable_seq_lengths``) instead of assuming ``[S/tp, b, h]``."""
    from clinmega.models import resolve_transformer_impl

    te = resolve_transformer_impl(cfg.runtime.transformer_impl) == "transformer_engine"
    if te and is_packed(cfg.data) and cfg.parallel.pipeline_parallel > 1:
        return dict(variable_seq_lengths=True)
    return {}


def build_trainer(cfg: ExperimentConfig) -> Trainer:
    """Everything up to (and including) resuming; the runtime must be initialised."""
    train = cfg.train
    dp = ps.get_data_parallel_world_size()
    train.num_microbatches(dp)  # validates the batch geometry for this world size
    checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
    source = start_source(cfg, checkpointer.root)  # refuses a model the checkpoint was not saved as
    record = provenance(cfg, source)
    lora_base = None
    if train.peft == "lora":  # adapters on a frozen base: checkpoints hold the adapters only
        lora_base = lora.lora_base(cfg.lora, source.directory, source.info, source.resumed)
        record[PEFT_KEY] = peft_record(cfg.lora, lora_base)
        checkpointer.part = "adapters"
    checkpointer.describe(cfg.model, record, source.info and source.info.assets,
                          str(DTYPES[cfg.precision.dtype]).removeprefix("torch."))
    latest = checkpointer.latest() if source.resumed else None
    chunks = build_model(cfg.model, cfg.parallel, cfg.precision, cfg.runtime,
                         **train.transformer_overrides(), **_packed_overrides(cfg),
                         **(lora_transformer_overrides(cfg.model.is_moe) if lora_base else {}))
    if lora_base is not None:  # before DDP: frozen weights get no gradient buffer
        apply_lora(chunks, cfg.lora, cfg.runtime.seed)
        load_model_weights(chunks, lora_base, part="base")
    elif source.directory is not None and not source.resumed:  # a resumed run has its own weights
        load_model_weights(chunks, source.directory)
    model = wrap_ddp(chunks, _ddp_config(cfg))
    neftune = None
    if train.neftune_alpha is not None:
        neftune = NEFTune(train.neftune_alpha, cfg.model.hidden_size, cfg.runtime.seed)
        neftune.attach(model)
    optimizer = build_optimizer(train, cfg.precision, model)
    wire_optimizer(model, optimizer)
    train_src, valid_src = build_sources(cfg)
    sampler = GlobalBatchSampler(train_src, train.global_batch_size, train.micro_batch_size,
                                 cfg.data.seed, cfg.data.shuffle)
    valid = (GlobalBatchSampler(valid_src, train.global_batch_size, train.micro_batch_size,
                                cfg.data.seed + 1, cfg.data.shuffle)
             if valid_src is not None and train.eval_interval else None)
    state, saved_schedule = TrainingState(), None
    if latest is not None:
        state, saved_schedule = checkpointer.load(latest, model, optimizer)
        if train.rewarm and state.schedule != schedule_signature(train):
            state.schedule_start, saved_schedule = state.step, None  # a fresh schedule from here
    scheduler = build_scheduler(train, optimizer, start_step=state.schedule_start)
    if saved_schedule is not None:
        scheduler.load_state_dict(saved_schedule)
    state.schedule = schedule_signature(train)
    assets = source.info.assets if source.info is not None and source.info.has_tokenizer else None
    benchmarks = BenchmarkEvaluator.from_config(cfg, assets)
    return Trainer(cfg, model, optimizer, scheduler, sampler, valid, neftune, checkpointer, state,
                   benchmarks)


def _write_run_files(cfg: ExperimentConfig) -> None:
    if dist.get_rank() == 0:
        run = Path(cfg.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(to_yaml(cfg))


def _logger(cfg: ExperimentConfig, start: int) -> MetricsLogger:
    t = cfg.train
    tokens = t.global_batch_size * t.seq_length
    full = t.recompute_granularity == "full"
    return MetricsLogger(
        cfg.run_dir, t.steps, start, dist.get_rank() == 0, tokens,
        training_flops_per_token(cfg.model, t.seq_length, full) * tokens, dist.get_world_size(),
        peak_tflops(cfg.precision.fp8 is not None, cfg.logging.peak_tflops),
        cfg.logging.tensorboard, cfg.logging.progress)


def run_steps(trainer: Trainer, logger: MetricsLogger, stop: TerminationFlag) -> str:
    """The loop proper; returns why it ended: 'done' or 'terminated'."""
    cfg, state = trainer.cfg, trainer.state
    t = cfg.train
    while state.step < t.steps:
        with StepTimer() as timer:
            metrics = trainer.step(state.step)
        state.step += 1
        last = state.step == t.steps
        if state.step % t.log_interval == 0 or last or metrics.get("skipped"):
            logger.log(state.step, **metrics, **logger.throughput(timer.elapsed))
        if t.eval_interval and (state.step % t.eval_interval == 0 or last):
            logger.log(state.step, val_loss=trainer.evaluate(state.step))
        if trainer.benchmarks is not None and (state.step % t.eval_benchmark_interval == 0 or last):
            logger.log(state.step, **trainer.evaluate_benchmarks(),
                       tokens=state.step * logger.tokens_per_step)
        terminated = stop.should_stop()
        if last or terminated or (t.save_interval and state.step % t.save_interval == 0):
            sync_params(trainer.model)
            trainer.checkpointer.save(state.step, trainer.model, trainer.optimizer,
                                      trainer.scheduler, state)
        trainer.checkpointer.finalize()
        if terminated:
            logger.message(f"termination signal: saved step {state.step}, exiting")
            return "terminated"
    return "done"


def train(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run (or resume) training as configured; every rank calls it. Returns a summary."""
    initialize(cfg.parallel, cfg.runtime)
    stop = TerminationFlag()
    try:
        _write_run_files(cfg)
        trainer = build_trainer(cfg)
        start = trainer.state.step
        logger = _logger(cfg, start)
        try:
            logger.message(f"training {cfg.model.name} ({cfg.train.stage}) from step {start} to "
                           f"{cfg.train.steps}; checkpoints in {trainer.checkpointer.root}")
            reason = run_steps(trainer, logger, stop)
        finally:
            trainer.checkpointer.close()
            logger.close()
        return dict(status=reason, start_step=start, step=trainer.state.step,
                    checkpoint=str(trainer.checkpointer.root), latest=trainer.checkpointer.latest(),
                    run_dir=cfg.run_dir)
    finally:
        stop.restore()
