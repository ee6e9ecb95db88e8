"""Multi-rank cases for test_parallel_equivalence.py: a table of named case functions, all run by
one spawned 2-rank gloo group (tests/case_table.py); each test names the case it asserts on.

For each model, the reference is the TP1/PP1/EP1 layout; in it both ranks see the full batch, so
its reduced gradients are exactly the single-process ones. Each other layout loads the same full
weights (a dist checkpoint saved by the reference layout, resharded by megatron-core), runs one
forward/backward through megatron-core's schedule + DDP on its share of the batch, and saves its
*gradients* as a dist checkpoint; the reference layout loads that back (megatron-core gathers
the shards) and compares tensor by tensor.

The ``packed_*`` cases feed packed SFT rows with uneven loss-token counts (per microbatch and per
DP rank) through the training configuration (``TrainConfig.transformer_overrides``) and compare
with plain PyTorch autograd of ``sum(loss * mask) / sum(mask)`` over the global batch, where each
packed sample is run alone through the model with megatron-core's own causal + sliding-window
mask (``attention_mask=None``).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from megatron.core.distributed import DistributedDataParallelConfig

from case_table import CaseTable
from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
from clinmega.models import build_model, get_preset
from clinmega.models.dist_ckpt import load_model_weights, save_model_weights, unwrap
from clinmega.runtime import init_model_parallel
from clinmega.training.step import forward_backward, wrap_ddp

TABLE = CaseTable(__name__)
BATCH, SEQ, MICROBATCHES = 4, 24, 2
RUNTIME = RuntimeConfig(seed=1234)
PRECISION = PrecisionConfig(dtype="fp32")
MISTRAL, MIXTRAL = "tiny-mistral-v0.1", "tiny-mixtral"  # v0.1: window 8 < SEQ


def make_batch(vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=gen)
    return dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                loss_mask=torch.ones(BATCH, SEQ), position_ids=torch.arange(SEQ).repeat(BATCH, 1))


def make_packed_batch() -> dict:
    """BATCH packed synthetic SFT rows (1-4 samples each, loss on answers only, padding tail),
    collated by the training path's ``clinmega.training.data.collate``."""
    from clinmega.training.data import SyntheticSource, collate

    source = SyntheticSource(64, SEQ, 64, seed=3, packed=True)
    return collate([source[i] for i in range(BATCH)])


def microbatches(batch: dict, replicate: bool) -> list[dict]:
    from megatron.core import parallel_state as ps

    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if replicate:
        dp, rank = 1, 0
    per_rank = BATCH // dp
    local = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}
    size = per_rank // MICROBATCHES
    return [{k: v[i * size:(i + 1) * size] for k, v in local.items()} for i in range(MICROBATCHES)]


def run_layout(model_cfg, parallel, weights: Path, batch, replicate=False, **overrides):
    init_model_parallel(parallel, RUNTIME)
    chunks = build_model(model_cfg, parallel, PRECISION, RUNTIME, **overrides)
    load_model_weights(chunks, weights)
    ddp = wrap_ddp(chunks, DistributedDataParallelConfig(grad_reduce_in_fp32=True))
    mbs = microbatches(batch, replicate)
    loss = forward_backward(ddp, mbs)
    for chunk in ddp:
        for p in chunk.module.parameters():
            p.data.copy_(p.main_grad)  # gradients as weights, to reshard them via dist ckpt
    return loss, chunks, [float(mb["loss_mask"].sum()) for mb in mbs]


def reference_grads(model_cfg, grads_dir: Path, **overrides) -> dict[str, torch.Tensor]:
    init_model_parallel(ParallelConfig(), RUNTIME)
    chunks = build_model(model_cfg, ParallelConfig(), PRECISION, RUNTIME, **overrides)
    load_model_weights(chunks, grads_dir)
    return {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}


@lru_cache(maxsize=None)
def initial_weights(root: Path, model_name: str) -> Path:
    """The model's single-process initial weights as a dist checkpoint (once per group)."""
    weights = root / "weights" / model_name
    init_model_parallel(ParallelConfig(), RUNTIME)
    save_model_weights(build_model(get_preset(model_name), ParallelConfig(), PRECISION, RUNTIME),
                       weights)
    return weights


@lru_cache(maxsize=None)
def replicated_reference(root: Path, model_name: str, aux_off: bool) -> tuple[float, dict]:
    """Loss and gradients of the TP1/PP1/EP1 layout with the full batch on both ranks."""
    model_cfg = get_preset(model_name)
    overrides = {"moe_aux_loss_coeff": 0.0} if aux_off else {}
    loss, chunks, _ = run_layout(model_cfg, ParallelConfig(), initial_weights(root, model_name),
                                 make_batch(model_cfg.vocab_size), replicate=True, **overrides)
    grads_dir = root / "reference_grads" / f"{model_name}_aux{'off' if aux_off else 'on'}"
    save_model_weights(chunks, grads_dir)
    return loss, reference_grads(model_cfg, grads_dir, **overrides)


def compare(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """Absolute and per-tensor relative gradient differences (relative to the tensor's largest
    reference entry), and the smallest reference gradient norm."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
    diffs = {n: (got[n] - ref[n]).abs().max().item() for n in ref}
    rel = {n: diffs[n] / max(ref[n].abs().max().item(), 1e-30) for n in ref}
    norms = {n: ref[n].norm().item() for n in ref}
    worst, worst_rel, smallest = (max(diffs, key=diffs.get), max(rel, key=rel.get),
                                  min(norms, key=norms.get))
    return dict(max_grad_diff=diffs[worst], worst=worst, max_rel_diff=rel[worst_rel],
                worst_rel=worst_rel, min_grad_norm=norms[smallest], smallest=smallest,
                grad_scale=max(t.abs().max().item() for t in ref.values()), tensors=len(ref))


def layout_case(tmp: Path, model_name: str, parallel: ParallelConfig) -> dict:
    model_cfg = get_preset(model_name)
    # Megatron computes the MoE load-balancing loss per data-parallel rank (on its own tokens),
    # so a layout that splits the batch across DP ranks is compared with the aux loss off.
    aux_off = parallel.model_parallel_size < 2 and model_cfg.is_moe
    overrides = {"moe_aux_loss_coeff": 0.0} if aux_off else {}
    ref_loss, ref = replicated_reference(tmp.parent, model_name, aux_off)
    loss, chunks, _ = run_layout(model_cfg, parallel, initial_weights(tmp.parent, model_name),
                                 make_batch(model_cfg.vocab_size), **overrides)
    save_model_weights(chunks, tmp / "grads")
    return dict(loss=loss, ref_loss=ref_loss,
                **compare(reference_grads(model_cfg, tmp / "grads", **overrides), ref))


@TABLE.case
def mistral_tp2(tmp: Path) -> dict:
    return layout_case(tmp, MISTRAL, ParallelConfig(tensor_parallel=2))


@TABLE.case
def mistral_tp2_sp(tmp: Path) -> dict:
    return layout_case(tmp, MISTRAL, ParallelConfig(tensor_parallel=2, sequence_parallel=True))


@TABLE.case
def mistral_pp2(tmp: Path) -> dict:
    return layout_case(tmp, MISTRAL, ParallelConfig(pipeline_parallel=2))


@TABLE.case
def mistral_pp2_vpp2(tmp: Path) -> dict:
    return layout_case(tmp, MISTRAL, ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2))


# megatron-core's MoE layer refuses TP>1 without sequence parallelism in training.
@TABLE.case
def mixtral_tp2_sp(tmp: Path) -> dict:
    return layout_case(tmp, MIXTRAL, ParallelConfig(tensor_parallel=2, sequence_parallel=True))


@TABLE.case
def mixtral_pp2(tmp: Path) -> dict:
    return layout_case(tmp, MIXTRAL, ParallelConfig(pipeline_parallel=2))


@TABLE.case
def mixtral_ep2(tmp: Path) -> dict:
    return layout_case(tmp, MIXTRAL, ParallelConfig(expert_parallel=2))


@TABLE.case
def mixtral_tp2_sp_ep2(tmp: Path) -> dict:
    return layout_case(tmp, MIXTRAL, ParallelConfig(tensor_parallel=2, sequence_parallel=True,
                                                    expert_parallel=2, expert_tensor_parallel=1))


# --- packed SFT rows with uneven loss-token counts ----------------------------------------------
@lru_cache(maxsize=None)
def per_token_mean_by_hand(root: Path) -> tuple[float, dict]:
    """Plain autograd of sum(loss*mask)/sum(mask) over the global batch, each packed sample run
    alone (positions from 0, ``attention_mask=None``: megatron-core's causal + window mask)."""
    model_cfg = get_preset(MISTRAL)
    init_model_parallel(ParallelConfig(), RUNTIME)
    (model,) = build_model(model_cfg, ParallelConfig(), PRECISION, RUNTIME)
    load_model_weights([model], initial_weights(root, MISTRAL))
    batch = make_packed_batch()
    total, count = torch.zeros(()), batch["loss_mask"].sum()
    for row, cu in enumerate(batch["cu_seqlens"]):
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            mask = batch["loss_mask"][row, a:b]
            if not mask.any():
                continue
            losses = model(batch["tokens"][row:row + 1, a:b], torch.arange(b - a)[None], None,
                           labels=batch["labels"][row:row + 1, a:b])
            total = total + (losses[0] * mask).sum()
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def packed_case(tmp: Path, parallel: ParallelConfig, replicate: bool = False) -> dict:
    from clinmega.training.config import TrainConfig

    model_cfg = get_preset(MISTRAL)
    overrides = TrainConfig().transformer_overrides()  # what training builds the model with
    ref_loss, ref = per_token_mean_by_hand(tmp.parent)
    loss, chunks, tokens = run_layout(model_cfg, parallel, initial_weights(tmp.parent, MISTRAL),
                                      make_packed_batch(), replicate=replicate, **overrides)
    save_model_weights(chunks, tmp / "grads")
    import torch.distributed as dist

    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, tokens)
    return dict(loss=loss, ref_loss=ref_loss, loss_tokens=per_rank,
                **compare(reference_grads(model_cfg, tmp / "grads", **overrides), ref))


@TABLE.case
def packed_dp1(tmp: Path) -> dict:
    """DP1: the whole batch on both ranks (their reduced gradients are the single-process ones)."""
    return packed_case(tmp, ParallelConfig(), replicate=True)


@TABLE.case
def packed_dp2(tmp: Path) -> dict:
    return packed_case(tmp, ParallelConfig())


@TABLE.case
def packed_pp2(tmp: Path) -> dict:
    return packed_case(tmp, ParallelConfig(pipeline_parallel=2))
