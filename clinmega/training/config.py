"""Configuration of a training run: ``TrainConfig`` (the optimisation), ``DataConfig`` (where the
batches come from), ``CheckpointConfig``, ``LoggingConfig`` and ``ExperimentConfig`` composing them
with the foundation sections. Load one with ``load_experiment(recipe.yaml, overrides)``.

Every ``__post_init__`` check raises :class:`ConfigError` naming the key path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from clinmega.config.errors import ConfigError
from clinmega.models.lora import LoRAConfig
from clinmega.config.schema import (
    ClusterConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    RuntimeConfig,
    _choice,
    _positive,
)

STAGES = ("cpt", "sft")
DECAY_STYLES = ("cosine", "linear", "constant")
NAN_POLICIES = ("stop", "skip")
PEFT_METHODS = ("lora",)  # train.peft; None = full fine-tuning
RECOMPUTE_GRANULARITY = ("selective", "full")
RECOMPUTE_METHODS = ("uniform", "block")
DATA_KINDS = ("synthetic", "indexed", "sft")


@dataclass
class DataConfig:
    """Where samples come from; every kind yields ``tokens, labels, loss_mask, position_ids`` per
    sample (and ``cu_seqlens`` when packed), see :mod:`clinmega.training.data`.

    * ``synthetic`` – deterministic learnable token patterns (tests, demo); ``synthetic_packed``
      makes SFT-like packed bins with prompt/answer loss masks and padding.
    * ``indexed`` – megatron indexed datasets (``.bin/.idx`` prefixes) blended by megatron-core's
      ``BlendedMegatronDatasetBuilder`` (CPT); ``weights`` optional, one per prefix.
    * ``sft`` – a ``prepare sft`` output directory (``clinmega.data.sft_dataset.SFTDataset``).
    """

    kind: str = "synthetic"
    seed: int = 1234
    shuffle: bool = True                 # per-epoch shuffle of map-style sources (sft)
    synthetic_samples: int = 65536
    synthetic_vocab: int = 256           # pattern tokens are drawn from [0, synthetic_vocab)
    synthetic_packed: bool = False
    prefixes: list[str] = field(default_factory=list)
    weights: Optional[list[float]] = None
    split: str = "98,2,0"
    cache_dir: Optional[str] = None
    sft_path: Optional[str] = None
    sft_valid_path: Optional[str] = None

    def __post_init__(self):
        _choice("data", "kind", self.kind, DATA_KINDS)
        _positive("data", "synthetic_samples", self.synthetic_samples)
        _positive("data", "synthetic_vocab", self.synthetic_vocab)
        if self.kind == "indexed":
            if not self.prefixes:
                raise ConfigError("data.prefixes: kind 'indexed' needs at least one .bin/.idx prefix")
            if self.weights is not None and len(self.weights) != len(self.prefixes):
                raise ConfigError(f"data.weights: {len(self.weights)} weights for "
                                  f"{len(self.prefixes)} prefixes")
        if self.kind == "sft" and not self.sft_path:
            raise ConfigError("data.sft_path: kind 'sft' needs a prepare-sft output directory")


@dataclass
class TrainConfig:
    """The optimisation: batch geometry, AdamW, LR schedule, recompute, NEFTune, NaN policy."""

    stage: str = "cpt"
    steps: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 1
    seq_length: int = 4096
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_steps: int = 0
    decay_style: str = "cosine"
    decay_steps: Optional[int] = None      # None = steps (minus nothing: warmup is inside it)
    rewarm: bool = False                   # CPT: restart warmup/decay from a loaded checkpoint's step
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    # Overlap the DP gradient reduce-scatter with backward / the parameter all-gather with the
    # next forward (megatron DDP buckets). None: on when CUDA is present and the distributed
    # optimizer is used (param gather needs it), off on CPU.
    overlap_grad_reduce: Optional[bool] = None
    overlap_param_gather: Optional[bool] = None
    recompute_granularity: Optional[str] = None   # None | selective | full
    recompute_method: Optional[str] = None        # full only: uniform | block
    recompute_num_layers: Optional[int] = None
    save_interval: int = 0                 # 0: save only at the end
    eval_interval: int = 0                 # 0: no evaluation
    eval_iters: int = 1
    log_interval: int = 1
    neftune_alpha: Optional[float] = None  # None: off; 5 is the paper's usual value
    nan_policy: str = "stop"
    peft: Optional[str] = None             # None: full fine-tuning; "lora": adapters (section lora.*)
    # MCQ log-likelihood accuracy of the live model every eval_benchmark_interval steps (and at the
    # end), logged as eval/<benchmark>/acc (clinmega.training.benchmark_eval); [] = off.
    eval_benchmarks: list[str] = field(default_factory=list)  # names or groups of clinmega eval
    eval_benchmark_limit: Optional[int] = 100     # first N items per benchmark; None = all
    eval_benchmark_strategy: str = "zero_shot"    # a log-likelihood strategy of clinmega eval
    eval_benchmark_interval: int = 0              # steps; must be >= 1 with eval_benchmarks
    eval_benchmark_data_dir: Optional[str] = None  # <benchmark>/ folders; None = the shipped synthetic set
    eval_benchmark_tokenizer: Optional[str] = None  # None = the loaded/resumed checkpoint's hf_assets

    def __post_init__(self):
        _choice("train", "stage", self.stage, STAGES)
        if self.peft is not None:
            _choice("train", "peft", self.peft, PEFT_METHODS)
        _choice("train", "decay_style", self.decay_style, DECAY_STYLES)
        _choice("train", "nan_policy", self.nan_policy, NAN_POLICIES)
        for key in ("steps", "global_batch_size", "micro_batch_size", "seq_length", "log_interval",
                    "eval_iters", "decay_steps", "recompute_num_layers"):
            _positive("train", key, getattr(self, key))
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size: {self.global_batch_size} is not a multiple "
                              f"of train.micro_batch_size={self.micro_batch_size}")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr: {self.min_lr} > train.lr={self.lr}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.lr_decay_steps:
            raise ConfigError(f"train.warmup_steps: {self.warmup_steps} must be in "
                              f"[0, decay steps={self.lr_decay_steps})")
        if self.neftune_alpha is not None and self.neftune_alpha < 0:
            raise ConfigError(f"train.neftune_alpha: must be >= 0, got {self.neftune_alpha}")
        if self.recompute_granularity is not None:
            _choice("train", "recompute_granularity", self.recompute_granularity,
                    RECOMPUTE_GRANULARITY)
        if self.recompute_granularity == "full":
            _choice("train", "recompute_method", self.recompute_method, RECOMPUTE_METHODS)
        elif self.recompute_method is not None:
            raise ConfigError("train.recompute_method: only used with recompute_granularity 'full'")
        for key in ("save_interval", "eval_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0")
        self._check_eval_benchmarks()

    def _check_eval_benchmarks(self) -> None:
        from clinmega.evaluation.benchmarks import expand_benchmark_names
        from clinmega.evaluation.strategies import parse_strategy

        try:
            expand_benchmark_names(list(self.eval_benchmarks))
        except ValueError as err:
            raise ConfigError(f"train.eval_benchmarks: {err}") from None
        try:
            strategy = parse_strategy(self.eval_benchmark_strategy)
        except ValueError as err:
            raise ConfigError(f"train.eval_benchmark_strategy: {err}") from None
        if strategy.scoring != "loglikelihood":
            raise ConfigError(f"train.eval_benchmark_strategy: {self.eval_benchmark_strategy!r} generates "
                              "text; accuracy during training scores log-likelihoods (e.g. zero_shot, "
                              "few_shot, choice_shuffle)")
        _positive("train", "eval_benchmark_limit", self.eval_benchmark_limit)
        if self.eval_benchmark_interval < 0:
            raise ConfigError("train.eval_benchmark_interval: must be >= 0")
        if self.eval_benchmarks and not self.eval_benchmark_interval:
            raise ConfigError("train.eval_benchmark_interval: set it (steps between evaluations, >= 1) "
                              "to score train.eval_benchmarks")

    @property
    def lr_decay_steps(self) -> int:
        return self.decay_steps or self.steps

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_rank, rest = divmod(self.global_batch_size, data_parallel_size * self.micro_batch_size)
        if rest or not per_rank:
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of "
                f"micro_batch_size*data_parallel = {self.micro_batch_size}*{data_parallel_size}")
        return per_rank

    def transformer_overrides(self) -> dict:
        """TransformerConfig fields this training config decides."""
        out = dict(calculate_per_token_loss=True)
        if self.recompute_granularity:
            out.update(recompute_granularity=self.recompute_granularity,
                       recompute_method=self.recompute_method,
                       recompute_num_layers=self.recompute_num_layers
                       if self.recompute_granularity == "full" else None)
            if self.recompute_granularity == "full" and self.recompute_num_layers is None:
                out["recompute_num_layers"] = 1
        return out


@dataclass
class CheckpointConfig:
    """Where and how checkpoints are written; resume is automatic from ``<dir>/latest``.

    ``load_weights`` is a run directory, a checkpoint root or one checkpoint folder (an import-hf
    output, an ``iter_*``): the newest complete checkpoint there gives the starting weights and,
    when the recipe sets no ``model.preset``, the model. A model that differs from the checkpoint's
    recorded one in a function-changing field is refused unless the field is listed in
    ``allow_config_change`` (e.g. ``[rope_theta]`` to extend the context); allowed changes are
    recorded in the new checkpoints' provenance.
    """

    dir: Optional[str] = None           # None: <run_dir>/checkpoints
    load_weights: Optional[str] = None  # run dir / checkpoint root / checkpoint folder: weights only
    keep_last: int = 2                  # 0: keep every checkpoint
    async_save: bool = False
    resume: bool = True
    allow_config_change: list[str] = field(default_factory=list)  # model fields allowed to differ

    def __post_init__(self):
        if self.keep_last < 0:
            raise ConfigError(f"checkpoint.keep_last: must be >= 0, got {self.keep_last}")


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True               # rich progress bar (rank 0, when attached to a terminal)
    peak_tflops: Optional[float] = None  # per GPU; None: from the device name (H100/H200/A100)


@dataclass
class ExperimentConfig:
    """Everything one ``clinmega train`` run needs."""

    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)  # used when train.peft == "lora"
    cluster: Optional[ClusterConfig] = None  # what the recipe is sized for (`clinmega plan` checks)

    def __post_init__(self):
        if self.parallel.context_parallel > 1:
            raise ConfigError("parallel.context_parallel: the training loop does not split batches "
                              "for context parallelism yet; set it to 1")
        if self.precision.fp8_param_gather and not (self.precision.fp8
                                                    and self.train.use_distributed_optimizer):
            raise ConfigError("precision.fp8_param_gather: keeps the weights in FP8 and all-gathers "
                              "them in FP8, which needs precision.fp8 set and "
                              "train.use_distributed_optimizer=true (its fp32 main weights are what "
                              "the optimizer updates)")
        if self.train.overlap_param_gather and not self.train.use_distributed_optimizer:
            raise ConfigError("train.overlap_param_gather: needs train.use_distributed_optimizer=true")
        if self.train.seq_length > self.model.max_position_embeddings:
            raise ConfigError(f"train.seq_length: {self.train.seq_length} > "
                              f"model.max_position_embeddings={self.model.max_position_embeddings}")
        if self.parallel.sequence_parallel and self.train.seq_length % self.parallel.tensor_parallel:
            raise ConfigError(f"train.seq_length: {self.train.seq_length} is not divisible by "
                              f"parallel.tensor_parallel={self.parallel.tensor_parallel} "
                              "(sequence parallel)")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run_dir) / "checkpoints"


def load_experiment(sources: Iterable = (), overrides: Iterable[str] = ()) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from recipe files/mappings and ``key.path=value`` overrides.

    Without a ``model.preset`` the model starts from the one recorded in the checkpoint the run
    resumes from or loads (``checkpoint.load_weights``); the user's ``model.*`` keys apply on top.
    """
    from clinmega.config.loader import load_config  # OmegaConf: loaded by the verb, not by --help
    from clinmega.training.lineage import recorded_model_layer

    sources, overrides = list(sources), list(overrides)
    return load_config(ExperimentConfig, sources, overrides,
                       base=recorded_model_layer(sources, overrides))
