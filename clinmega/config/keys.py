"""The CLI convention every verb follows: ``--config FILE`` plus ``section.key=value`` overrides.

A verb declares a dataclass schema (sections of key = default, the same sections and key names as
the recipes: ``parallel.tensor_parallel``, ``precision.dtype``, ...) and, optionally, short flags
that are only aliases of keys (``--tp`` = ``parallel.tensor_parallel``)::

    add_config_arguments(parser, ImportKeys, aliases=[Alias("--tp", "parallel.tensor_parallel", int)])
    ...
    cfg = config_from_args(args)      # defaults <- --config FILE <- aliases <- key=value overrides

``section.key=value`` words anywhere on the command line are collected by ``clinmega.cli`` into
``args.overrides``. Unknown keys are rejected with the nearest valid name (OmegaConf's check, raised
as :class:`ConfigError`); ``--help`` lists every key with its default. Adding a key is adding a
dataclass field: the parser, the help and the validation follow from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+=")
SCHEMA_ATTR = "config_schema"


@dataclass(frozen=True)
class Alias:
    """A short flag that sets one key (``--tp 2`` = ``parallel.tensor_parallel=2``). ``flag`` may be a
    tuple of spellings (``("--tp", "--tensor-parallel")``); ``type`` turns the word into the key's one
    spelling (e.g. :func:`dtype_arg`); a flag with a ``const`` takes no value and sets the key to it
    (``--fp8`` = ``precision.fp8=hybrid``)."""

    flag: str | tuple[str, ...]
    key: str
    type: Any = str
    help: str = ""
    const: Any = None

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag,) if isinstance(self.flag, str) else tuple(self.flag)


def dtype_arg(text: str) -> str:
    """argparse type of a dtype alias: the one spelling (``fp32|bf16|fp16``; HF's ``float32`` etc. map
    to it, :func:`clinmega.config.schema.dtype_name`)."""
    from clinmega.config.schema import dtype_name

    try:
        return dtype_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def schema_keys(schema: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, default)`` of every leaf field of a dataclass schema, in declaration order."""
    for f in dataclasses.fields(schema):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            yield from schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default


def keys_help(schema: type, aliases: tuple[Alias, ...] = ()) -> str:
    alias_of = {a.key: "/".join(a.flags) + ("" if a.const is None else f" sets {a.const!r}") for a in aliases}
    lines = ["keys (set with --config FILE or section.key=value; default shown):"]
    for key, default in schema_keys(schema):
        alias = f"   (alias {alias_of[key]})" if key in alias_of else ""
        lines.append(f"  {key} = {default!r}{alias}")
    return "\n".join(lines)


def add_config_arguments(parser: argparse.ArgumentParser, schema: type, aliases: tuple[Alias, ...] = ()) -> None:
    """``--config FILE``, the alias flags, and the keys listing in ``--help``."""
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="YAML file with the keys below (section: {key: value})")
    for a in aliases:
        text = (a.help + " " if a.help else "") + f"(= {a.key}" + ("" if a.const is None else f"={a.const}") + ")"
        if a.const is None:
            parser.add_argument(*a.flags, dest=f"alias.{a.key}", type=a.type, default=None, help=text,
                                metavar=a.key.rsplit(".", 1)[-1].upper())
        else:
            parser.add_argument(*a.flags, dest=f"alias.{a.key}", action="store_const", const=a.const,
                                default=None, help=text)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n\n".join(filter(None, [parser.epilog, keys_help(schema, aliases)]))
    parser.set_defaults(**{SCHEMA_ATTR: schema, "overrides": []})


def config_from_args(args: argparse.Namespace) -> Any:
    """The verb's schema instance: defaults <- ``--config`` <- alias flags <- ``key=value`` words."""
    from clinmega.config.loader import load_config

    schema = getattr(args, SCHEMA_ATTR)
    aliased = [f"{dest[len('alias.'):]}={value}" for dest, value in vars(args).items()
               if dest.startswith("alias.") and value is not None]
    sources = [args.config] if getattr(args, "config", None) else []
    return load_config(schema, sources, [*aliased, *getattr(args, "overrides", [])])
