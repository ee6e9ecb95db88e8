"""LoRA adapters on megatron-core's linear layers (the contract: :mod:`clinmega.models.lora`).

:func:`apply_lora` turns every targeted linear of the model chunks into its LoRA variant in place
(the module's class becomes a subclass of its own class with :class:`LoRALinear` first; the base
weight keeps its name, the adapters are the child modules ``lora_a``/``lora_b``), then freezes
everything but the adapters. Call it before megatron DDP wraps the chunks: frozen weights then get
no gradient buffer and no optimizer state.

Supported layers: the local spec's ``ColumnParallelLinear``/``RowParallelLinear`` and the TE spec's
``TELayerNormColumnParallelLinear``/``TEColumnParallelLinear``/``TERowParallelLinear`` (dense
layers, and the experts of a ``SequentialMLP``). The adapter sees exactly the base GEMM's input:

* **column-parallel** (``linear_qkv``, ``linear_fc1``): ``x`` is the layer input (under sequence
  parallelism its sequence shard, all-gathered here with a backward that only splits, because
  every rank computes the full adapter gradient); ``h = A x`` with ``A`` replicated, then
  ``copy_to_tensor_model_parallel_region`` (backward: all-reduce over TP, so ``A`` and ``x`` get
  the full gradient from all of ``B``'s row shards); ``y = B_local h``, added to the local output.
* **row-parallel** (``linear_proj``, ``linear_fc2``): ``x`` is this rank's hidden shard;
  ``h = A_local x`` is a partial sum, all-reduced over TP (``reduce_from``: backward identity);
  ``y = B h`` (replicated ``B``) is the full output, scattered to the sequence shard under SP.
* **TE's fused layernorm-linear**: the adapter input is the *normed* input. It is recomputed from
  the module's own (frozen) norm weight in fp32 instead of asking TE to return its layernorm output
  (Megatron-Bridge's route): the gradient of TE's returned layernorm output is summed into TE's
  input gradient at a point that depends on TE's version and communication overlap settings, while
  the recomputed norm's gradient flows through autograd alone.
* **experts** (``SequentialMLP`` local experts, any EP): their linears run without TP
  communication (the token dispatcher does it); with ``expert_tensor_parallel`` 1 each expert's
  adapter is a plain per-expert ``B A x`` on its expert rank. ``expert_tensor_parallel`` > 1 is
  refused (the replicated adapter halves would need a gradient all-reduce over the expert-TP group
  that megatron's ``finalize_model_grads`` does not do). Transformer Engine's grouped experts
  (``TEGroupedMLP``) are not adapted: a LoRA MoE model is built with ``moe_grouped_gemm`` off
  (:func:`lora_transformer_overrides`), i.e. TE's per-expert linears in a ``SequentialMLP``.

Initialisation is layout independent: ``A`` is drawn (PEFT's default, U(-1/sqrt(in), 1/sqrt(in)))
as the full tensor from a generator seeded by the run seed and the module's *global* name (global
layer number, global expert index), then sliced for this rank; ``B`` is zero.
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from clinmega.config.errors import ConfigError
from clinmega.models.lora import COLUMN_PARALLEL, LoRAConfig, is_adapter_key, target_of

_CLASSES: dict[type, type] = {}


class _Adapter(torch.nn.Module):
    """``lora_a`` / ``lora_b``: one weight, state dict key ``weight``."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}"


def _tp_group(module, expert: bool):
    """The linear's tensor-parallel group: its own (``tp_group`` on megatron's linears,
    ``_tp_group`` on its TE wrappers, whose TE-side ``tp_group`` is None for experts), else the
    (expert) tensor-parallel group of the parallel state."""
    from megatron.core import parallel_state as ps

    for attr in ("_tp_group", "tp_group"):
        group = getattr(module, attr, None)
        if group is not None:
            return group
    return (ps.get_expert_tensor_parallel_group() if expert
            else ps.get_tensor_model_parallel_group())


def _group_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _group_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def _rms_norm(module, x: torch.Tensor) -> torch.Tensor:
    """The fused norm of a TE layernorm-linear, recomputed (fp32 math, frozen weight)."""
    normalization = getattr(module, "normalization", "RMSNorm")
    if normalization != "RMSNorm":
        raise ConfigError(f"LoRA on TE's fused {normalization}-linear: only RMSNorm is supported")
    weight = module.layer_norm_weight.float()
    if getattr(module, "zero_centered_gamma", False):
        weight = weight + 1
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.eps)
    return (normed * weight).to(x.dtype)


class LoRALinear:
    """Mixin placed before a megatron linear class: ``y = W x + scale * B (A dropout(x))``."""

    lora_scale: float
    lora_dropout: float
    lora_column: bool

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        return out + self.lora_forward(x), bias

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        group = self.lora_group
        parallel = self.lora_tp > 1 and not self.lora_explicit_comm
        sequence_parallel = parallel and self.config.sequence_parallel
        if hasattr(self, "layer_norm_weight"):  # TE's fused norm: the adapter sees the normed input
            x = _rms_norm(self, x)
        if self.lora_column:
            if sequence_parallel:
                x = mappings.gather_from_sequence_parallel_region(
                    x, tensor_parallel_output_grad=False, group=group)
            h = F.linear(self._lora_drop(x, replicated=True), self.lora_a.weight)
            if parallel:
                h = mappings.copy_to_tensor_model_parallel_region(h, group=group)
            return F.linear(h, self.lora_b.weight) * self.lora_scale
        h = F.linear(self._lora_drop(x, replicated=not parallel), self.lora_a.weight)
        if parallel:
            h = mappings.reduce_from_tensor_model_parallel_region(h, group=group)
        y = F.linear(h, self.lora_b.weight) * self.lora_scale
        if sequence_parallel:
            y = mappings.scatter_to_sequence_parallel_region(y, group=group)
        return y

    def _lora_drop(self, x: torch.Tensor, replicated: bool) -> torch.Tensor:
        """Dropout on the adapter input: the default generator where the input is the same on
        every TP rank (the masks must agree), megatron's TP-rank-specific one on a hidden shard."""
        if not self.lora_dropout or not self.training:
            return x
        if replicated or not torch.cuda.is_available():
            return F.dropout(x, self.lora_dropout, True)
        from megatron.core import tensor_parallel

        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.dropout(x, self.lora_dropout, True)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """The base layer's entries plus ``lora_a.weight``/``lora_b.weight`` sharded per the
        contract (same leading offsets as the base weight; a GLU ``linear_fc1``'s ``B`` rows are
        [gate; up] halves like ``W``'s, so they get megatron's SwiGLU factory too)."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        names = ("lora_a.weight", "lora_b.weight")
        for name in names:
            state.pop(f"{prefix}{name}", None)
        own = {"lora_a.weight": self.lora_a.weight, "lora_b.weight": self.lora_b.weight}
        axis = {"lora_b.weight": 0} if self.lora_column else {"lora_a.weight": 1}
        dp_cp = (metadata or {}).get("dp_cp_group")
        if dp_cp is None:
            from megatron.core import parallel_state as ps

            dp_cp = ps.get_data_parallel_group(with_context_parallel=True)
        adapters = make_sharded_tensors_for_checkpoint(
            own, prefix, axis, sharded_offsets, tp_group=self.lora_group, dp_cp_group=dp_cp)
        if self.lora_glu:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            key = f"{prefix}lora_b.weight"
            adapters[key] = apply_swiglu_sharded_factory(
                adapters[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False),
                tp_group=self.lora_group, dp_group=dp_cp)
        state.update(adapters)
        return state


def _lora_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"LoRA{cls.__name__}", (LoRALinear, cls), {})
    return _CLASSES[cls]


def _supported_linears() -> tuple[type, ...]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    classes: list[type] = [ColumnParallelLinear, RowParallelLinear]
    from clinmega.models.spec import transformer_engine_available

    if transformer_engine_available():
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TELayerNormColumnParallelLinear,
            TERowParallelLinear,
        )

        classes += [TELayerNormColumnParallelLinear, TEColumnParallelLinear, TERowParallelLinear]
    return tuple(classes)


def _seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """module name in the chunk -> its layout-independent name (global layer number and expert)."""
    from megatron.core import parallel_state as ps

    names = {}
    decoder = getattr(chunk, "decoder", None)
    for index, layer in enumerate(getattr(decoder, "layers", [])):
        for sub, module in layer.named_modules():
            parts = sub.split(".")
            if "local_experts" in parts[:-1]:
                i = parts.index("local_experts")
                experts = layer.get_submodule(".".join(parts[:i]))
                group = getattr(experts, "ep_group", None)
                ep_rank = (_group_rank(group) if group is not None
                           else ps.get_expert_model_parallel_rank())
                parts[i + 1] = str(ep_rank * experts.num_local_experts + int(parts[i + 1]))
            names[f"decoder.layers.{index}.{sub}" if sub else f"decoder.layers.{index}"] = (
                f"layer{layer.layer_number}." + ".".join(parts))
    return names


def _convert(module, cfg: LoRAConfig, target: str, global_name: str, seed: int,
             expert: bool) -> None:
    group = _tp_group(module, expert)
    tp = _group_size(group)
    # An expert's linears never communicate over TP themselves (megatron's token dispatcher
    # does: ``explicit_expert_comm``); the adapter must not either.
    explicit = expert
    if explicit and tp > 1:
        raise ConfigError("train.peft=lora: expert linears with expert_tensor_parallel > 1 are not "
                          "supported (set parallel.expert_tensor_parallel=1)")
    weight = module.weight
    column = target in COLUMN_PARALLEL
    out_local, in_local = weight.shape
    full_in = in_local if column or explicit else in_local * tp
    gen = torch.Generator().manual_seed(_seed(seed, global_name))
    bound = 1.0 / math.sqrt(full_in)
    a = (torch.rand((cfg.rank, full_in), generator=gen, dtype=torch.float32) * 2 - 1) * bound
    if not column and not explicit and tp > 1:
        rank = _group_rank(group)
        a = a[:, rank * in_local:(rank + 1) * in_local]
    b = torch.zeros((out_local, cfg.rank), dtype=torch.float32)  # column: B's row shard, like W
    device, dtype = weight.device, weight.dtype
    module.__class__ = _lora_class(type(module))
    module.lora_a = _Adapter(a.to(device=device, dtype=dtype).contiguous())
    module.lora_b = _Adapter(b.to(device=device, dtype=dtype))
    module.lora_scale, module.lora_dropout, module.lora_column = cfg.scale, cfg.dropout, column
    module.lora_group, module.lora_tp, module.lora_explicit_comm = group, tp, explicit
    module.lora_glu = target == "linear_fc1" and module.config.gated_linear_unit
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    sharded = module.lora_b.weight if column else module.lora_a.weight
    set_tensor_model_parallel_attributes(sharded, True, 0 if column else 1, 1)
    for adapter in (module.lora_a.weight, module.lora_b.weight):
        if not getattr(weight, "allreduce", True):  # expert weights: reduced over expert DP
            adapter.allreduce = False


def lora_modules(chunks: Sequence[torch.nn.Module]) -> Iterable[tuple[str, torch.nn.Module]]:
    """``(name, module)`` of every adapted linear of the chunks (chunk index prefixed when >1)."""
    from clinmega.models.dist_ckpt import unwrap

    for i, chunk in enumerate(chunks):
        for name, module in unwrap(chunk).named_modules():
            if isinstance(module, LoRALinear):
                yield (f"{i}:{name}" if len(chunks) > 1 else name), module


def apply_lora(chunks: Sequence[torch.nn.Module], cfg: LoRAConfig, seed: int) -> int:
    """Adapt the targeted linears of every chunk (in place) and freeze all other parameters;
    returns the number of adapted linears on this rank. Call before wrapping in DDP."""
    from clinmega.models.dist_ckpt import unwrap

    supported = _supported_linears()
    count = 0
    for chunk in chunks:
        model = unwrap(chunk)
        if getattr(model.config, "moe_grouped_gemm", False):
            raise ConfigError("train.peft=lora: Transformer Engine's grouped experts have no LoRA "
                              "adapters here; build the model with lora_transformer_overrides() "
                              "(moe_grouped_gemm off)")
        globals_ = _global_names(model)
        for param in model.parameters():
            param.requires_grad_(False)
        for module in model.modules():
            # megatron's local linears write weight gradients into ``main_grad`` with this fusion;
            # frozen weights have none (their gradient is computed and dropped instead)
            if getattr(module, "gradient_accumulation_fusion", False):
                module.gradient_accumulation_fusion = False
        for name, module in list(model.named_modules()):
            target = target_of(name)
            if target is None or name.rsplit(".", 1)[-1] != target or target not in cfg.targets:
                continue
            if isinstance(module, LoRALinear):
                raise ConfigError(f"{name}: LoRA applied twice")
            if not isinstance(module, supported):
                raise ConfigError(f"train.peft=lora: {name} is a {type(module).__name__}, not one "
                                  f"of the supported linears {[c.__name__ for c in supported]}")
            _convert(module, cfg, target, globals_.get(name, name), seed,
                     expert=".local_experts." in f".{name}.")
            count += 1
        if getattr(model, "pre_process", False):
            # With everything before the first adapter frozen, the embedding output needs a grad
            # path of its own: megatron's full activation recompute (an autograd.Function) would
            # otherwise cut the graph at a checkpointed layer whose inputs need no grad.
            model.embedding.register_forward_hook(_embedding_requires_grad)
    return count


def _embedding_requires_grad(module, inputs, output):
    if module.training and torch.is_grad_enabled() and not output.requires_grad:
        return output.detach().requires_grad_(True)
    return None


def adapter_parameters(chunks: Sequence[torch.nn.Module]) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every adapter weight of the chunks (trainable ones)."""
    from clinmega.models.dist_ckpt import unwrap

    out = []
    for i, chunk in enumerate(chunks):
        for name, param in unwrap(chunk).named_parameters():
            if is_adapter_key(name):
                out.append((f"{i}:{name}" if len(chunks) > 1 else name, param))
    return out


def lora_transformer_overrides(is_moe: bool) -> dict:
    """TransformerConfig overrides a LoRA model is built with: MoE experts as a SequentialMLP
    (per-expert linears the adapters attach to), also under Transformer Engine."""
    return {"moe_grouped_gemm": False} if is_moe else {}
