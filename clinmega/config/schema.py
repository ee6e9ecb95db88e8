"""Typed configuration for the foundation: model, parallel layout, precision, runtime.

Every section is a dataclass; ``clinmega.config.loader`` turns YAML files and dotlist overrides
into instances of them (OmegaConf structured configs), and ``__post_init__`` validates values that
the type alone cannot (choices, divisibility), naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from clinmega.config.errors import ConfigError

ARCHS = ("mistral", "mixtral")
DTYPES = ("fp32", "bf16", "fp16")  # the one spelling of a dtype on every command line and recipe
# The same dtypes as Hugging Face / torch name them (config.json's torch_dtype); accepted on input
# for compatibility and mapped to the names above. torch objects: clinmega.models.builder.DTYPES;
# safetensors header codes: clinmega.conversion.hf_io.SAFETENSORS_DTYPES.
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(text: str) -> str:
    """'bf16' or 'bfloat16' -> 'bf16' (the canonical spelling); a ConfigError names the choices."""
    name = {v: k for k, v in HF_DTYPE_NAMES.items()}.get(text, text)
    if name not in DTYPES:
        raise ConfigError(f"dtype {text!r} is not one of {list(DTYPES)}")
    return name
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8")
BACKENDS = ("auto", "nccl", "gloo")
TRANSFORMER_IMPLS = ("auto", "transformer_engine", "local")
DISPATCHERS = ("alltoall", "allgather")


def _choice(section: str, key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{section}.{key}: {value!r} is not one of {list(choices)}")


def _positive(section: str, key: str, value) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{section}.{key}: must be >= 1, got {value}")


@dataclass
class ModelConfig:
    """Architecture of a Mistral-family decoder (dense Mistral or sparse Mixtral).

    Field names follow megatron-core's TransformerConfig where one exists; ``clinmega.models.hf``
    maps them to and from Hugging Face ``config.json`` keys.
    """

    name: str = "custom"
    arch: str = "mistral"
    vocab_size: int = 32000
    hidden_size: int = 4096
    ffn_hidden_size: int = 14336
    num_layers: int = 32
    num_attention_heads: int = 32
    num_query_groups: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    sliding_window: Optional[int] = None
    norm_eps: float = 1e-5
    init_method_std: float = 0.02
    num_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 0.02
    # The embedding and output layer get padded_vocab_size(tp) rows (Megatron-LM's rule); the
    # padded ids are masked out of every softmax (clinmega.models.vocab). vocab_size stays the
    # real vocabulary: what the tokenizer produces and what export writes.
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        _choice("model", "arch", self.arch, ARCHS)
        for key in ("vocab_size", "make_vocab_size_divisible_by", "hidden_size", "ffn_hidden_size", "num_layers",
                    "num_attention_heads", "num_query_groups", "head_dim",
                    "max_position_embeddings", "sliding_window", "moe_router_topk"):
            _positive("model", key, getattr(self, key))
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_query_groups: {self.num_query_groups} does not divide "
                f"model.num_attention_heads={self.num_attention_heads}")
        if self.arch == "mixtral":
            if not self.num_experts or self.num_experts < 2:
                raise ConfigError("model.num_experts: a mixtral model needs num_experts >= 2")
            if self.moe_router_topk > self.num_experts:
                raise ConfigError(
                    f"model.moe_router_topk: {self.moe_router_topk} > num_experts={self.num_experts}")
        elif self.num_experts is not None:
            raise ConfigError("model.num_experts: only arch 'mixtral' has experts; set it to null")

    @property
    def is_moe(self) -> bool:
        return self.arch == "mixtral"

    def padded_vocab_size(self, tensor_parallel: int = 1) -> int:
        """Rows of the embedding and output layer at this tensor-parallel size: ``vocab_size``
        rounded up to a multiple of ``make_vocab_size_divisible_by * tensor_parallel``, the
        arithmetic of Megatron-LM's ``_vocab_size_with_padding`` (megatron-core's
        ``tokenizers.utils.build_tokenizer.vocab_size_with_padding``)."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple


@dataclass
class ParallelConfig:
    """Parallel layout; the data-parallel size is whatever the world size leaves."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: Optional[int] = None
    context_parallel: int = 1
    expert_parallel: int = 1
    expert_tensor_parallel: Optional[int] = None  # None = same as tensor_parallel (megatron default)
    sequence_parallel: bool = False
    moe_token_dispatcher: str = "alltoall"

    def __post_init__(self):
        for key in ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel",
                    "context_parallel", "expert_parallel", "expert_tensor_parallel"):
            _positive("parallel", key, getattr(self, key))
        _choice("parallel", "moe_token_dispatcher", self.moe_token_dispatcher, DISPATCHERS)
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("parallel.sequence_parallel: needs parallel.tensor_parallel > 1")
        if self.virtual_pipeline_parallel is not None and self.pipeline_parallel == 1:
            raise ConfigError("parallel.virtual_pipeline_parallel: needs parallel.pipeline_parallel > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def megatron_sizes(self) -> dict:
        """The sizes under the keyword names that megatron-core's ``initialize_model_parallel``
        and ``TransformerConfig`` both take."""
        return dict(
            tensor_model_parallel_size=self.tensor_parallel,
            pipeline_model_parallel_size=self.pipeline_parallel,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_parallel,
            context_parallel_size=self.context_parallel,
            expert_model_parallel_size=self.expert_parallel,
            expert_tensor_parallel_size=self.expert_tensor_parallel,
        )

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise ConfigError(
                f"parallel: world size {world_size} is not divisible by TP*PP*CP = "
                f"{self.tensor_parallel}*{self.pipeline_parallel}*{self.context_parallel}")
        return world_size // self.model_parallel_size


@dataclass
class PrecisionConfig:
    """Parameter/compute dtype and FP8 (Transformer Engine only)."""

    dtype: str = "bf16"
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_param_gather: bool = False

    def __post_init__(self):
        _choice("precision", "dtype", self.dtype, DTYPES)
        if self.fp8 is not None:
            _choice("precision", "fp8", self.fp8, FP8_FORMATS)
        _choice("precision", "fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        _choice("precision", "fp8_amax_compute_algo", self.fp8_amax_compute_algo, ("max", "most_recent"))
        _positive("precision", "fp8_amax_history_len", self.fp8_amax_history_len)


@dataclass
class AutoPrecision:
    """``precision.dtype`` of a verb that picks it when unset (conversion: the source's; eval: bf16 on
    CUDA, fp32 on CPU)."""

    dtype: Optional[str] = None

    def __post_init__(self):
        if self.dtype is not None:
            _choice("precision", "dtype", self.dtype, DTYPES)


@dataclass
class RuntimeConfig:
    """Process-group backend, device, layer implementation and seed."""

    backend: str = "auto"            # auto: nccl when CUDA is available, else gloo
    transformer_impl: str = "auto"   # auto: Transformer Engine when it imports, else megatron-core local
    seed: int = 1234
    distributed_timeout_minutes: int = 30

    def __post_init__(self):
        _choice("runtime", "backend", self.backend, BACKENDS)
        _choice("runtime", "transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)


@dataclass
class ClusterConfig:
    """The machines a recipe is written for (the planner checks the layout fits them)."""

    num_gpus: int = 8
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0
    peak_tflops_bf16: float = 989.0   # H100 SXM dense
    overhead_gb: float = 4.0

    def __post_init__(self):
        _positive("cluster", "num_gpus", self.num_gpus)
        _positive("cluster", "gpus_per_node", self.gpus_per_node)
        if self.gpu_memory_gb <= 0:
            raise ConfigError(f"cluster.gpu_memory_gb: must be positive, got {self.gpu_memory_gb}")


@dataclass
class FoundationConfig:
    """The sections every stage shares; stage configs embed these fields."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
