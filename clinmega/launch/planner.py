"""Parallel-layout planner: per-GPU memory and step-time estimates for candidate TP/PP/VPP/EP/CP/DP
layouts of a model on a cluster, ranked among those that fit.

Memory per GPU (bytes), for the busiest pipeline stage (the first: it holds the embedding and,
under 1F1B, the most microbatches in flight):

* weights: dense params / (TP*PP) + expert params / (EP*ETP*PP), times the param dtype size,
* gradients: the same count times 4 (fp32 main grads) or 2,
* optimizer (Adam): fp32 master weights + two moments = 12 bytes/param, divided by the data-parallel
  size (dense) or expert-data-parallel size (experts) with the distributed optimizer,
* activations per layer and microbatch (bf16, flash attention so no s^2 term; Korthikanti et al.
  2022 adapted to GQA and SwiGLU): s*b*(5h + 2*ng*d + 3f*k + 2hk)*2 bytes / (TP*CP) with sequence
  parallelism, k = top-k for MoE (1 for dense, where the 2hk permutation term is 0); times the
  layers per stage times the microbatches in flight on stage 0 (PP for 1F1B, times
  1 + (PP-1)/(PP*VPP) when interleaved); selective recompute drops the MLP activation-function
  output (f*k), full recompute keeps only each layer's input (2*s*b*h/(TP*CP) bytes),
* logits on the last stage: s*b*V/TP fp32 values and their gradient,
* a fixed overhead (CUDA context, NCCL buffers, allocator fragmentation).

With LoRA (``PlanConfig.lora``, ``train.peft: lora``) the base weights are frozen: weights are the
base's plus the adapters' (bf16), and gradients and optimizer state are the adapters' only
(:func:`lora_parameters`: ``rank*(out+in)`` per adapted linear, ``lora.adapter_parameter_count``,
split under TP like the base linear: column-parallel ``B`` and row-parallel ``A`` are sharded, the
other factor replicated); activations are unchanged (the base linears still keep their inputs, for
the adapters' gradients; the rank-r intermediates are negligible).

Step time = training FLOPs / (GPUs * peak * efficiency), with the pipeline bubble
(PP-1)/(VPP*microbatches) and small TP/EP communication penalties (for LoRA the full-training
figure, an upper bound: frozen weights skip their weight-gradient GEMMs). These are planning
estimates, not measurements: compare layouts with them, then measure the chosen one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Optional

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ClusterConfig, ModelConfig, ParallelConfig
from clinmega.models.layout import check_layout
from clinmega.models.flops import training_flops_per_token
from clinmega.models.lora import COLUMN_PARALLEL, LoRAConfig, adapter_parameter_count

GIB = 1024**3
RECOMPUTE = ("none", "selective", "full")


@dataclass
class PlanConfig:
    seq_length: int = 4096
    global_batch: int = 256
    micro_batch: int = 1
    recompute: str = "selective"
    fp8: bool = False
    distributed_optimizer: bool = True
    grad_reduce_in_fp32: bool = True
    # Fraction of the bf16 peak reached (MFU), and FP8's speed-up over bf16; calibrated on the
    # published NVIDIA H100 figures (REFERENCE.md §6): Mixtral 8x7B bf16 468 TFLOPS (0.47),
    # Llama2-7B FP8 780 TFLOPS (0.79 of the bf16 peak, i.e. 1.6x).
    efficiency: float = 0.5
    fp8_speedup: float = 1.6
    lora: Optional[LoRAConfig] = None  # LoRA adapters on a frozen base; None: full training

    def __post_init__(self):
        if self.recompute not in RECOMPUTE:
            raise ConfigError(f"plan.recompute: {self.recompute!r} is not one of {list(RECOMPUTE)}")


@dataclass
class Estimate:
    parallel: ParallelConfig
    data_parallel: int
    num_microbatches: int
    memory_gb: dict = field(default_factory=dict)
    step_seconds: float = 0.0
    tokens_per_second_per_gpu: float = 0.0

    @property
    def total_gb(self) -> float:
        return sum(self.memory_gb.values())

    def layout(self) -> str:
        p = self.parallel
        parts = [f"TP{p.tensor_parallel}", f"PP{p.pipeline_parallel}"]
        if p.virtual_pipeline_parallel:
            parts.append(f"VP{p.virtual_pipeline_parallel}")
        if p.context_parallel > 1:
            parts.append(f"CP{p.context_parallel}")
        if p.expert_parallel > 1:
            parts.append(f"EP{p.expert_parallel}")
        parts.append(f"DP{self.data_parallel}")
        return " ".join(parts)


def split_parameters(cfg: ModelConfig) -> tuple[int, int, int]:
    """(embedding+output, other dense, expert) parameter counts."""
    h = cfg.hidden_size
    embeddings = 2 * cfg.vocab_size * h
    experts = (cfg.num_experts or 0) * 3 * h * cfg.ffn_hidden_size * cfg.num_layers
    attention = h * cfg.head_dim * (2 * cfg.num_attention_heads + 2 * cfg.num_query_groups)
    dense_mlp = 0 if cfg.is_moe else 3 * h * cfg.ffn_hidden_size
    router = h * cfg.num_experts if cfg.is_moe else 0
    other = cfg.num_layers * (attention + dense_mlp + router + 2 * h) + h
    return embeddings, other, experts


def local_parameters(cfg: ModelConfig, parallel: ParallelConfig) -> tuple[float, float]:
    """(dense, expert) parameters held by a GPU of the first pipeline stage.

    Stage 0 holds the input embedding; the output layer lives on the last stage, which is the
    same stage only without pipelining.
    """
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    etp = parallel.expert_tensor_parallel or tp
    embeddings, other, experts = split_parameters(cfg)
    dense = ((embeddings if pp == 1 else embeddings / 2) + other / pp) / tp
    return dense, experts / (pp * parallel.expert_parallel * etp)


def adapted_linears(cfg: ModelConfig, lora: LoRAConfig) -> tuple[list, list]:
    """One layer's adapted linears ``[(target, out, in)]``: (dense ones, one expert's)."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    shapes = {"linear_qkv": (q + 2 * kv, h), "linear_proj": (h, q),
              "linear_fc1": (2 * f, h), "linear_fc2": (h, f)}
    adapted = [(t, *shapes[t]) for t in lora.targets]
    mlp = [a for a in adapted if a[0] in ("linear_fc1", "linear_fc2")]
    attention = [a for a in adapted if a not in mlp]
    return (attention, mlp) if cfg.is_moe else (adapted, [])


def lora_parameters(cfg: ModelConfig, lora: LoRAConfig,
                    parallel: ParallelConfig | None = None) -> tuple[float, float]:
    """(dense, expert) adapter parameters held by a GPU of the first pipeline stage (the whole
    model's with the default layout). Column-parallel linears shard ``B`` (``out``) over TP,
    row-parallel ones ``A`` (``in``); experts use the expert TP size and split over EP."""
    parallel = parallel or ParallelConfig()
    tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
    etp = parallel.expert_tensor_parallel or tp

    def local(linears, split):
        return sum(adapter_parameter_count(
            [(out / split, inp) if t in COLUMN_PARALLEL else (out, inp / split)], lora.rank)
            for t, out, inp in linears)

    dense, expert = adapted_linears(cfg, lora)
    layers = cfg.num_layers / pp
    experts = (cfg.num_experts or 0) / parallel.expert_parallel
    return layers * local(dense, tp), layers * experts * local(expert, etp)


def estimate(cfg: ModelConfig, parallel: ParallelConfig, plan: PlanConfig,
             cluster: ClusterConfig) -> Estimate:
    tp, pp, cp, ep = (parallel.tensor_parallel, parallel.pipeline_parallel,
                      parallel.context_parallel, parallel.expert_parallel)
    vpp = parallel.virtual_pipeline_parallel or 1
    etp = parallel.expert_tensor_parallel or tp
    dp = parallel.data_parallel_size(cluster.num_gpus)
    expert_dp = cluster.num_gpus // (ep * etp * pp)
    if plan.global_batch % (plan.micro_batch * dp):
        raise ConfigError(f"plan.global_batch: {plan.global_batch} is not divisible by "
                          f"micro_batch*DP = {plan.micro_batch}*{dp}")
    microbatches = plan.global_batch // (plan.micro_batch * dp)

    dense_local, expert_local = local_parameters(cfg, parallel)
    weights_local = dense_local + expert_local
    if plan.lora is not None:  # frozen base: only the adapters have grads and optimizer state
        dense_local, expert_local = lora_parameters(cfg, plan.lora, parallel)
        weights_local += dense_local + expert_local
    trained_local = dense_local + expert_local
    # bf16 weights also under FP8: TE keeps bf16 parameters and casts per GEMM (fp8_param off).
    mem = {"weights": weights_local * 2 / GIB,
           "grads": trained_local * (4 if plan.grad_reduce_in_fp32 else 2) / GIB}
    shard = (lambda n, d: n / d) if plan.distributed_optimizer else (lambda n, d: n)
    mem["optimizer"] = (shard(dense_local, dp) + shard(expert_local, expert_dp)) * 12 / GIB

    s, b, h = plan.seq_length / cp, plan.micro_batch, cfg.hidden_size
    k = cfg.moe_router_topk if cfg.is_moe else 1
    f = cfg.ffn_hidden_size
    per_layer = s * b * (5 * h + 2 * cfg.num_query_groups * cfg.head_dim + 3 * f * k
                         + (2 * h * k if cfg.is_moe else 0)) * 2 / tp
    if plan.recompute == "selective":
        per_layer -= s * b * f * k * 2 / tp
    elif plan.recompute == "full":
        per_layer = s * b * h * 2 / tp
    layers_per_stage = cfg.num_layers / pp
    in_flight = min(pp, microbatches) * (1 + (pp - 1) / (pp * vpp) if vpp > 1 else 1)
    mem["activations"] = per_layer * layers_per_stage * in_flight / GIB
    logits = plan.seq_length / cp * b * cfg.vocab_size / tp * 4 * 2
    mem["logits"] = logits / GIB if pp == 1 else 0.0  # stage 0 is not the last stage when PP > 1
    mem["overhead"] = cluster.overhead_gb

    tokens = plan.global_batch * plan.seq_length
    flops = training_flops_per_token(cfg, plan.seq_length, plan.recompute == "full") * tokens
    peak = cluster.peak_tflops_bf16 * 1e12 * (plan.fp8_speedup if plan.fp8 else 1.0)
    bubble = (pp - 1) / (vpp * microbatches)
    comm = (1 + 0.04 * (tp - 1)) * (1 + 0.03 * (ep - 1)) * (1 + 0.02 * (cp - 1))
    seconds = flops / (cluster.num_gpus * peak * plan.efficiency) * (1 + bubble) * comm
    return Estimate(parallel, dp, microbatches, mem, seconds,
                    tokens / seconds / cluster.num_gpus)


def candidates(cfg: ModelConfig, cluster: ClusterConfig, plan: PlanConfig):
    """Every layout the model, the cluster and clinmega's training loop admit (TP within a node,
    powers of two, no context parallelism)."""
    powers = [1, 2, 4, 8, 16, 32, 64]
    # Context parallelism is estimated by `estimate` but not proposed: it needs TE attention and
    # clinmega's training loop does not split batches for it yet.
    for tp, pp, cp, ep in itertools.product(powers, powers, [1], powers):
        if tp > cluster.gpus_per_node or cluster.num_gpus % (tp * pp * cp):
            continue
        if ep > 1 and not cfg.is_moe:
            continue
        if cfg.is_moe and (cluster.num_gpus % (ep * pp)):
            continue
        for vpp in ([None] if pp == 1 else [None, 2, 4, 8]):
            parallel = ParallelConfig(
                tensor_parallel=tp, pipeline_parallel=pp, virtual_pipeline_parallel=vpp,
                context_parallel=cp, expert_parallel=ep,
                expert_tensor_parallel=1 if cfg.is_moe else None,
                sequence_parallel=tp > 1)
            try:
                check_layout(cfg, parallel)
                yield estimate(cfg, parallel, plan, cluster)
            except ConfigError:
                continue


def rank_layouts(cfg: ModelConfig, cluster: ClusterConfig, plan: PlanConfig,
                 top: int = 10) -> tuple[list[Estimate], int]:
    """The fastest ``top`` layouts that fit in GPU memory, and how many candidates were tried."""
    all_layouts = list(candidates(cfg, cluster, plan))
    fitting = [e for e in all_layouts if e.total_gb <= cluster.gpu_memory_gb]
    fitting.sort(key=lambda e: (e.step_seconds, e.total_gb))
    return fitting[:top], len(all_layouts)


# --- a training recipe's plan, full fine-tuning vs LoRA -----------------------------------------
def plan_of(experiment) -> PlanConfig:
    """The PlanConfig of a training ``ExperimentConfig`` (LoRA when ``train.peft: lora``)."""
    t = experiment.train
    return PlanConfig(seq_length=t.seq_length, global_batch=t.global_batch_size,
                      micro_batch=t.micro_batch_size, recompute=t.recompute_granularity or "none",
                      fp8=experiment.precision.fp8 is not None,
                      distributed_optimizer=t.use_distributed_optimizer,
                      lora=experiment.lora if t.peft == "lora" else None)


def lora_vs_full(cfg: ModelConfig, parallel: ParallelConfig, plan: PlanConfig,
                 cluster: ClusterConfig, lora: LoRAConfig) -> tuple[Estimate, Estimate]:
    """(full fine-tuning, LoRA) estimates of one layout and batch."""
    return (estimate(cfg, parallel, replace(plan, lora=None), cluster),
            estimate(cfg, parallel, replace(plan, lora=lora), cluster))


def lora_report(recipes) -> str:
    """For each LoRA training recipe (paths), the planner's per-GPU memory of full fine-tuning and
    of LoRA at the recipe's layout and cluster, as printable lines."""
    from clinmega.training.config import load_experiment

    lines = []
    for path in recipes:
        exp = load_experiment([path])
        if exp.train.peft != "lora" or exp.cluster is None:
            raise ConfigError(f"{path}: not a LoRA recipe with a cluster (train.peft, cluster)")
        full, lora = lora_vs_full(exp.model, exp.parallel, plan_of(exp), exp.cluster, exp.lora)
        dense, expert = lora_parameters(exp.model, exp.lora)
        lines.append(f"{exp.model.name} LoRA r={exp.lora.rank} on {exp.cluster.num_gpus} x "
                     f"{exp.cluster.gpu_memory_gb:g} GB, {lora.layout()}: "
                     f"{(dense + expert) / 1e6:.1f}M adapter parameters")
        for label, e in (("full", full), ("lora", lora)):
            parts = ", ".join(f"{k} {v:.1f}" for k, v in e.memory_gb.items())
            lines.append(f"  {label:4s} {e.total_gb:6.1f} GB/GPU ({parts})")
        lines.append(f"  lora/full memory {lora.total_gb / full.total_gb:.2f}")
    return "\n".join(lines)
