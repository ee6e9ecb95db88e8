"""Multi-rank cases for test_parallel_equivalence.py, run inside one spawned 2-rank gloo group.

For each model, the reference is the TP1/PP1/EP1 layout; in it both ranks see the full batch, so
its reduced gradients are exactly the single-process ones. Each other layout loads the same full
weights (a dist checkpoint saved by the reference layout, resharded by megatron-core), runs one
forward/backward through megatron-core's schedule + DDP on its share of the batch, and saves its
*gradients* as a dist checkpoint; the reference layout loads that back (megatron-core gathers
the shards) and compares tensor by tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core.distributed import DistributedDataParallelConfig

from clinmega.config import ParallelConfig, PrecisionConfig, RuntimeConfig
from clinmega.models import build_model, get_preset
from clinmega.models.dist_ckpt import load_model_weights, save_model_weights, unwrap
from clinmega.runtime import init_model_parallel, init_process_group
from clinmega.training.step import forward_backward, wrap_ddp

BATCH, SEQ, MICROBATCHES = 4, 24, 2
RUNTIME = RuntimeConfig(seed=1234)
PRECISION = PrecisionConfig(dtype="fp32")

LAYOUTS = {
    "tp2": ParallelConfig(tensor_parallel=2),
    "tp2_sp": ParallelConfig(tensor_parallel=2, sequence_parallel=True),
    "pp2": ParallelConfig(pipeline_parallel=2),
    "pp2_vpp2": ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=2),
    "ep2": ParallelConfig(expert_parallel=2),
    "tp2_sp_ep2": ParallelConfig(tensor_parallel=2, sequence_parallel=True, expert_parallel=2,
                                 expert_tensor_parallel=1),
}


def make_batch(vocab: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=gen)
    return dict(tokens=tokens[:, :-1].contiguous(), labels=tokens[:, 1:].contiguous(),
                loss_mask=torch.ones(BATCH, SEQ), position_ids=torch.arange(SEQ).repeat(BATCH, 1))


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
    loss = forward_backward(ddp, microbatches(batch, replicate))
    for chunk in ddp:
        for p in chunk.module.parameters():
            p.data.copy_(p.main_grad)  # gradients as weights, to reshard them via dist ckpt
    return loss, chunks


def reference_grads(model_cfg, grads_dir: Path, **overrides) -> dict[str, torch.Tensor]:
    init_model_parallel(ParallelConfig(), RUNTIME)
    chunks = build_model(model_cfg, ParallelConfig(), PRECISION, RUNTIME, **overrides)
    load_model_weights(chunks, grads_dir)
    return {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()}


def equivalence(tmp: str, model_name: str, layouts: list[str]) -> dict:
    """Returns {layout: (loss, ref_loss, max grad diff, worst tensor)} on every rank."""
    init_process_group(RUNTIME)
    tmp = Path(tmp) / model_name
    model_cfg = get_preset(model_name)
    batch = make_batch(model_cfg.vocab_size)
    weights = tmp / "weights"
    init_model_parallel(ParallelConfig(), RUNTIME)
    save_model_weights(build_model(model_cfg, ParallelConfig(), PRECISION, RUNTIME), weights)

    references: dict[tuple, tuple[float, dict]] = {}
    results = {}
    for name in layouts:
        parallel = LAYOUTS[name]
        # Megatron computes the MoE load-balancing loss per data-parallel rank (on its own tokens),
        # so a layout that splits the batch across DP ranks is compared with the aux loss off.
        dp_split = parallel.model_parallel_size < 2 and model_cfg.is_moe
        overrides = {"moe_aux_loss_coeff": 0.0} if dp_split else {}
        key = tuple(sorted(overrides.items()))
        if key not in references:
            ref_loss, ref_chunks = run_layout(model_cfg, ParallelConfig(), weights, batch,
                                              replicate=True, **overrides)
            ref_dir = tmp / f"grads_reference_{len(references)}"
            save_model_weights(ref_chunks, ref_dir)
            references[key] = (ref_loss, reference_grads(model_cfg, ref_dir, **overrides))
        ref_loss, ref = references[key]
        loss, chunks = run_layout(model_cfg, parallel, weights, batch, **overrides)
        save_model_weights(chunks, tmp / f"grads_{name}")
        got = reference_grads(model_cfg, tmp / f"grads_{name}", **overrides)
        diffs = {n: (got[n] - ref[n]).abs().max().item() for n in ref}
        worst = max(diffs, key=diffs.get)
        scale = max(t.abs().max().item() for t in ref.values())
        results[name] = dict(loss=loss, ref_loss=ref_loss, max_grad_diff=diffs[worst],
                             worst=worst, grad_scale=scale)
    return results
