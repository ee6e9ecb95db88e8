"""A LoRA run's adapter checkpoint written straight from random tensors, per the contract in
clinmega/models/lora.py (independent of the training code): a real megatron-core torch_dist
checkpoint (``dist_checkpointing.save`` of ShardedTensors, one chunk per layer / expert as the
model's own sharded state dict gives them) holding ``<linear>.lora_a.weight`` ``[..., rank, in]``
and ``<linear>.lora_b.weight`` ``[..., out, rank]`` under the base weight's key with its leading
layer (and expert) axes, plus one optimizer-state tensor, described by the base model and
``provenance["peft"] = peft_record(...)``."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from clinmega.checkpoints import (RUN_CHECKPOINTS, iteration_dir, publish_latest,
                                  read_checkpoint_info, resolve_checkpoint, write_checkpoint_info)
from clinmega.models.lora import LoRAConfig, peft_record

# The base weight keys of the contract's targets (dense model / MoE model).
TARGET_KEYS = {
    "linear_qkv": "decoder.layers.self_attention.linear_qkv.weight",
    "linear_proj": "decoder.layers.self_attention.linear_proj.weight",
    "linear_fc1": "decoder.layers.mlp.linear_fc1.weight",
    "linear_fc2": "decoder.layers.mlp.linear_fc2.weight",
}
MOE_TARGET_KEYS = {**TARGET_KEYS,
                   "linear_fc1": "decoder.layers.mlp.experts.experts.linear_fc1.weight",
                   "linear_fc2": "decoder.layers.mlp.experts.experts.linear_fc2.weight"}


def save_random_adapters(base: str | Path, run_dir: str | Path, lora: LoRAConfig, seed: int = 0,
                         step: int = 2, std: float = 0.1, dtype: torch.dtype = torch.float32
                         ) -> dict[str, tuple[torch.Tensor, ...]]:
    """Write ``run_dir/checkpoints/iter_<step>`` (and ``latest``) with random nonzero A and B (in
    ``dtype``) for ``lora.targets`` of base checkpoint ``base``; returns ``{target: (base weight
    key, A, B)}`` with the global tensors. Needs a (1-process) torch.distributed group."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from clinmega.config import RuntimeConfig
    from clinmega.conversion.dist_io import DistCheckpointReader
    from clinmega.runtime import init_process_group

    init_process_group(RuntimeConfig())
    info = read_checkpoint_info(resolve_checkpoint(base))
    cfg, reader = info.model, DistCheckpointReader(info.directory)
    keys = MOE_TARGET_KEYS if cfg.is_moe else TARGET_KEYS
    gen = torch.Generator().manual_seed(seed)
    made, sharded = {}, {}
    for target in lora.targets:
        key = keys[target]
        shape = reader.shape(key)
        lead, (out, inp) = shape[:-2], shape[-2:]
        a = (torch.randn(lead + (lora.rank, inp), generator=gen) * std).to(dtype)
        b = (torch.randn(lead + (out, lora.rank), generator=gen) * std).to(dtype)
        made[target] = (key, a, b)
        head, _, tail = key.rpartition(".")
        for which, tensor in (("lora_a", a), ("lora_b", b)):
            akey = f"{head}.{which}.{tail}"
            for idx in itertools.product(*map(range, lead)):
                sharded[f"{akey}/{idx}"] = ShardedTensor.from_rank_offsets(
                    akey, tensor[idx].clone(), *[(axis, i, n) for axis, (i, n)
                                                 in enumerate(zip(idx, lead))],
                    replica_id=0, prepend_axis_num=len(lead))
            sharded[f"optimizer.{akey}"] = ShardedTensor.from_rank_offsets(
                f"optimizer.state.exp_avg.{akey}", torch.zeros_like(tensor), replica_id=0)
    root = Path(run_dir) / RUN_CHECKPOINTS
    folder = iteration_dir(root, step)
    folder.mkdir(parents=True)
    dist_checkpointing.save(sharded, str(folder))
    write_checkpoint_info(folder, cfg, {"peft": peft_record(lora, info.directory)},
                          assets_from=info.assets)
    publish_latest(root, step)
    return made
