"""``clinmega demo``: the whole pipeline on a tiny model, on CPU (the README's main job)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from clinmega.config.keys import Alias, add_config_arguments, config_from_args


@dataclass
class DemoRun:
    out: str = "runs/demo"   # output folder
    cpt_steps: int = 30
    sft_steps: int = 30
    eval_limit: int = 8      # items per benchmark


@dataclass
class DemoTrain:
    seq_length: int = 128    # both training stages and the SFT packing


@dataclass
class DemoRuntime:
    seed: int = 1234         # model init, training, evaluation


@dataclass
class DemoKeys:
    demo: DemoRun = field(default_factory=DemoRun)
    train: DemoTrain = field(default_factory=DemoTrain)
    runtime: DemoRuntime = field(default_factory=DemoRuntime)


DEMO_ALIASES = (
    Alias("--out", "demo.out", str, "output folder"),
    Alias("--cpt-steps", "demo.cpt_steps", int),
    Alias("--sft-steps", "demo.sft_steps", int),
    Alias("--eval-limit", "demo.eval_limit", int, "items per benchmark"),
)


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clinmega.demo.pipeline import DemoOptions, run_demo

    keys = config_from_args(args)
    run_demo(DemoOptions(out=Path(keys.demo.out), cpt_steps=keys.demo.cpt_steps,
                         sft_steps=keys.demo.sft_steps, eval_limit=keys.demo.eval_limit,
                         seq_length=keys.train.seq_length, seed=keys.runtime.seed))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run every stage on a tiny random model on CPU "
                                           "(import, prepare, CPT, SFT+NEFTune, export, eval)")
    add_config_arguments(p, DemoKeys, DEMO_ALIASES)
    p.set_defaults(func=_demo)
