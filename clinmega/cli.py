"""The ``clinmega`` command: a thin parser that hands each verb to its stage package.

Each stage package exposes ``register(subparsers)`` in its ``cli`` module, adding its verbs with
``func=<callable(args) -> exit code>``; this module only collects them. Registering a verb imports
no torch / megatron-core / transformers (``tests/test_startup.py``): heavy modules are imported by
the verb's function when it runs.

This module is also the one error handler of every verb: a user error (a bad value, key, file or
layout: ``ValueError`` incl. ``ConfigError``/``ConversionError``, a missing or existing path) prints
one line ``clinmega VERB: error: ...`` and exits 2; ``--debug`` shows the traceback instead. An
exception carrying an ``exit_code`` attribute (e.g. a non-finite training loss: 3) exits with it.
Third-party warnings are counted, not printed (:mod:`clinmega.utils.quiet`), unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import importlib
import os
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

# Exceptions that mean "the input is wrong", not "clinmega has a bug".
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)  # KeyError: a missing field of an input record (data stages)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` and ``--debug``, accepted before or after the verb (SUPPRESS: a verb's parser
    does not reset what the top-level parser set)."""
    group = parser.add_argument_group("output")
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="also print third-party library warnings (counted and hidden by default)")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error instead of a one-line message")


def _leaf_parsers(parser: argparse.ArgumentParser):
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield parser
    for action in actions:
        for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            yield from _leaf_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
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
    add_output_flags(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGE_CLIS:
        importlib.import_module(name).register(subparsers)
    for leaf in _leaf_parsers(parser):
        if leaf is not parser:
            add_output_flags(leaf)
    return parser


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


def run_verb(args: argparse.Namespace) -> int:
    """``args.func(args)`` under the one error handler (see the module docstring)."""
    debug = getattr(args, "debug", False)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"clinmega {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        code = getattr(err, "exit_code", None)
        if debug or code is None:
            raise
        print(f"clinmega {args.command}: error: {err}", file=sys.stderr)
        return int(code)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; ``section.key=value`` words the verb's own parser left over become ``args.overrides``
    (verbs following :mod:`clinmega.config.keys`), anything else is an error."""
    from clinmega.config.keys import OVERRIDE

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    keys = [w for w in extra if OVERRIDE.match(w)]
    rest = [w for w in extra if not OVERRIDE.match(w)]
    if keys and not isinstance(getattr(args, "overrides", None), list):
        parser.error(f"clinmega {args.command} takes no section.key=value overrides: {' '.join(keys)}")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if keys:
        args.overrides = [*args.overrides, *keys]
    return args


def main(argv: list[str] | None = None) -> int:
    from clinmega.utils.quiet import library_warnings

    args = parse_args(argv)
    with library_warnings(verbose=getattr(args, "verbose", False), report=_is_rank0()):
        return run_verb(args)


if __name__ == "__main__":
    sys.exit(main())
