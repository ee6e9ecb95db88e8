"""Runtime: process groups (NCCL on GPU, gloo on CPU), megatron-core parallel state, seeding, and
the CPU compatibility layer for megatron-core."""

from clinmega.runtime.distributed import (
    WorldInfo,
    detect_world,
    device,
    init_model_parallel,
    init_process_group,
    initialize,
    resolve_backend,
    set_seed,
    shutdown,
)

__all__ = [
    "WorldInfo", "detect_world", "device", "init_model_parallel", "init_process_group",
    "initialize", "resolve_backend", "set_seed", "shutdown",
]
