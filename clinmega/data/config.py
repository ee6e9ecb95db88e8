"""Option dataclasses of the data stages, importable without torch/megatron so that recipes and the
CLI can embed them cheaply. Each stage module re-exports its own (``from clinmega.data.pretrain import
PretrainPrepConfig`` works too)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_EVAL_FIELDS = ["question", "options", "choices", "context", "contexts", "opa", "opb", "opc", "opd"]
TEMPLATES = ("auto", "mistral-v1", "mistral-v3", "chat-template")
TRUNCATION = ("truncate", "drop")


@dataclass
class PretrainPrepConfig:
    """Options of ``prepare pretrain`` (embeddable in a recipe)."""

    inputs: list[str] = field(default_factory=list)  # paths or globs
    output_prefix: str = ""  # writes <prefix>.bin/.idx/.manifest.json
    tokenizer: str = "mistral-v1"  # mistral-v1 | mistral-v3 | SentencePiece file | HF tokenizer dir
    tokenizer_backend: str = "auto"  # auto | gigatoken | sentencepiece (SentencePiece models only)
    text_field: str = "text"  # dotted keys allowed (meta.text)
    add_bos: bool = True
    max_tokens: int | None = None  # skip (reason too_long) documents with more ids than this (BOS/EOD excluded)
    workers: int = 2
    chunk_mb: float = 64.0  # input bytes per worker task (MiB)
    batch_docs: int = 1024
    shard: str | None = None  # "i/N": prepare only shard i of N (0-based); writes <prefix>-0000i-of-0000N.*
    strict: bool = False  # damaged input files: still written up to each break, but the run fails (exit 2)
    overwrite: bool = False
    progress: bool = True


@dataclass
class MergeConfig:
    """Options of ``prepare merge`` (shards of ``prepare pretrain --shard i/N`` -> one dataset)."""

    output_prefix: str = ""  # the prefix the shards were made with; writes <prefix>.bin/.idx/.manifest.json
    inputs: list[str] = field(default_factory=list)  # shard prefixes or globs (default: <output_prefix>-*-of-*)
    overwrite: bool = False


@dataclass
class SFTPrepConfig:
    """Options of ``prepare sft`` (embeddable in a recipe)."""

    inputs: list[str] = field(default_factory=list)
    output_dir: str = ""  # a directory: tokens/loss_mask indexed datasets, packing.npz, manifest.json
    tokenizer: str = "mistral-v1"  # mistral-v1 | mistral-v3 | SentencePiece file | HF tokenizer dir
    tokenizer_backend: str = "auto"  # auto | gigatoken | sentencepiece (SentencePiece models only)
    template: str = "auto"  # auto | mistral-v1 | mistral-v3 | chat-template
    messages_field: str = "messages"
    conversations_field: str = "conversations"  # ShareGPT layout: [{"from": "human"|"gpt"|"system", "value"}]
    input_field: str = "input"
    output_field: str = "output"
    instruction_field: str = "instruction"
    system_field: str = "system"
    seq_length: int = 4096  # bin size; a sample may hold seq_length + 1 tokens (inputs + shifted targets)
    truncation: str = "truncate"  # truncate (cut the end) | drop (skip as too_long)
    pack: bool = True  # first-fit-decreasing packing; False: one sample per bin
    workers: int = 2
    chunk_mb: float = 64.0  # input bytes per worker task (MiB)
    strict: bool = False  # damaged input files: still written up to each break, but the run fails (exit 2)
    overwrite: bool = False
    progress: bool = True


@dataclass
class BlendSource:
    """One prepared dataset (``prepare pretrain`` output prefix) in a blend."""

    name: str
    prefix: str
    weight: float | None = None
    tokens: int | None = None  # train-token budget


@dataclass
class BlendConfig:
    """Options of a blend (embeddable in a recipe)."""

    sources: list[BlendSource] = field(default_factory=list)
    seq_length: int = 4096
    seed: int = 1234
    split: str = "98,1,1"  # train,valid,test shares of every source's documents
    train_samples: int | None = None  # default with token budgets: sum(tokens) / seq_length
    valid_samples: int = 0
    test_samples: int = 0
    cache_dir: str | None = None  # where megatron-core caches sample indices (None: <prefix>/cache/)


@dataclass
class DecontamConfig:
    """Options of ``decontaminate`` (embeddable in a recipe)."""

    inputs: list[str] = field(default_factory=list)  # training JSONL, plain or .gz/.zst/.xz (paths or globs)
    eval_sets: list[str] = field(default_factory=list)  # evaluation JSONL (paths or globs)
    output_dir: str = ""
    text_field: str = "text"
    eval_fields: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_FIELDS))  # case-insensitive keys
    ngram: int = 13  # words per n-gram
    min_matches: int = 1  # distinct shared n-grams that flag a document
    mode: str = "remove"  # "remove" | "report"
    workers: int = 2
    chunk_mb: float = 64.0  # input bytes per worker task (MiB)
    index_cache: str | None = None  # folder keeping evaluation indexes for later runs and shards (content-keyed)
    shard: str | None = None  # "i/N": scan only shard i of N (0-based); writes <output_dir>-0000i-of-0000N/
    strict: bool = False  # damaged input files: still written up to each break, but the run fails (exit 2)
    overwrite: bool = False
    progress: bool = True
