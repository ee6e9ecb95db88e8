"""The ``clinmega`` command: a thin parser that hands each verb to its stage package.

Each stage package exposes ``register(subparsers)`` in its ``cli`` module, adding its verbs with
``func=<callable(args) -> exit code>``; this module only collects them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Stage packages that contribute verbs, in the order they appear in --help.
STAGE_CLIS = (
    "clinmega.demo.cli",
    "clinmega.conversion.cli",
    "clinmega.data.cli",
    "clinmega.training.cli",
    "clinmega.evaluation.cli",
    "clinmega.launch.cli",
    "clinmega.models.cli",
)


def _quiet_imports() -> None:
    """megatron-core and torch warn on import about optional kernels (Apex, TE, CUDA) that the CPU
    path does not use; `clinmega info` reports what is available instead."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*not installed.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    _quiet_imports()
    parser = argparse.ArgumentParser(
        prog="clinmega",
        description="Continuous pretraining, instruct tuning (NEFTune) and evaluation of "
                    "Mistral/Mixtral for clinical work, on megatron-core.",
        epilog="@FILE anywhere on the command line inserts FILE's lines as arguments "
               "(one per line), e.g. clinmega eval MODEL @recipes/eval_prompt_strategies.args "
               "--data-dir DIR --out OUT; later arguments override earlier ones.",
        fromfile_prefix_chars="@")
    parser.add_argument("--version", action="version",
                        version=f"clinmega {importlib.import_module('clinmega').__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_CLIS:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from clinmega.config.errors import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"clinmega {args.command}: configuration error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
