"""``clinmega plan``: rank parallel layouts that fit a cluster, with memory and speed estimates.

Its keys carry the recipes' names (``model.preset``, ``cluster.num_gpus``, ``train.seq_length``,
``train.global_batch_size``, ``train.micro_batch_size``, ``train.recompute_granularity``,
``train.use_distributed_optimizer``, ``precision.fp8``), plus the planner's own ``plan.*``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from clinmega.config.errors import ConfigError
from clinmega.config.keys import Alias, add_config_arguments, config_from_args
from clinmega.config.schema import FP8_FORMATS, ClusterConfig, _choice
from clinmega.models.lora import TARGETS

RECOMPUTE_GRANULARITIES = ("selective", "full")  # train.recompute_granularity; None: no recompute


@dataclass
class PlanModel:
    preset: Optional[str] = None  # required: a name from `clinmega models`


@dataclass
class PlanTrain:
    seq_length: int = 4096
    global_batch_size: int = 256
    micro_batch_size: int = 1
    recompute_granularity: Optional[str] = "selective"
    use_distributed_optimizer: bool = True

    def __post_init__(self):
        if self.recompute_granularity is not None:
            _choice("train", "recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)


@dataclass
class PlanPrecision:
    fp8: Optional[str] = None  # a Transformer Engine FP8 format: FP8 training; None: BF16

    def __post_init__(self):
        if self.fp8 is not None:
            _choice("precision", "fp8", self.fp8, FP8_FORMATS)


@dataclass
class PlanOptions:
    top: int = 10                    # layouts shown
    efficiency: float = 0.5          # fraction of the bf16 peak reached (MFU)
    fp8_speedup: float = 1.6         # FP8's speed-up over bf16
    grad_reduce_in_fp32: bool = True


@dataclass
class PlanLoRA:
    rank: Optional[int] = None       # plan LoRA training (train.peft=lora) at this rank; None: full
    targets: list = field(default_factory=lambda: list(TARGETS))


@dataclass
class PlanKeys:
    model: PlanModel = field(default_factory=PlanModel)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: PlanTrain = field(default_factory=PlanTrain)
    precision: PlanPrecision = field(default_factory=PlanPrecision)
    plan: PlanOptions = field(default_factory=PlanOptions)
    lora: PlanLoRA = field(default_factory=PlanLoRA)


def _targets(text: str) -> str:
    return "[" + ",".join(t.strip() for t in text.split(",")) + "]"


def _recompute(text: str) -> str:
    if text not in ("none", *RECOMPUTE_GRANULARITIES):
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (none, selective, full)")
    return "null" if text == "none" else text


PLAN_ALIASES = (
    Alias("--model", "model.preset", str, "model preset (see `clinmega models`)"),
    Alias("--seq-length", "train.seq_length", int),
    Alias("--global-batch", "train.global_batch_size", int),
    Alias("--micro-batch", "train.micro_batch_size", int),
    Alias("--gpus", "cluster.num_gpus", int, "total GPUs"),
    Alias("--gpus-per-node", "cluster.gpus_per_node", int),
    Alias("--gpu-memory", "cluster.gpu_memory_gb", float, "GB per GPU"),
    Alias("--recompute", "train.recompute_granularity", _recompute, "none, selective or full"),
    Alias("--fp8", "precision.fp8", const="hybrid", help="FP8 training (Transformer Engine)"),
    Alias("--top", "plan.top", int),
    Alias("--lora-rank", "lora.rank", int, "plan LoRA training (train.peft=lora) with adapters of "
          "this rank: the base is frozen (no grads or optimizer state for it)"),
    Alias("--lora-targets", "lora.targets", _targets, "comma-separated lora.targets"),
)


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from clinmega.launch.planner import PlanConfig, rank_layouts
    from clinmega.models import get_preset

    keys = config_from_args(args)
    if keys.model.preset is None:
        raise ConfigError("model.preset: required (--model NAME; `clinmega models` lists them)")
    cfg = get_preset(keys.model.preset)
    cluster = keys.cluster
    lora = None
    if keys.lora.rank is not None:
        from clinmega.models.lora import LoRAConfig  # validates the targets

        lora = LoRAConfig(rank=keys.lora.rank, targets=list(keys.lora.targets))
    plan = PlanConfig(seq_length=keys.train.seq_length, global_batch=keys.train.global_batch_size,
                      micro_batch=keys.train.micro_batch_size,
                      recompute=keys.train.recompute_granularity or "none", fp8=keys.precision.fp8 is not None,
                      distributed_optimizer=keys.train.use_distributed_optimizer,
                      grad_reduce_in_fp32=keys.plan.grad_reduce_in_fp32, efficiency=keys.plan.efficiency,
                      fp8_speedup=keys.plan.fp8_speedup, lora=lora)
    best, tried = rank_layouts(cfg, cluster, plan, top=keys.plan.top)
    table = Table(title=f"{keys.model.preset}: seq {plan.seq_length}, global batch {plan.global_batch}, "
                        f"{cluster.num_gpus} x {cluster.gpu_memory_gb:g} GB GPUs "
                        f"({'FP8' if plan.fp8 else 'BF16'}, recompute {plan.recompute}"
                        f"{f', LoRA rank {lora.rank}' if lora else ''}); "
                        f"{len(best)} of {tried} layouts shown")
    for col in ("layout", "micro-batches", "weights", "grads", "optim", "activ", "logits",
                "total GB", "step s", "tok/s/GPU"):
        table.add_column(col, justify="right")
    for e in best:
        m = e.memory_gb
        table.add_row(e.layout(), str(e.num_microbatches), *(f"{m[k]:.1f}" for k in
                      ("weights", "grads", "optimizer", "activations", "logits")),
                      f"{e.total_gb:.1f}", f"{e.step_seconds:.2f}",
                      f"{e.tokens_per_second_per_gpu:,.0f}")
    Console(width=200).print(table)
    if not best:
        print("no layout fits: add GPUs, use recompute full, or a smaller micro batch")
        return 1
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="estimate memory/speed of parallel layouts and rank "
                                           "those that fit a cluster")
    add_config_arguments(p, PlanKeys, PLAN_ALIASES)
    p.set_defaults(func=_plan)
