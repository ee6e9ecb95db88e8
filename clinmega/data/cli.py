"""Command-line verbs of the data stages, registered into the main ``clinmega`` parser.

``register(subparsers)`` adds::

    clinmega prepare pretrain  --inputs 'raw/*.jsonl.gz' --output-prefix data/clinical --tokenizer mistral-v1
    clinmega prepare sft       --inputs chat.jsonl --output-dir data/sft --seq-length 4096
    clinmega prepare pretrain  ... --shard 0/4               (shard 0 of 4 -> <prefix>-00000-of-00004.*)
    clinmega prepare merge     --output-prefix data/clinical (joins the shards into data/clinical.*)
    clinmega prepare blend     --config blend.yaml          (builds the blend, prints epochs per source)
    clinmega decontaminate     --inputs train.jsonl --eval-sets 'eval/*.jsonl' --output-dir clean --mode report

Every option is a field of the stage's dataclass (``PretrainPrepConfig``, ``SFTPrepConfig``,
``BlendConfig``, ``DecontamConfig``), generated from it so the CLI and recipes cannot drift apart.
``--config FILE.yaml`` loads the same fields from YAML (either at top level or under a section named
``pretrain``/``sft``/``blend``/``decontaminate``); options given on the command line override it.
Each verb's ``func(args)`` returns an exit code: 0 done, 1 finished but wrote nothing, 2 bad input
(also: damaged input files under ``--strict``; without it they are reported on one line and the run
succeeds with every document before each break).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import logging
import types
import typing
from pathlib import Path
from typing import Any, Callable

from clinmega.data.config import (
    BlendConfig,
    BlendSource,
    DecontamConfig,
    MergeConfig,
    PretrainPrepConfig,
    SFTPrepConfig,
)

log = logging.getLogger("clinmega.data")


def _field_kind(cls: type, f: dataclasses.Field) -> tuple[str, type | None]:
    """('bool'|'list'|'scalar'|'skip', element type) of a dataclass field's annotation."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = args[0]
    if hint is bool:
        return "bool", None
    if typing.get_origin(hint) is list:
        (elem,) = typing.get_args(hint)
        return ("list", elem) if elem in (str, int, float) else ("skip", None)
    return "scalar", hint


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` option per dataclass field (default None = "not given")."""
    for f in dataclasses.fields(cls):
        kind, elem = _field_kind(cls, f)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        helptext = f"(default: {default!r})"
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        elif kind == "list":
            parser.add_argument(flag, nargs="+", type=elem, default=None, help=helptext)
        elif kind == "scalar":
            parser.add_argument(flag, type=elem, default=None, help=helptext)


def load_config(cls: type, args: argparse.Namespace, section: str) -> Any:
    """Dataclass ``cls`` from defaults <- YAML ``--config`` (top level or under ``section``) <- CLI,
    through :func:`clinmega.config.load_config` (unknown keys and wrong types name the key)."""
    from omegaconf import OmegaConf

    from clinmega.config import ConfigError
    from clinmega.config import load_config as load_schema

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        raw = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)
        if not isinstance(raw, dict):
            raise ValueError(f"{args.config}: expected a mapping at top level")
        values = raw[section] if isinstance(raw.get(section), dict) else raw
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    if cls is BlendConfig:
        sources = [_blend_source(i, s) for i, s in enumerate(values.get("sources", []))]
        sources += [parse_source(s) for s in getattr(args, "source", None) or []]
        values["sources"] = [dataclasses.asdict(s) for s in sources]
    for key in ("inputs", "eval_sets"):
        if isinstance(values.get(key), str):
            values[key] = [values[key]]
    overrides = []
    for item in getattr(args, "overrides", None) or []:  # `section.key=value` words (clinmega.cli collects them)
        head, _, rest = item.partition(".")
        if head != section:
            raise ConfigError(f"override {item!r}: keys of this verb are {section}.<field>, e.g. "
                              f"{section}.{dataclasses.fields(cls)[0].name}=...")
        overrides.append(rest)
    try:
        return load_schema(cls, [values], overrides)
    except ConfigError as err:
        where = f"{args.config}: " if getattr(args, "config", None) else ""
        raise ConfigError(f"{where}{section}.{err}") from None


def _blend_source(i: int, entry: Any) -> BlendSource:
    if isinstance(entry, BlendSource):
        return entry
    names = [f.name for f in dataclasses.fields(BlendSource)]
    if not isinstance(entry, dict) or set(entry) - set(names) or not {"name", "prefix"} <= set(entry):
        raise ValueError(
            f"blend.sources[{i}]: expected a mapping with keys among {names} (name, prefix required), got {entry!r}"
        )
    return BlendSource(**entry)


def parse_source(text: str) -> BlendSource:
    """``NAME=PREFIX:weight=0.8`` or ``NAME=PREFIX:tokens=2e9`` -> BlendSource."""
    try:
        name, rest = text.split("=", 1)
        prefix, spec = rest.rsplit(":", 1)
        key, value = spec.split("=", 1)
    except ValueError:
        raise ValueError(f"--source {text!r}: expected NAME=PREFIX:weight=W or NAME=PREFIX:tokens=N") from None
    if key == "weight":
        return BlendSource(name, prefix, weight=float(value))
    if key == "tokens":
        return BlendSource(name, prefix, tokens=int(float(value)))
    raise ValueError(f"--source {text!r}: unknown key {key!r} (weight|tokens)")


def _run(stage: Callable[[Any], dict[str, Any]], cls: type, section: str, wrote: Callable[[dict], bool]) -> Callable:
    def func(args: argparse.Namespace) -> int:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # no-op under clinmega.cli's
        logging.getLogger("clinmega").setLevel(logging.INFO)                # handler; progress lines
        logging.getLogger("megatron").setLevel(logging.WARNING)  # its dataset builders log every index
        cfg = load_config(cls, args, section)
        result = stage(cfg)
        shown = {k: result[k] for k in ("totals", "packing", "output", "documents_flagged", "splits") if k in result}
        print(json.dumps(shown, indent=2))
        from clinmega.data.manifest import damage_line

        damaged = damage_line(result)
        if damaged:
            print(damaged, file=sys.stderr)
        return 0 if wrote(result) else 1

    return func


def _blend_stage(cfg: BlendConfig) -> dict[str, Any]:
    from clinmega.data.blend import build_blend

    return build_blend(cfg).report


def _pretrain_stage(cfg: PretrainPrepConfig) -> dict[str, Any]:
    from clinmega.data.pretrain import prepare_pretrain

    return prepare_pretrain(cfg)


def _merge_stage(cfg: MergeConfig) -> dict[str, Any]:
    from clinmega.data.merge import merge_pretrain_shards

    return merge_pretrain_shards(cfg)


def _sft_stage(cfg: SFTPrepConfig) -> dict[str, Any]:
    from clinmega.data.sft import prepare_sft

    return prepare_sft(cfg)


def _decontam_stage(cfg: DecontamConfig) -> dict[str, Any]:
    from clinmega.data.decontam import decontaminate

    return decontaminate(cfg)


def register(subparsers: Any) -> None:
    """Add ``prepare {pretrain,merge,sft,blend}`` and ``decontaminate`` to an argparse subparsers object."""
    prepare = subparsers.add_parser("prepare", help="prepare training data")
    verbs = prepare.add_subparsers(dest="prepare_command", required=True)

    def written(m: dict) -> bool:
        return m["totals"]["documents_written"] > 0

    specs = [
        (
            verbs,
            "pretrain",
            "tokenize text into megatron-core indexed datasets",
            PretrainPrepConfig,
            _pretrain_stage,
            written,
        ),
        (
            verbs,
            "merge",
            "join the shards of 'prepare pretrain --shard i/N' into one indexed dataset",
            MergeConfig,
            _merge_stage,
            written,
        ),
        (verbs, "sft", "template, mask and pack chat data", SFTPrepConfig, _sft_stage, written),
        (
            verbs,
            "blend",
            "build a weighted blend and report epochs per source",
            BlendConfig,
            _blend_stage,
            lambda r: True,
        ),
        (subparsers, "decontaminate", "n-gram overlap with evaluation sets", DecontamConfig, _decontam_stage, written),
    ]
    for parent, name, helptext, cls, stage, wrote in specs:
        p = parent.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--config", type=Path, default=None,
                       help=f"YAML file with the same fields (top level or under '{name}:'); "
                            f"{name}.<field>=value words override single fields")
        p.set_defaults(overrides=[])
        add_dataclass_args(p, cls)
        if cls is BlendConfig:
            p.add_argument("--source", action="append", help="NAME=PREFIX:weight=W or NAME=PREFIX:tokens=N")
        p.set_defaults(func=_run(stage, cls, name, wrote))
