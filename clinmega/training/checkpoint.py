"""Training checkpoints: megatron-core distributed checkpoints of the whole training state.

Layout under the checkpoint directory::

    iter_0000010/      model (+ chunks), optimizer (optimizer.sharded_state_dict), scheduler,
                       train state (step = data position, schedule), per-rank RNG states
    iter_0000020/
    latest             "20": the newest complete checkpoint

A save writes ``.iter_XXXXXXX.tmp-shared`` (:mod:`clinmega.utils.atomic`) and renames it once every rank has finished, then replaces
``latest`` (write to a temp file + ``os.replace``), then deletes all but the last ``keep_last``
checkpoints: a killed job never leaves a directory that looks complete. With ``async_save`` the
tensor writes run in the background (megatron-core ``AsyncCallsQueue``) and the rename/``latest``
happen in the request's finalisation. The checkpoint is layout independent (resharded on load);
the distributed optimizer state uses megatron-core's ``fully_reshardable`` format, so a run
resumes at another data-parallel size. RNG states are restored when TP/PP are unchanged.
"""

from __future__ import annotations

import logging
import os
import random
import re
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

from clinmega.models.dist_ckpt import model_sharded_state_dict, unwrap
from clinmega.utils.atomic import shared_tmp_dir, write_text_atomic

log = logging.getLogger(__name__)
LATEST = "latest"
# The distributed optimizer's state gathered into per-parameter tensors: loads at any DP size.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
_ITER = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def read_latest(root: Path) -> int | None:
    """The step in ``<root>/latest`` (None when there is no complete checkpoint)."""
    path = Path(root) / LATEST
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected a step number, found {text!r}")
    step = int(text)
    if not iteration_dir(root, step).is_dir():
        raise FileNotFoundError(f"{path} says {step} but {iteration_dir(root, step)} is missing")
    return step


write_atomic = write_text_atomic  # the old name (clinmega.utils.atomic is the one home)


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


def _sharded_state(chunks, optimizer, scheduler, state: TrainingState | None, loading: bool) -> dict:
    sharded = model_sharded_state_dict(chunks)
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
        self._queue = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

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
        sharded = _sharded_state(chunks, optimizer, scheduler, state, loading=False)
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
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(self.root / LATEST, f"{step}\n")
            self._prune(step)
        dist.barrier()
        log.info("saved checkpoint %s", final)

    def _prune(self, newest: int) -> None:
        steps = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _ITER.match(p.name)))
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
        sharded = _sharded_state(chunks, optimizer, None, None, loading=True)
        saved_layout = dist_checkpointing.load_common_state_dict(str(directory))["layout"]
        same_layout = saved_layout == _layout()
        if not same_layout:  # RNG states are per (pp, tp) rank: only meaningful at that layout
            sharded.pop("rng_state")
        loaded = dist_checkpointing.load(sharded, str(directory))
        models = [unwrap(c) for c in chunks]
        keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
        for key, model in zip(keys, models):
            model.load_state_dict(loaded[key])
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

