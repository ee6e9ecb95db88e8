"""AdamW through megatron-core's ``get_megatron_optimizer`` and the LR schedule through its
``OptimizerParamScheduler``: linear warmup, then cosine / linear decay to ``min_lr`` (or constant).

CPT re-warm (``train.rewarm``): when a run resumes from a checkpoint written under a different
schedule (typically ``train.steps`` was raised to continue pretraining on more tokens), the
schedule restarts at the resume step: warm up again to ``lr`` and decay over the remaining steps
(Ibrahim et al. 2024, "Simple and Scalable Strategies to Continually Pre-train LLMs"). Resuming
under the same schedule (a crash/preemption restart) always continues it exactly.
"""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from clinmega.config import PrecisionConfig
from clinmega.training.config import TrainConfig


def optimizer_config(train: TrainConfig, precision: PrecisionConfig) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
        clip_grad=train.clip_grad, bf16=precision.dtype == "bf16", fp16=precision.dtype == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                      "fp16": torch.float16}[precision.dtype],
        use_distributed_optimizer=train.use_distributed_optimizer,
        # FP8 parameters (precision.fp8_param_gather): the distributed optimizer casts its fp32
        # main weights back into the FP8 model weights by recipe (Megatron-LM sets the same).
        fp8_recipe=precision.fp8_recipe if precision.fp8 else None)


def build_optimizer(train: TrainConfig, precision: PrecisionConfig,
                    chunks: Sequence[torch.nn.Module]):
    """The megatron optimizer over the DDP-wrapped ``chunks`` (weight decay skips norms)."""
    return get_megatron_optimizer(optimizer_config(train, precision), list(chunks))


def schedule_signature(train: TrainConfig) -> dict:
    """What defines the LR schedule; stored in checkpoints to detect a changed schedule."""
    return dict(lr=train.lr, min_lr=train.min_lr, warmup_steps=train.warmup_steps,
                decay_style=train.decay_style, decay_steps=train.lr_decay_steps, steps=train.steps)


def build_scheduler(train: TrainConfig, optimizer, start_step: int = 0) -> OptimizerParamScheduler:
    """The schedule, counted from ``start_step`` (0, or the re-warm step): warmup over
    ``warmup_steps``, decay until ``decay_steps`` (default: ``steps``) from the start."""
    decay = max(train.lr_decay_steps - start_step, train.warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps, lr_decay_steps=decay,
        lr_decay_style=train.decay_style, start_wd=train.weight_decay,
        end_wd=train.weight_decay, wd_incr_steps=max(train.steps, 1), wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
