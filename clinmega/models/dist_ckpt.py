"""Model weights in megatron-core distributed-checkpoint format (torch_dist), any layout.

A checkpoint holds the *global* tensors under their sharded keys, so one saved at one TP/PP/EP
layout loads at any other (dist_checkpointing reshards). Multiple model chunks (virtual pipeline)
are stored as ``model0``, ``model1``, ... like Megatron-LM; a single chunk as ``model``.

Every load goes through one policy (:func:`check_load_keys`, used here, by training resume and by
the eval Megatron backend): Transformer Engine modules carry ``_extra_state`` (FP8 metadata) that
megatron-core does not always save and the local spec never has, so exactly the ``*._extra_state``
entries may be absent on either side; any other missing or unexpected key is an error naming it.
Keys that differ between the TE and the local spec's checkpoints
(:data:`clinmega.models.spec.CHECKPOINT_KEY_DIFFERENCES`) are renamed to what the checkpoint holds,
so a checkpoint written under either spec loads under the other.

LoRA (:mod:`clinmega.models.lora`) splits a model into two parts that load from different
checkpoints: ``part="base"`` loads every tensor but the adapter weights (``*.lora_a.weight``,
``*.lora_b.weight``), which may then be absent from the module state and nothing else may;
``part="adapters"`` loads exactly the adapter weights (an adapter checkpoint holds nothing else).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.validation import StrictHandling

from clinmega.models.spec import checkpoint_key_alternative

EXTRA_STATE = "_extra_state"


class CheckpointKeyError(KeyError):
    """A load found keys missing or unexpected beyond the tolerated ``_extra_state`` entries."""

    def __str__(self) -> str:
        return str(self.args[0])


def is_extra_state(key: str) -> bool:
    """Whether ``key`` is a Transformer Engine ``_extra_state`` entry (module state or sharded key)."""
    return key.rsplit(".", 1)[-1] == EXTRA_STATE


PARTS = (None, "base", "adapters")  # the whole model, all but the LoRA adapters, only them


def in_part(key: str, part: str | None) -> bool:
    """Whether state-dict ``key`` belongs to ``part`` (see the module doc)."""
    from clinmega.models.lora import is_adapter_key

    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    return part is None or (part == "adapters") == is_adapter_key(key)


def check_load_keys(missing, unexpected, where: str, part: str | None = None) -> None:
    """The one strict-load policy: raise :class:`CheckpointKeyError` naming every missing or
    unexpected key except ``*._extra_state`` ones and, loading a ``part``, the missing keys of the
    other part (see the module doc)."""
    missing = sorted(k for k in missing if not is_extra_state(k) and in_part(k, part))
    unexpected = sorted(k for k in unexpected if not is_extra_state(k))
    if missing or unexpected:
        parts = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + (
            [f"unexpected {', '.join(map(repr, unexpected))}"] if unexpected else [])
        raise CheckpointKeyError(f"{where}: {'; '.join(parts)}")


def load_module_state(module: torch.nn.Module, state: dict, where: str, strict: bool = True,
                      part: str | None = None) -> None:
    """``module.load_state_dict(state)`` under :func:`check_load_keys` when ``strict``."""
    result = module.load_state_dict(state, strict=False)
    if strict:
        check_load_keys(result.missing_keys, result.unexpected_keys, where, part)


def remap_to_checkpoint(sharded: dict, checkpoint_keys: set[str]) -> list[tuple[str, str]]:
    """Rename the sharded tensors of ``sharded`` whose key the checkpoint lacks but holds under the
    other spec's name; returns the (requested, stored) pairs renamed."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    renamed = []
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor) and sh.key not in checkpoint_keys:
            other = checkpoint_key_alternative(sh.key)
            if other is not None and other in checkpoint_keys:
                renamed.append((sh.key, other))
                sh.key = other
    return renamed


def load_sharded(sharded: dict, directory: str | Path, strict: bool = True) -> dict:
    """``dist_checkpointing.load`` under the policy: the model entries (``model``, ``model{i}``)
    get their spec-dependent keys renamed to the checkpoint's; with ``strict`` a requested entry
    the checkpoint lacks is an error unless it is ``_extra_state`` (it is then left out)."""
    stored = set(dist_checkpointing.load_tensors_metadata(str(directory)))
    for key, value in sharded.items():
        if re.fullmatch(r"model\d*", key):
            remap_to_checkpoint(value, stored)
    handling = StrictHandling.RETURN_UNEXPECTED if strict else StrictHandling.LOG_UNEXPECTED
    loaded = dist_checkpointing.load(sharded, str(directory), strict=handling)
    if isinstance(loaded, tuple):
        loaded, _, absent = loaded
        check_load_keys(absent, (), f"{directory}: checkpoint")
    return loaded


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def model_sharded_state_dict(chunks: Sequence[torch.nn.Module], part: str | None = None) -> dict:
    """``model``/``model{i}`` sharded state dicts of the chunks (only ``part``'s entries)."""
    def select(chunk) -> dict:
        state = chunk.sharded_state_dict()
        return state if part is None else {k: v for k, v in state.items() if in_part(k, part)}

    chunks = [unwrap(c) for c in chunks]
    if len(chunks) == 1:
        return {"model": select(chunks[0])}
    return {f"model{i}": select(c) for i, c in enumerate(chunks)}


def save_model_weights(chunks: Sequence[torch.nn.Module], directory: str | Path,
                       part: str | None = None) -> None:
    """Collective: every rank of the world calls it with its own chunks."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(chunks, part), str(directory))


def load_model_weights(chunks: Sequence[torch.nn.Module], directory: str | Path,
                       strict: bool = True, part: str | None = None) -> None:
    """Collective: load (and reshard) weights saved at any layout into ``chunks``.

    The checkpoint may hold more than the weights (a training checkpoint's optimizer, scheduler and
    RNG states): those are ignored. With ``strict``, a model tensor absent from the checkpoint is an
    error (megatron-core calls it an "unexpected" key), as is a missing one in ``load_state_dict``,
    except Transformer Engine's ``_extra_state`` (see the module doc). ``part``: load only the
    LoRA base or adapters (the module doc).
    """
    sharded = model_sharded_state_dict(chunks, part)
    loaded = load_sharded(sharded, directory, strict)
    load_chunk_states(chunks, loaded, directory, strict, part)


def load_chunk_states(chunks: Sequence[torch.nn.Module], loaded: dict, directory: str | Path,
                      strict: bool = True, part: str | None = None) -> None:
    """Put the ``model``/``model{i}`` entries of a loaded checkpoint into the chunks (policy above)."""
    models = [unwrap(c) for c in chunks]
    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    for key, model in zip(keys, models):
        load_module_state(model, loaded[key], f"{directory}: {key}", strict, part)
