"""``clinmega demo``: the whole pipeline on a tiny model, on CPU (the README's main job)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from clinmega.demo.pipeline import DemoOptions, run_demo

    run_demo(DemoOptions(out=Path(args.out), cpt_steps=args.cpt_steps, sft_steps=args.sft_steps,
                         eval_limit=args.eval_limit))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run every stage on a tiny random model on CPU "
                                           "(import, prepare, CPT, SFT+NEFTune, export, eval)")
    p.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument("--cpt-steps", type=int, default=30)
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--eval-limit", type=int, default=8, help="items per benchmark")
    p.set_defaults(func=_demo)
