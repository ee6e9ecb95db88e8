"""``clinmega models`` (presets and their sizes) and ``clinmega info`` (what this machine runs)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from clinmega.config.keys import add_config_arguments, config_from_args


@dataclass
class ModelsFilter:
    preset: Optional[str] = None  # show this preset only (default: all)


@dataclass
class ModelsKeys:
    model: ModelsFilter = field(default_factory=ModelsFilter)


def _models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from clinmega.models import PRESETS, count_active_parameters, count_parameters, get_preset

    keys = config_from_args(args)
    shown = {keys.model.preset: get_preset(keys.model.preset)} if keys.model.preset else PRESETS
    table = Table(title="clinmega model presets")
    for col in ("preset", "arch", "layers", "hidden", "heads/kv", "vocab", "experts",
                "sliding window", "rope theta", "params", "active"):
        table.add_column(col)
    for name, cfg in shown.items():
        table.add_row(name, cfg.arch, str(cfg.num_layers), str(cfg.hidden_size),
                      f"{cfg.num_attention_heads}/{cfg.num_query_groups}", str(cfg.vocab_size),
                      f"{cfg.num_experts} top-{cfg.moe_router_topk}" if cfg.is_moe else "-",
                      str(cfg.sliding_window or "-"), f"{cfg.rope_theta:g}",
                      f"{count_parameters(cfg):,}", f"{count_active_parameters(cfg):,}")
    Console(width=200).print(table)
    return 0


def _info(args: argparse.Namespace) -> int:
    import megatron.core
    import torch

    from clinmega.models.spec import resolve_transformer_impl, transformer_engine_available
    from clinmega.runtime import cpu_compat

    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}")
    print(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"Transformer Engine importable: {transformer_engine_available()}")
    print(f"layer implementation (auto): {resolve_transformer_impl('auto')}")
    print(f"process-group backend (auto): {'nccl' if cuda else 'gloo'}")
    if not cuda:
        print("CPU compatibility patches applied on initialisation:")
        for patch in cpu_compat.PATCHES:
            print(f"  - {patch.name}: {patch.works_around}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list model presets with exact parameter counts")
    add_config_arguments(p, ModelsKeys)
    p.set_defaults(func=_models)
    p = subparsers.add_parser("info", help="show the runtime this machine would use (GPU/CPU, TE, "
                                           "backend, CPU patches)")
    p.set_defaults(func=_info)
