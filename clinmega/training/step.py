"""One optimisation step's forward/backward over microbatches, through megatron-core's schedules.

``forward_backward`` runs ``get_forward_backward_func()`` (no pipelining, 1F1B or interleaved,
chosen by megatron-core from the parallel state) over a list of microbatches, with Megatron DDP
doing the gradient reduction through ``finalize_model_grads``. Microbatches are dicts of
``tokens, labels, loss_mask, position_ids`` and optionally ``attention_mask`` (bool, True = masked),
``cu_seqlens`` (a per-row list of packed sub-sequence boundaries: attention is then restricted to
each sub-sequence), ``packed_seq_params`` and ``neftune`` (the NEFTune noise context of the microbatch).

A packed microbatch takes one of two routes, chosen by the model's layer spec (:func:`uses_thd`):
Transformer Engine gets megatron-core's THD route (:func:`clinmega.training.data.thd_batch`:
``PackedSeqParams``, no mask; TE's causal attention ignores a dense mask, so a block mask would
silently attend across samples), the local spec gets the dense block-causal mask. Every pipeline
stage builds its own parameters from the microbatch (each stage's iterator yields it), so middle
stages get them too.
"""

from __future__ import annotations

from functools import partial
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from clinmega.models.dist_ckpt import unwrap
from clinmega.runtime import device
from clinmega.training.data import packed_attention_mask, thd_alignment, thd_batch
from clinmega.training.neftune import NEFTune


def wrap_ddp(chunks: Sequence[torch.nn.Module], ddp_config: DistributedDataParallelConfig
             ) -> list[DistributedDataParallel]:
    """Megatron DDP around each model chunk; the schedule calls ``finalize_model_grads``."""
    wrapped = []
    for i, chunk in enumerate(chunks):
        config = chunk.config
        config.finalize_model_grads_func = finalize_model_grads
        wrapped.append(DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                               disable_bucketing=i > 0))
    return wrapped


def wire_optimizer(model: Sequence[torch.nn.Module], optimizer) -> None:
    """What Megatron-LM's ``train()`` sets on the model config once the optimizer exists: the loss
    scaling the schedule applies before backward (``optimizer.scale_loss``: the fp16 dynamic
    loss scale, 1 otherwise; without it fp16 gradients are unscaled by a scale never applied) and,
    with ``overlap_grad_reduce``, the ``no_sync`` contexts that hold the gradient reduction back
    until the last microbatch."""
    config = unwrap(model[0]).config
    config.grad_scale_func = optimizer.scale_loss
    if _ddp_flag(model[0], "overlap_grad_reduce"):
        no_sync = [chunk.no_sync for chunk in model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync


def sync_params(model: Sequence[torch.nn.Module]) -> None:
    """With ``overlap_param_gather`` the updated parameters are all-gathered lazily by the next
    forward's hooks; finish that now (before a checkpoint is written), as Megatron-LM does."""
    for chunk in model:
        if _ddp_flag(chunk, "overlap_param_gather"):
            chunk.start_param_sync(force_sync=True)


def _ddp_flag(chunk: torch.nn.Module, name: str) -> bool:
    config = getattr(chunk, "ddp_config", None)
    return bool(config is not None and getattr(config, name))


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Next-token loss of one microbatch as (sum over unmasked tokens, token count, report).

    megatron-core's schedule divides the sum by the count (and by the number of microbatches)
    for the backward pass, or, with ``calculate_per_token_loss``, leaves the division to
    ``finalize_model_grads`` over the whole global batch. The report is a detached copy: the
    schedule rescales the returned tensor in place.
    """
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), num_tokens.detach().float()])
    return loss_sum, num_tokens, {"lm loss": report}


def attention_mask(batch: dict, model: torch.nn.Module) -> torch.Tensor | None:
    """The batch's explicit mask, or the packed block-causal one (with the model's sliding window)
    when it carries ``cu_seqlens``, or None (the model's own causal mask)."""
    if batch.get("attention_mask") is not None or "cu_seqlens" not in batch:
        return batch.get("attention_mask")
    window = unwrap(model).config.window_size
    if window is not None:
        from clinmega.runtime.cpu_compat import window_keeps_explicit_mask

        if not window_keeps_explicit_mask():
            raise RuntimeError(
                "packed batches on megatron-core's local attention with a sliding window: its "
                "softmax replaces the block mask by the window mask (samples would attend across "
                "each other); use runtime.transformer_impl=transformer_engine (the THD route) on GPU")
    return packed_attention_mask(batch["cu_seqlens"], batch["tokens"].shape[1],
                                 window[0] + 1 if window else None)


def uses_thd(batch: dict, model: torch.nn.Module) -> bool:
    """True when the packed ``batch`` must take the THD route: it has ``cu_seqlens``, no explicit
    mask, and the model's layers are Transformer Engine's."""
    return ("cu_seqlens" in batch and batch.get("attention_mask") is None
            and batch.get("packed_seq_params") is None
            and unwrap(model).config.transformer_impl == "transformer_engine")


def model_inputs(batch: dict, model: torch.nn.Module) -> tuple[dict, torch.Tensor | None]:
    """(the microbatch as the model takes it, its attention mask): THD on Transformer Engine,
    the block mask on the local spec (see the module doc)."""
    if uses_thd(batch, model):
        config = unwrap(model).config
        multiple = thd_alignment(config.tensor_model_parallel_size, config.sequence_parallel,
                                 config.context_parallel_size, bool(config.fp8))
        return thd_batch(batch, multiple), None
    return batch, attention_mask(batch, model)


def forward_step(data_iterator, model):
    batch, mask = model_inputs(next(data_iterator), model)
    dev = device()
    moved = {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
    packed = moved.get("packed_seq_params")
    if packed is not None:
        packed = _packed_to(packed, dev)
    NEFTune.set_context(model, batch.get("neftune"))
    output = model(moved["tokens"], moved["position_ids"],
                   mask.to(dev, non_blocking=True) if mask is not None else None,
                   labels=moved["labels"], packed_seq_params=packed)
    return output, partial(lm_loss, moved["loss_mask"])


def _packed_to(params, dev: torch.device):
    """PackedSeqParams with its tensors on ``dev`` (TE reads cu_seqlens on the GPU)."""
    import dataclasses

    moved = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)
             if f.init and torch.is_tensor(getattr(params, f.name))}
    return dataclasses.replace(params, **{k: v.to(dev, non_blocking=True) for k, v in moved.items()})


def forward_backward(model: Sequence[torch.nn.Module], microbatches: Sequence[dict],
                     forward_only: bool = False) -> float | None:
    """Run the schedule over ``microbatches``; return the mean LM loss on every rank."""
    first = microbatches[0]
    seq_length, mbs = first["tokens"].shape[1], first["tokens"].shape[0]
    if not forward_only:
        for chunk in model:
            if hasattr(chunk, "zero_grad_buffer"):
                chunk.zero_grad_buffer()
    if not forward_only:
        set_aux_loss_scale(model, microbatches)
    vpp = len(model)
    iterators: Iterable = ([iter(microbatches) for _ in range(vpp)] if vpp > 1
                           else iter(microbatches))
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators, model=list(model),
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=mbs,
        forward_only=forward_only)
    return reduce_loss(losses)


def set_aux_loss_scale(model: Sequence[torch.nn.Module], microbatches: Sequence[dict]) -> None:
    """Weight the MoE load-balancing loss as coeff x (its mean over the global batch's
    microbatches), its definition, also when not every token is a loss token.

    With ``calculate_per_token_loss`` megatron-core's router adds each microbatch's aux loss
    times its token count and ``finalize_model_grads`` divides every gradient by the global
    *loss*-token count, which gives the mean only when all tokens carry loss (pretraining);
    with SFT masks (prompts, padding) the aux loss would weigh tokens/loss-tokens times more.
    The MoE loss scale (``moe_grad_scale_func``; times the optimizer's loss scale, as the
    default) is therefore loss-tokens / tokens over the global batch."""
    config = unwrap(model[0]).config
    if not getattr(config, "num_moe_experts", None) or not config.calculate_per_token_loss:
        return
    counts = torch.tensor([sum(float(mb["loss_mask"].sum()) for mb in microbatches),
                           sum(mb["loss_mask"].numel() for mb in microbatches)],
                          dtype=torch.float64, device=device())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
    ratio = float(counts[0].clamp(min=1) / counts[1])  # finalize_model_grads clamps to 1 too

    def moe_grad_scale(grad_scale=config.grad_scale_func):
        return ratio * (grad_scale(torch.ones(1, device=device())) if grad_scale else 1.0)

    for chunk in model:
        unwrap(chunk).config.moe_grad_scale_func = moe_grad_scale


def reduce_loss(losses: list[dict], key: str = "lm loss") -> float:
    """Token-weighted mean loss over all microbatches and data-parallel ranks, on every rank."""
    local = torch.zeros(2, dtype=torch.float64, device=device())
    if losses and ps.is_pipeline_last_stage(ignore_virtual=True):
        local += torch.stack([x[key].double() for x in losses]).sum(dim=0)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(local, group=ps.get_pipeline_model_parallel_group())
    if ps.get_data_parallel_world_size() > 1:
        dist.all_reduce(local, group=ps.get_data_parallel_group())
    return float(local[0] / local[1].clamp(min=1))
