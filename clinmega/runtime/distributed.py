"""Process-group and megatron-core parallel-state initialisation, for 1 CPU process up to a cluster.

The environment decides the world: torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT), Slurm
``srun`` without torchrun (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NODELIST), or nothing at all
(a single process on a free local port). The backend is NCCL when CUDA is present and gloo
otherwise (or as configured). Then megatron-core's ``parallel_state`` is built with the configured
TP/PP/VPP/CP/EP/ETP sizes and the model-parallel RNG is seeded.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ParallelConfig, RuntimeConfig
from clinmega.runtime import cpu_compat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist such as ``gpu[003-005,010],login1`` -> ``gpu003``."""
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not first:
        raise ValueError(f"cannot parse SLURM_NODELIST {nodelist!r}")
    prefix, _, ranges = first.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_world(env: dict | None = None) -> WorldInfo:
    """Read rank/world/master from torchrun or Slurm variables, else a single local process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                         "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_NODELIST", "127.0.0.1"))
        # A port derived from the job id lets every task agree on it without communication.
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return WorldInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return WorldInfo(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or _free_port()), "single")


def resolve_backend(runtime: RuntimeConfig) -> str:
    if runtime.backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if runtime.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("runtime.backend: 'nccl' needs CUDA GPUs; use 'gloo' or 'auto' on CPU")
    return runtime.backend


def device() -> torch.device:
    """The device this rank computes on (set by :func:`init_process_group`)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bind_device(local_rank: int, device_count: int | None = None) -> int:
    """The GPU index this rank uses: ``local_rank % device_count``. Under torchrun every process
    sees all GPUs of the node (index = local rank); under Slurm ``--gpus-per-task`` /
    ``--gpu-bind`` each task sees only its own (index 0), where ``set_device(local_rank)`` would
    fail. Raises when no GPU is visible."""
    count = torch.cuda.device_count() if device_count is None else device_count
    if count < 1:
        raise ConfigError("runtime.backend: 'nccl' but this process sees no GPU "
                          "(check CUDA_VISIBLE_DEVICES and the Slurm --gpus options)")
    return local_rank % count


def init_process_group(runtime: RuntimeConfig, world: WorldInfo | None = None) -> WorldInfo:
    """Initialise torch.distributed once (idempotent); returns the world it joined."""
    world = world or detect_world()
    if dist.is_initialized():
        return WorldInfo(dist.get_rank(), dist.get_world_size(), world.local_rank,
                         world.master_addr, world.master_port, world.launcher)
    backend = resolve_backend(runtime)
    if backend == "nccl":
        torch.cuda.set_device(bind_device(world.local_rank))
    else:
        cpu_compat.apply()
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{world.master_addr}:{world.master_port}",
        rank=world.rank,
        world_size=world.world_size,
        timeout=datetime.timedelta(minutes=runtime.distributed_timeout_minutes),
    )
    return world


def init_model_parallel(parallel: ParallelConfig, runtime: RuntimeConfig) -> None:
    """(Re)build megatron-core parallel_state for ``parallel`` and seed the RNGs."""
    from megatron.core import parallel_state as ps

    world_size = dist.get_world_size()
    dp = parallel.data_parallel_size(world_size)
    etp = parallel.expert_tensor_parallel or parallel.tensor_parallel
    expert_mp = etp * parallel.expert_parallel * parallel.pipeline_parallel
    if world_size % expert_mp:
        raise ConfigError(
            f"parallel.expert_parallel: world size {world_size} is not divisible by "
            f"ETP*EP*PP = {etp}*{parallel.expert_parallel}*{parallel.pipeline_parallel}")
    if (torch.cuda.is_available() and (parallel.tensor_parallel > 1 or parallel.sequence_parallel)
            and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1"):
        log.warning("CUDA_DEVICE_MAX_CONNECTIONS is not 1: tensor/sequence-parallel communication "
                    "will not overlap as megatron-core expects (the clinmega launchers and "
                    "container set it; export it before the process starts)")
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        **parallel.megatron_sizes(),
        distributed_timeout_minutes=runtime.distributed_timeout_minutes,
        create_gloo_process_groups=True,
    )
    set_seed(runtime.seed)
    assert ps.get_data_parallel_world_size() == dp


def set_seed(seed: int) -> None:
    """Seed python/numpy/torch per rank the Megatron way: the default generator gets ``seed +
    100 * pp_rank`` and the tracker gets TP/EP-rank offsets (megatron-core's own seeding)."""
    import random

    import numpy as np
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def initialize(parallel: ParallelConfig, runtime: RuntimeConfig) -> WorldInfo:
    """Process group + parallel state + seeds: the one call every stage makes first."""
    world = init_process_group(runtime)
    init_model_parallel(parallel, runtime)
    return world


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
