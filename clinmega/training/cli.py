"""The ``train`` and ``plot`` verbs, registered into the main CLI:
``clinmega train recipe.yaml key=value ...``, or ``torchrun --nproc-per-node N -m clinmega.cli train
recipe.yaml ...`` for several ranks (``srun ... python -m clinmega.cli train`` under Slurm)."""

from __future__ import annotations

import argparse
import json
import os


def _train(args: argparse.Namespace) -> int:
    from clinmega.runtime import shutdown
    from clinmega.training.config import load_experiment
    from clinmega.training.loop import train

    try:
        cfg = load_experiment([args.recipe], args.overrides)
        summary = train(cfg)
    finally:
        shutdown()
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from clinmega.training.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


def register(subparsers) -> None:
    from clinmega.config.keys import keys_help
    from clinmega.training.config import ExperimentConfig

    p = subparsers.add_parser("train", help="continuous pretraining / SFT (+NEFTune) on megatron-core",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=keys_help(ExperimentConfig))
    p.add_argument("recipe", help="recipe YAML (an ExperimentConfig: the keys below)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.lr=1e-5")
    p.set_defaults(func=_train)
    p = subparsers.add_parser("plot", help="PNG of a training run's loss/LR curves (and benchmark "
                                          "accuracy against tokens seen, with train.eval_benchmarks)")
    p.add_argument("run_dir", help="a train run directory (holds metrics.jsonl)")
    p.add_argument("-o", "--output", default=None, help="PNG path (default: <run_dir>/curves.png)")
    p.set_defaults(func=_plot)
