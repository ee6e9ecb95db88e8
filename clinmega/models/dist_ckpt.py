"""Model weights in megatron-core distributed-checkpoint format (torch_dist), any layout.

A checkpoint holds the *global* tensors under their sharded keys, so one saved at one TP/PP/EP
layout loads at any other (dist_checkpointing reshards). Multiple model chunks (virtual pipeline)
are stored as ``model0``, ``model1``, ... like Megatron-LM; a single chunk as ``model``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module]) -> dict:
    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model_weights(chunks: Sequence[torch.nn.Module], directory: str | Path) -> None:
    """Collective: every rank of the world calls it with its own chunks."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks), str(directory))


def load_model_weights(chunks: Sequence[torch.nn.Module], directory: str | Path,
                       strict: bool = True) -> None:
    """Collective: load (and reshard) weights saved at any layout into ``chunks``.

    The checkpoint may hold more than the weights (a training checkpoint's optimizer, scheduler and
    RNG states): those are ignored. With ``strict``, a model tensor absent from the checkpoint is an
    error (megatron-core calls it an "unexpected" key), as is a missing one in ``load_state_dict``.
    """
    sharded = model_sharded_state_dict(chunks)
    handling = StrictHandling.RAISE_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED
    loaded = dist_checkpointing.load(sharded, str(directory), strict=handling)
    if isinstance(loaded, tuple):
        loaded = loaded[0]
    models = [unwrap(c) for c in chunks]
    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    for key, model in zip(keys, models):
        model.load_state_dict(loaded[key], strict=strict)
