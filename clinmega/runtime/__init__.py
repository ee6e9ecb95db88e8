"""Runtime: process groups (NCCL on GPU, gloo on CPU), megatron-core parallel state, seeding, and
the CPU compatibility layer for megatron-core. Names are exported lazily (torch loads on first use)."""

from typing import TYPE_CHECKING

from clinmega.utils.lazy import lazy_exports

_NAMES = ("WorldInfo", "detect_world", "device", "init_model_parallel", "init_process_group",
          "initialize", "resolve_backend", "set_seed", "shutdown")
__all__ = list(_NAMES)
__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(_NAMES, "clinmega.runtime.distributed"))

if TYPE_CHECKING:
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
