"""``clinmega eval``: benchmarks x strategies on one model, written to JSON, Markdown and a PNG chart.

Example::

    clinmega eval runs/export-hf --backend hf --benchmarks medqa_4options,medmcqa,pubmedqa,mmlu_clinical \\
        --data-dir data/benchmarks --strategies zero_shot,few_shot,cot,medprompt --out runs/eval

A model on an OpenAI-compatible server (vLLM, SGLang, TGI, TensorRT-LLM, llama.cpp, ``transformers serve``)::

    clinmega eval --backend openai --endpoint http://localhost:8000/v1 --model mistral-7b \
        --tokenizer runs/export-hf --strategies cot,self_consistency --out runs/eval-served

(generation strategies need only chat/completions or completions; log-likelihood strategies need a server
that echoes prompt log-probabilities, see `clinmega.evaluation.backends.openai_compat`).

Without ``--data-dir`` the shipped SYNTHETIC set is used (tests, demo). ``--limit`` takes the first N
items of each benchmark. Each finished benchmark/strategy is saved under ``OUT/parts/`` and reused by a
rerun with the same model, items and settings (``--no-resume`` recomputes), so an interrupted evaluation
continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from clinmega.config.keys import OVERRIDE, Alias, add_config_arguments, config_from_args, dtype_arg
from clinmega.config.schema import AutoPrecision, _choice
from clinmega.evaluation.benchmarks import expand_benchmark_names, load_benchmark
from clinmega.evaluation.strategies import PRESETS, PROMPT_FORMATS, Strategy, parse_strategy


@dataclass
class ServedConfig:
    """``--backend openai``: the server and the request policy (`clinmega.evaluation.backends.openai_compat`)."""

    endpoint: str = ""  # base URL: http://host:port (then /v1 is added) or the full .../v1
    model: str = ""  # the model name the server serves
    api: str = "completions"  # generation route: completions (the prompt as is) or chat (one user message)
    concurrency: int = 8  # requests in flight
    timeout: float = 300.0  # seconds per request attempt
    retries: int = 5  # retries of a connection error, timeout, 408/409/429/5xx
    backoff: float = 1.0  # first retry delay in seconds, doubled per retry
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the bearer token (unset: none sent)

    def __post_init__(self) -> None:
        _choice("served", "api", self.api, ("completions", "chat"))


@dataclass
class EvalParallel:
    tensor_parallel: int = 1  # megatron backend: ranks, one process each (torchrun)
    expert_parallel: int = 1  # megatron backend, Mixtral
    expert_tensor_parallel: Optional[int] = None  # megatron: TP ranks of each expert (None: tensor_parallel)
    pipeline_parallel: int = 1  # megatron: stages (e.g. the PP4 a Mixtral recipe trains at; any layout is read)
    virtual_pipeline_parallel: Optional[int] = None  # megatron: model chunks per pipeline stage


@dataclass
class EvalKeys:
    """``eval``'s keys (the same names as the recipes'); the other options are flags of this verb."""

    parallel: EvalParallel = field(default_factory=EvalParallel)
    precision: AutoPrecision = field(default_factory=AutoPrecision)  # None: bf16 on CUDA, fp32 on CPU
    served: ServedConfig = field(default_factory=ServedConfig)


EVAL_ALIASES = (
    Alias(("--tp", "--tensor-parallel"), "parallel.tensor_parallel", int,
          "megatron: tensor-parallel ranks (launch one process per rank, e.g. torchrun)"),
    Alias(("--ep", "--expert-parallel"), "parallel.expert_parallel", int, "megatron: expert-parallel ranks (Mixtral)"),
    Alias("--dtype", "precision.dtype", dtype_arg,
          "fp32|bf16|fp16 (default: bf16 on CUDA, where fp32 forces Transformer Engine's unfused attention; "
          "fp32 on CPU)"),
    Alias(("--etp", "--expert-tensor-parallel"), "parallel.expert_tensor_parallel", int,
          "megatron: tensor-parallel ranks of each expert (default: --tensor-parallel)"),
    Alias(("--pp", "--pipeline-parallel"), "parallel.pipeline_parallel", int,
          "megatron: pipeline stages (the checkpoint is read at any layout)"),
    Alias(("--vpp", "--virtual-pipeline-parallel"), "parallel.virtual_pipeline_parallel", int,
          "megatron: model chunks per pipeline stage"),
    Alias("--endpoint", "served.endpoint", str, "openai: server base URL"),
    Alias("--model", "served.model", str, "openai: served model name"),
    Alias("--concurrency", "served.concurrency", int, "openai: requests in flight"),
    Alias("--request-timeout", "served.timeout", float, "openai: seconds per request attempt"),
)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a model on medical benchmarks with prompt strategies",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", type=Path, nargs="?", default=None,
                   help="HF model folder (--backend hf), or a Megatron checkpoint, checkpoint root or train run "
                        "directory (megatron: its newest complete checkpoint); none with --backend openai")
    p.add_argument("--backend", choices=("auto", "hf", "megatron", "openai"), default="auto",
                   help="auto: megatron when model_dir holds a megatron-core checkpoint, else hf; openai: a model "
                        "on an OpenAI-compatible server (--endpoint, --model, served.* keys)")
    p.add_argument("--model-config", type=Path, default=None,
                   help="megatron: HF config.json (or its folder) describing the checkpoint "
                        "(default: the model the checkpoint records)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="megatron: tokenizer folder for AutoTokenizer (default: the checkpoint's hf_assets); "
                        "openai: the served model's tokenizer, to split log-likelihood prompts exactly as lm-eval "
                        "(default: split at the context's end by the server's text offsets)")
    p.add_argument("--benchmarks", default="medqa_4options,medmcqa,pubmedqa,mmlu_clinical",
                   help="comma-separated benchmark names or groups (mmlu_clinical)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with <benchmark>/ sub-folders (default: the built-in synthetic set)")
    p.add_argument("--strategies", default="zero_shot",
                   help=f"comma-separated; presets {', '.join(PRESETS)}; compose with '+'")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None,
                   help="lm-eval: each benchmark's built-in lm-eval 0.4.13 task (prompt, choices, few-shot "
                        "sampler); unified: clinmega's one layout; auto (default): lm-eval for log-likelihood "
                        "strategies with letter targets, unified for option_text and generation strategies")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--limit", type=int, default=None, help="first N items per benchmark")
    p.add_argument("--shots", type=int, default=None, help="override the number of few-shot exemplars")
    p.add_argument("--samples", type=int, default=None, help="override self-consistency paths")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=1234, help="exemplar/permutation/sampling/bootstrap seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None, help="hf backend: cpu or cuda (default: cuda when available)")
    p.add_argument("--medmcqa-cop-base", type=int, choices=(0, 1), default=None,
                   help="MedMCQA 'cop' base when a file cannot tell (0: HF export, 1: GitHub release)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the 95%% CI")
    p.add_argument("--no-resume", action="store_true",
                   help="recompute every benchmark/strategy even when OUT/parts/ holds a finished one")
    add_config_arguments(p, EvalKeys, EVAL_ALIASES)
    p.set_defaults(func=run)
    return p


def apply_keys(args: argparse.Namespace) -> None:
    """The keys (``--config``, aliases, ``key=value``) onto the attributes the backends read."""
    keys = config_from_args(args)
    args.tensor_parallel = keys.parallel.tensor_parallel
    args.expert_parallel = keys.parallel.expert_parallel
    args.expert_tensor_parallel = keys.parallel.expert_tensor_parallel
    args.pipeline_parallel = keys.parallel.pipeline_parallel
    args.virtual_pipeline_parallel = keys.parallel.virtual_pipeline_parallel
    args.dtype = keys.precision.dtype or default_dtype()
    args.served = keys.served


def build_backend(args: argparse.Namespace):
    import torch

    if args.backend == "openai":
        from clinmega.evaluation.backends.openai_compat import OpenAIBackend

        return OpenAIBackend.from_keys(args.served, args.tokenizer)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.backend == "hf":
        from clinmega.evaluation.backends.hf import HFBackend

        from clinmega.config.schema import HF_DTYPE_NAMES

        return HFBackend.from_pretrained(args.model_dir, dtype=HF_DTYPE_NAMES[args.dtype], device=device, batch_size=args.batch_size)
    from clinmega.evaluation.backends.megatron import MegatronBackend

    return MegatronBackend.from_checkpoint(args.model_dir, model_config=args.model_config, tokenizer=args.tokenizer,
                                           dtype=args.dtype, batch_size=args.batch_size,
                                           tensor_parallel=args.tensor_parallel, expert_parallel=args.expert_parallel,
                                           pipeline_parallel=args.pipeline_parallel,
                                           virtual_pipeline_parallel=args.virtual_pipeline_parallel,
                                           expert_tensor_parallel=args.expert_tensor_parallel)


def resolve_model(backend: str, model_dir: Path) -> tuple[str, Path]:
    """(backend, model folder): a megatron checkpoint path resolved to its newest complete checkpoint;
    ``auto`` picks megatron when ``model_dir`` holds a megatron-core checkpoint, else hf."""
    from clinmega.checkpoints import CheckpointError, resolve_checkpoint

    if backend == "openai":
        if model_dir is not None:
            raise ValueError(f"model_dir {model_dir} is not used with --backend openai (the server holds the model; "
                             "--tokenizer names a local tokenizer)")
        return backend, None
    if model_dir is None:
        raise ValueError("model_dir is required (except with --backend openai)")
    if backend == "hf":
        return backend, model_dir
    try:
        return "megatron", resolve_checkpoint(model_dir)
    except CheckpointError:
        if backend == "megatron":
            raise
        return "hf", model_dir


def strategies_from(args: argparse.Namespace) -> list[Strategy]:
    """Parsed ``--strategies``, with the command-line overrides applied where they mean something."""
    out = []
    for spec in filter(None, (s.strip() for s in args.strategies.split(","))):
        strategy = parse_strategy(spec)
        overrides = {"seed": args.seed}
        if args.shots is not None and strategy.shots:
            overrides["shots"] = args.shots
        if args.samples is not None and strategy.samples > 1:
            overrides["samples"] = args.samples
        if args.max_new_tokens is not None:
            overrides["max_new_tokens"] = args.max_new_tokens
        if args.temperature is not None:
            overrides["temperature"] = args.temperature
        if getattr(args, "prompt_format", None) is not None:
            overrides["prompt_format"] = args.prompt_format
        out.append(replace(strategy, **overrides))
    return out


class ProgressPrinter:
    """Prints backend progress at most every ``every`` seconds, and when a call completes."""

    def __init__(self, every: float = 15.0):
        self.every, self.last = every, time.monotonic()

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= self.every:
            self.last = now
            print(f"  {what}: {done}/{total}", flush=True)


def part_key(args: argparse.Namespace, strategy: Strategy, test, train) -> str:
    """Identity of one benchmark/strategy run: model (path and files' sizes/times), backend, precision,
    strategy and the exact items."""
    if args.backend == "openai":  # the server's model is known by its name only
        model, files = f"{args.served.model} at {args.served.endpoint} ({args.served.api})", []
    else:
        model = Path(args.model_dir).resolve()
        files = sorted((str(p.relative_to(model)), p.stat().st_size, p.stat().st_mtime_ns)
                       for p in model.rglob("*") if p.is_file()) if model.is_dir() else []
    ident = {"model": str(model), "files": files, "backend": args.backend, "dtype": args.dtype,
             "model_config": str(args.model_config), "tokenizer": str(args.tokenizer),
             "strategy": strategy.__dict__, "test": [repr(i) for i in test], "train": [repr(i) for i in train]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def default_dtype() -> str:
    import torch

    return "bf16" if torch.cuda.is_available() else "fp32"


def run(args: argparse.Namespace) -> int:
    from clinmega.evaluation.report import load_part, save_part, write_report  # torch: loaded by the verb, not by --help
    from clinmega.evaluation.scoring import run_strategy
    from clinmega.runtime import detect_world

    if args.model_dir is not None and OVERRIDE.match(str(args.model_dir)):  # the optional positional took a key=value
        args.overrides, args.model_dir = [str(args.model_dir), *args.overrides], None
    apply_keys(args)

    writer = detect_world().rank == 0  # multi-rank Megatron runs: every rank computes, rank 0 writes
    say = print if writer else (lambda *a, **k: None)
    # everything the user supplied is checked before a model loads (a bad benchmark file: one
    # BenchmarkFormatError listing every bad record; clinmega.cli reports it and exits 2)
    args.backend, args.model_dir = resolve_model(args.backend, args.model_dir)
    benchmarks = expand_benchmark_names([b.strip() for b in args.benchmarks.split(",") if b.strip()])
    strategies = strategies_from(args)
    data = {}
    for name in benchmarks:
        test = load_benchmark(name, args.data_dir, "test", cop_base=args.medmcqa_cop_base)[: args.limit]
        needs_train = any(s.shots for s in strategies)
        train = load_benchmark(name, args.data_dir, "train", cop_base=args.medmcqa_cop_base) if needs_train else []
        data[name] = (test, train)
    backend = None
    results, timings = [], {}
    for name, (test, train) in data.items():
        for strategy in strategies:
            part = args.out / "parts" / f"{name}.{_safe(strategy.name)}.json"
            key = part_key(args, strategy, test, train)
            cached = None if args.no_resume else load_part(part, key)
            if cached is None:
                if backend is None:
                    backend = build_backend(args)
                    if args.backend == "openai" and any(s.scoring == "loglikelihood" for s in strategies):
                        backend.check_loglikelihood()  # before hours of generation, not after
                    backend.progress = ProgressPrinter() if writer else None
                start = time.perf_counter()
                log = lambda m, name=name: say(f"[{name}] {m}", flush=True)  # noqa: E731
                cached = (run_strategy(backend, test, train, strategy, log=log), time.perf_counter() - start)
                if writer:
                    save_part(part, key, *cached)
            else:
                say(f"[{name}] {strategy.name}: reusing {part}", flush=True)
            results += cached[0]
            timings[f"{name}/{strategy.name}"] = round(cached[1], 3)
    if not writer:
        return 0
    model = f"{args.served.model} at {args.served.endpoint}" if args.backend == "openai" else str(args.model_dir)
    meta = {"model": model, "backend": args.backend, "data_dir": str(args.data_dir or "synthetic"),
            "benchmarks": benchmarks, "strategies": [{**s.__dict__, "format": s.format} for s in strategies],
            "seconds": timings}
    paths = write_report(args.out, results, meta, n_resamples=args.bootstrap, seed=args.seed)
    print(paths["markdown"].read_text(), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
