"""``import-hf`` / ``export-hf`` sub-commands; ``register(subparsers)`` adds them to a CLI."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field, replace

from clinmega.config.keys import Alias, add_config_arguments, config_from_args, dtype_arg
from clinmega.config.schema import DTYPES, TRANSFORMER_IMPLS, AutoPrecision, ParallelConfig, _choice


@dataclass
class ImportRuntime:
    transformer_impl: str = "auto"  # layer implementation whose checkpoint keys to write

    def __post_init__(self):
        _choice("runtime", "transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)


@dataclass
class ImportKeys:
    """``import-hf``'s keys: the target layout (checked on one process; written by each rank under
    torchrun/Slurm; sequence_parallel is on whenever tensor_parallel > 1) and the layer implementation."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: ImportRuntime = field(default_factory=ImportRuntime)
    precision: AutoPrecision = field(default_factory=AutoPrecision)  # None: the source's


@dataclass
class ExportKeys:
    """``export-hf``'s keys: the dtype to write (None: the checkpoint's)."""

    precision: AutoPrecision = field(default_factory=AutoPrecision)


DTYPE_ALIAS = Alias("--dtype", "precision.dtype", dtype_arg,
                    f"dtype to write, one of {list(DTYPES)} (default: the source's); a cast that changes "
                    "values is refused without --allow-downcast")


IMPORT_ALIASES = (
    Alias("--tp", "parallel.tensor_parallel", int, "tensor parallel size"),
    Alias("--pp", "parallel.pipeline_parallel", int, "pipeline parallel size"),
    Alias("--vpp", "parallel.virtual_pipeline_parallel", int, "virtual pipeline stages per rank"),
    Alias("--ep", "parallel.expert_parallel", int, "expert parallel size"),
    Alias("--etp", "parallel.expert_tensor_parallel", int, "expert tensor parallel size (default: tensor_parallel)"),
    Alias("--transformer-impl", "runtime.transformer_impl", str, f"one of {list(TRANSFORMER_IMPLS)}"),
    DTYPE_ALIAS,
)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, '1024' -> 1024."""
    match = _SIZE.match(text)
    unit = (match.group(2) or "").upper() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-downcast", action="store_true",
                        help="accept a narrowing cast that loses precision")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty output folder")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hf_dir", help="HF model folder (config.json + safetensors)")
    parser.add_argument("out_dir", help="output megatron-core distributed checkpoint folder")
    parser.add_argument("--tokenizer", default=None,
                        help="folder with the tokenizer / generation_config files to carry in the "
                             "checkpoint (default: hf_dir's)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pytorch_model*.bin (torch.load weights_only=True)")
    add_config_arguments(parser, ImportKeys, IMPORT_ALIASES)
    vocab = parser.add_argument_group(
        "vocabulary extension (CPT/SFT with new tokens): new embedding and output rows are the "
        "mean of the existing ones; the extended tokenizer is saved in OUT/hf_assets")
    vocab.add_argument("--add-tokens", metavar="FILE|TOKENS", default=None,
                       help="tokens to add: a file with one token per line, or a comma-separated "
                            "list; tokens already in the vocabulary are skipped")
    vocab.add_argument("--add-special-tokens", metavar="FILE|TOKENS", default=None,
                       help="the same for special tokens (e.g. chat-role markers; dropped by "
                            "decoding with skip_special_tokens)")
    _common(parser)
    parser.set_defaults(func=run_import)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt_dir", help="a train run directory, checkpoint root or checkpoint "
                                         "folder (its newest complete checkpoint is exported)")
    parser.add_argument("out_dir", help="output HF model folder")
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--hf-config", help="HF config.json (or its folder) of the architecture "
                                           "(default: the one the checkpoint records)")
    model.add_argument("--preset", help="clinmega model preset name instead of --hf-config")
    parser.add_argument("--tokenizer", help="folder with tokenizer / generation_config files "
                                            "(default: the checkpoint's hf_assets)")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"),
                        help="largest safetensors shard (default 5GB)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="of a LoRA run (train.peft=lora): write a HF PEFT adapter folder "
                             "(adapter_config.json + adapter_model.safetensors) for "
                             "peft.PeftModel.from_pretrained on the exported base model, instead "
                             "of the merged weights (the default for a LoRA run)")
    add_config_arguments(parser, ExportKeys, (DTYPE_ALIAS,))
    _common(parser)
    parser.set_defaults(func=run_export)


def _report(summary) -> int:
    print(summary)
    return 0


def run_import(args: argparse.Namespace) -> int:
    from clinmega.conversion.added_tokens import parse_tokens
    from clinmega.conversion.importer import import_hf
    from clinmega.runtime import shutdown

    try:
        add_tokens = parse_tokens(args.add_tokens) if args.add_tokens else []
        add_special = parse_tokens(args.add_special_tokens) if args.add_special_tokens else []
        keys = config_from_args(args)
        parallel = replace(keys.parallel, sequence_parallel=keys.parallel.sequence_parallel
                           or keys.parallel.tensor_parallel > 1)
        return _report(import_hf(args.hf_dir, args.out_dir, parallel, keys.precision.dtype,
                                 allow_downcast=args.allow_downcast,
                                 allow_pickle=args.allow_pickle, overwrite=args.overwrite,
                                 transformer_impl=keys.runtime.transformer_impl,
                                 progress=args.progress, add_tokens=add_tokens,
                                 add_special_tokens=add_special, tokenizer=args.tokenizer))
    finally:
        shutdown()


def run_export(args: argparse.Namespace) -> int:
    from clinmega.conversion.checkpoint_info import hf_model_config
    from clinmega.conversion.errors import ConversionError
    from clinmega.conversion.exporter import export_hf
    from clinmega.models import get_preset

    keys = config_from_args(args)
    if args.adapter_only:
        from clinmega.conversion.lora_export import export_peft_adapter

        given = [flag for flag, value in (("--hf-config", args.hf_config), ("--preset", args.preset),
                                          ("--tokenizer", args.tokenizer)) if value]
        if given:
            raise ConversionError(f"export-hf --adapter-only: {', '.join(given)} do not apply "
                                  "(the adapters' model is the one the run records)")
        return _report(export_peft_adapter(args.ckpt_dir, args.out_dir, keys.precision.dtype,
                                           allow_downcast=args.allow_downcast,
                                           overwrite=args.overwrite, progress=args.progress))
    model = (hf_model_config(args.hf_config) if args.hf_config else
             get_preset(args.preset) if args.preset else None)
    return _report(export_hf(args.ckpt_dir, args.out_dir, model, keys.precision.dtype,
                             allow_downcast=args.allow_downcast, assets=args.tokenizer,
                             overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                             progress=args.progress))


def register(subparsers) -> None:
    """Add ``import-hf`` and ``export-hf`` to an argparse subparsers object."""
    add_import_arguments(subparsers.add_parser(
        "import-hf", help="HF folder -> megatron-core distributed checkpoint",
        description="Convert a HF Mistral/Mixtral folder into a megatron-core distributed "
                    "checkpoint, one tensor at a time."))
    add_export_arguments(subparsers.add_parser(
        "export-hf", help="megatron-core distributed checkpoint -> HF folder",
        description="Convert a megatron-core distributed checkpoint into a HF folder "
                    "(sharded safetensors, config, tokenizer), one tensor at a time. A LoRA run "
                    "exports its base with the adapters merged, or with --adapter-only a HF PEFT "
                    "adapter folder."))
