"""Training checkpoints: megatron-core distributed checkpoints of the whole training state.

Layout under the checkpoint directory::

    iter_0000010/      model (+ chunks), optimizer (optimizer.sharded_state_dict), scheduler,
                       train state (step = data position, schedule), per-rank RNG states
    iter_0000020/      ... each also describing itself (``clinmega.checkpoints``): model config,
                       hf_assets/ (HF config.json, tokenizer), provenance
    latest             "20": the newest complete checkpoint
    latest_checkpointed_iteration.txt   "20" too: Megatron-LM's tracker file

A save writes ``.iter_XXXXXXX.tmp-shared`` (:mod:`clinmega.utils.atomic`), adds the description once every rank has finished and renames
it, then replaces ``latest`` and the tracker (each atomically), then deletes all but the last
``keep_last`` checkpoints: a killed job never leaves a directory that looks complete. With ``async_save`` the
tensor writes run in the background (megatron-core ``AsyncCallsQueue``) and the rename/``latest``
happen in the request's finalisation. The checkpoint is layout independent (resharded on load);
the distributed optimizer state uses megatron-core's ``fully_reshardable`` format, so a run
resumes at another data-parallel size. A LoRA run (``part = "adapters"``) saves and restores only
the adapter weights and their optimizer state; its base comes from the checkpoint its LoRA record
names (:mod:`clinmega.models.lora_model`). RNG states are restored when TP/PP are unchanged.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from clinmega.checkpoints import (  # noqa: F401  (LATEST, read_latest: this module's old API)
    ASSETS_DIR,
    LATEST,
    iteration_dir,
    iteration_steps,
    publish_latest,
    read_latest,
    write_checkpoint_info,
)
from clinmega.config.schema import ModelConfig
from clinmega.models.dist_ckpt import load_chunk_states, load_sharded, model_sharded_state_dict
from clinmega.utils.atomic import shared_tmp_dir

log = logging.getLogger(__name__)
# The distributed optimizer's state gathered into per-parameter tensors: loads at any DP size.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _rng_state() -> dict:
    return dict(random=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                tracker=tensor_parallel.get_cuda_rng_tracker().get_states())


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    return dict(tp=ps.get_tensor_model_parallel_world_size(),
                pp=ps.get_pipeline_model_parallel_world_size())


def _rng_sharded(state: dict | None) -> ShardedObject:
    """Megatron's per-rank RNG ShardedObject: one per (pp, tp) rank, replicated over DP."""
    return ShardedObject(
        "rng_state", state, (ps.get_pipeline_model_parallel_world_size(),
                             ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


@dataclass
class TrainingState:
    """The parts of a run a checkpoint restores besides tensors."""

    step: int = 0                  # optimizer steps done = global batches consumed
    schedule_start: int = 0        # step the LR schedule counts from (re-warm moves it)
    schedule: dict | None = None   # clinmega.training.optimizer.schedule_signature at save


def _sharded_state(chunks, optimizer, scheduler, state: TrainingState | None, loading: bool,
                   part: str | None = None) -> dict:
    sharded = model_sharded_state_dict(chunks, part)
    model_only = dict(sharded)
    if optimizer is not None:
        sharded["optimizer"] = optimizer.sharded_state_dict(model_only, is_loading=loading,
                                                            metadata=OPTIMIZER_METADATA)
    sharded["scheduler"] = scheduler.state_dict() if scheduler is not None else {}
    sharded["train_state"] = vars(state) if state is not None else {}
    sharded["layout"] = _layout()
    sharded["rng_state"] = _rng_sharded(None if loading else _rng_state())
    return sharded


class Checkpointer:
    """Saves and restores the training state under ``root`` (every rank calls every method)."""

    def __init__(self, root: str | Path, keep_last: int = 2, async_save: bool = False):
        self.root, self.keep_last, self.async_save = Path(root), keep_last, async_save
        self.part: str | None = None  # "adapters": a LoRA run saves and restores only those
        self._queue = None
        self._description: tuple[ModelConfig, dict, Path | None, str] | None = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    def describe(self, model: ModelConfig, provenance: dict, assets_from: str | Path | None,
                 torch_dtype: str) -> None:
        """What every later save records: the model, provenance (``step`` is added per save) and
        the tokenizer assets to carry forward (``assets_from``: a checkpoint's ``hf_assets``)."""
        self._description = (model, provenance, Path(assets_from) if assets_from else None,
                             torch_dtype)

    @property
    def is_writer(self) -> bool:
        return dist.get_rank() == 0

    def save(self, step: int, chunks: Sequence[torch.nn.Module], optimizer, scheduler,
             state: TrainingState) -> Path:
        """Write checkpoint ``step``; returns its final directory."""
        self.finalize(blocking=True)  # one save in flight at a time
        final, tmp = iteration_dir(self.root, step), shared_tmp_dir(iteration_dir(self.root, step))
        if self.is_writer:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        sharded = _sharded_state(chunks, optimizer, scheduler, state, loading=False, part=self.part)
        request = dist_checkpointing.save(sharded, str(tmp), async_sharded_save=self.async_save,
                                          **({"async_strategy": "mcore"} if self.async_save else {}))
        if self.async_save:
            request.add_finalize_fn(lambda: self._publish(step, tmp, final))
            self._queue.schedule_async_request(request)
        else:
            self._publish(step, tmp, final)
        return final

    def _publish(self, step: int, tmp: Path, final: Path) -> None:
        dist.barrier()  # every rank's shards are on disk
        if self.is_writer:
            if self._description is not None:
                model, provenance, assets, dtype = self._description
                write_checkpoint_info(tmp, model, {**provenance, "step": step}, assets, dtype)
                self._description = (model, provenance, final / ASSETS_DIR, dtype)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            publish_latest(self.root, step)
            self._prune(step)
        dist.barrier()
        log.info("saved checkpoint %s", final)

    def _prune(self, newest: int) -> None:
        steps = iteration_steps(self.root)
        for old in steps[:-self.keep_last] if self.keep_last else []:
            if old != newest:
                shutil.rmtree(iteration_dir(self.root, old), ignore_errors=True)

    def finalize(self, blocking: bool = False) -> None:
        """Complete finished async saves (all of them when ``blocking``)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        if self._queue is not None:
            self.finalize(blocking=True)
            self._queue.close()
            self._queue = None

    def latest(self) -> int | None:
        return read_latest(self.root)

    def load(self, step: int, chunks: Sequence[torch.nn.Module], optimizer
             ) -> tuple[TrainingState, dict]:
        """Restore checkpoint ``step`` into the model, optimizer and RNGs; returns the training
        state and the LR scheduler's state dict (the caller decides whether to apply it)."""
        directory = iteration_dir(self.root, step)
        sharded = _sharded_state(chunks, optimizer, None, None, loading=True, part=self.part)
        saved_layout = dist_checkpointing.load_common_state_dict(str(directory))["layout"]
        same_layout = saved_layout == _layout()
        if not same_layout:  # RNG states are per (pp, tp) rank: only meaningful at that layout
            sharded.pop("rng_state")
        loaded = load_sharded(sharded, directory)
        load_chunk_states(chunks, loaded, directory, part=self.part)
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
        if same_layout:
            _set_rng_state(loaded["rng_state"])
        return TrainingState(**loaded["train_state"]), loaded["scheduler"]


class TerminationFlag:
    """The signals in ``signals`` (default: SIGTERM, Slurm's preemption notice; SIGINT keeps its usual
    KeyboardInterrupt) set a flag the loop checks after each step; all ranks agree on it, so every
    rank saves a final checkpoint and exits together."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self._received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        self._received = signum

    def should_stop(self) -> bool:
        flag = torch.tensor([1 if self._received is not None else 0], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            from clinmega.runtime import device

            flag = flag.to(device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

