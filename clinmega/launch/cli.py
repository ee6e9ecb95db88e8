"""``clinmega plan``: rank parallel layouts that fit a cluster, with memory and speed estimates."""

from __future__ import annotations

import argparse


def _plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from clinmega.launch.planner import ClusterConfig, PlanConfig, rank_layouts
    from clinmega.models import get_preset

    cfg = get_preset(args.model)
    cluster = ClusterConfig(num_gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                            gpu_memory_gb=args.gpu_memory)
    lora = None
    if args.lora_rank is not None:
        from clinmega.models.lora import TARGETS, LoRAConfig

        targets = args.lora_targets.split(",") if args.lora_targets else list(TARGETS)
        lora = LoRAConfig(rank=args.lora_rank, targets=targets)
    plan = PlanConfig(seq_length=args.seq_length, global_batch=args.global_batch,
                      micro_batch=args.micro_batch, recompute=args.recompute, fp8=args.fp8,
                      lora=lora)
    best, tried = rank_layouts(cfg, cluster, plan, top=args.top)
    table = Table(title=f"{args.model}: seq {plan.seq_length}, global batch {plan.global_batch}, "
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
    p.add_argument("--model", required=True, help="model preset (see `clinmega models`)")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--gpus", type=int, default=8, help="total GPUs")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GB per GPU")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="selective")
    p.add_argument("--fp8", action="store_true", help="FP8 training (Transformer Engine)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--lora-rank", type=int, default=None,
                   help="plan LoRA training (train.peft=lora) with adapters of this rank: the base "
                        "is frozen (no grads or optimizer state for it)")
    p.add_argument("--lora-targets", default=None,
                   help="comma-separated lora.targets (default: linear_qkv,linear_proj,"
                        "linear_fc1,linear_fc2)")
    p.set_defaults(func=_plan)
