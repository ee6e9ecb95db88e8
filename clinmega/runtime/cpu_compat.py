"""Make megatron-core (0.19) run on CPU processes, for tests, CI and the CPU demo.

megatron-core assumes CUDA in a few dozen places. Rather than fork its code, this module applies
a small set of named patches, each of which says which upstream call it works around. It is

* applied only when ``torch.cuda.is_available()`` is false (never on a GPU machine),
* idempotent (applying twice is a no-op), and
* the only place in clinmega that patches upstream code.

The GPU path therefore runs megatron-core untouched; the CPU path runs the same model, schedule,
DDP, optimizer and checkpoint code with these shims underneath. Section comments name the numbered
workarounds of REFERENCE.md §4 (6, sequence-parallel norms without Apex, lives in models/spec.py).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_APPLIED: list[str] = []
_MODE: "CudaToCpuMode | None" = None


@dataclass(frozen=True)
class Patch:
    name: str
    works_around: str
    apply: Callable[[], None]


# --- RNG tracker (REFERENCE.md §4, workaround 1) --------------------------------------------------
def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """The model-parallel RNG tracker, keeping its named states in the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            orig_name = self._current_state_name
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)
                self._current_state_name = orig_name

    # initialize_rng_tracker() instantiates the module-level name CudaRNGStatesTracker.
    mrandom.CudaRNGStatesTracker = CPURNGStatesTracker
    # Activation recompute (CheckpointFunction) and _fork_rng save/restore "the CUDA state".
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    mrandom.initialize_rng_tracker(force_reset=True)


# --- torch.cuda device / stream / sync calls (workarounds 2, 4's streams, 7) ----------------------
def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.current_stream = lambda device=None: torch.cpu.current_stream()
    torch.cuda.stream = torch.cpu.stream
    torch.cuda.synchronize = lambda device=None: None


# --- workaround 3: causal / sliding-window masks hard-coded to device="cuda" ----------------------
def _patch_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    def get_sliding_window_causal_mask(sq, skv, window_size):
        m = torch.ones(sq, skv, dtype=torch.bool)
        mu = torch.triu(m, diagonal=skv - sq - window_size[0])
        return ~torch.tril(mu, diagonal=skv - sq + window_size[1])

    for module in (tutils, fused_softmax):
        module.get_default_causal_mask = get_default_causal_mask
        module.get_sliding_window_causal_mask = get_sliding_window_causal_mask


def _patch_window_mask() -> None:
    from megatron.core.fusions import fused_softmax

    cls = fused_softmax.FusedScaleMaskSoftmax
    original = cls.forward_torch_softmax

    def forward_torch_softmax(self, input, mask, softmax_offset=None):
        """Sliding window AND the explicit mask (a packed block-causal one), not the window alone."""
        if self.window_size is None or mask is None:
            return original(self, input, mask, softmax_offset)
        window = fused_softmax.get_sliding_window_causal_mask(input.size(2), input.size(3),
                                                              self.window_size)
        saved, self.window_size = self.window_size, None
        try:
            return original(self, input, mask | window.to(mask.device), softmax_offset)
        finally:
            self.window_size = saved

    forward_torch_softmax.clinmega_patched = True
    cls.forward_torch_softmax = forward_torch_softmax


def window_keeps_explicit_mask() -> bool:
    """Whether the local attention honours an explicit mask under a sliding window (this patch)."""
    from megatron.core.fusions import fused_softmax

    return getattr(fused_softmax.FusedScaleMaskSoftmax.forward_torch_softmax, "clinmega_patched",
                   False)


# --- workarounds 4 + 5: MoE alltoall dispatcher: CUDA side stream, D2H copies as numpy split sizes ---
def _patch_moe() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    class _CPUStream(torch.cpu.Stream):
        def record_event(self, event=None):
            return torch.cpu.Event()

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        # Upstream converts only CUDA tensors; gloo's all_to_all_single needs python split sizes.
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                return tensor.numpy()
        return tensor

    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _CPUStream()
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


# --- not in REFERENCE.md §4: DistributedOptimizer checkpoint load with torch's Adam (no Apex / TE) ---
def _patch_distributed_optimizer_load() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    sharded_state_dict = DistributedOptimizer.sharded_state_dict
    set_states = DistributedOptimizer._set_main_param_and_optimizer_states

    def sharded_state_dict_with_state(self, model_sharded_state_dict, is_loading=False, **kw):
        # A fresh optimizer has no state yet; without Apex/TE state_dict() asserts one "step".
        if is_loading and self.init_state_fn is not None:
            self.init_state_fn(self.optimizer, self.config)
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    self.optimizer.state[param].setdefault("step", torch.tensor(0.0))
        return sharded_state_dict(self, model_sharded_state_dict, is_loading=is_loading, **kw)

    def set_states_keeping_step(self, model_param, tensors):
        # torch Adam keeps "step" as a tensor in each param's state; the checkpoint's param state
        # has no "step" entry (load_state_dict restores it), so keep the current one.
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group, order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group]["params"][order]
            for key, value in self.optimizer.state[main_param].items():
                if torch.is_tensor(value):
                    tensors.setdefault(key, value)
        return set_states(self, model_param, tensors)

    load_state_dict = DistributedOptimizer.load_state_dict

    def load_state_dict_unshared_step(self, state_dict):
        # Without Apex/TE load_state_dict puts ONE "step" tensor into every param's state; torch
        # Adam increments it in place once per param, so Adam's bias correction runs ahead after
        # a resume. Give each param its own copy.
        load_state_dict(self, state_dict)
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    DistributedOptimizer.load_state_dict = load_state_dict_unshared_step
    DistributedOptimizer.sharded_state_dict = sharded_state_dict_with_state
    DistributedOptimizer._set_main_param_and_optimizer_states = set_states_keeping_step


# --- workaround 8: device="cuda" literals, .cuda(), grad.type() asserts (schedules, DDP, clip_grads) ---
def _to_cpu_device(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, int) and not isinstance(value, bool):
        return "cpu"  # torch.cuda device ordinals
    return value


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments to CPU, ``Tensor.cuda()`` to identity, and answers
    ``Tensor.type()`` with the CUDA type name megatron asserts (optimizer.clip_grads)."""

    _CUDA_TYPE = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                  torch.bfloat16: "torch.cuda.BFloat16Tensor"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = self._CUDA_TYPE.get(args[0].dtype)
            if name is not None:
                return name
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1]), *args[2:])
        return func(*args, **kwargs)


def _patch_function_mode() -> None:
    global _MODE
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # stays active for the life of the process


PATCHES = (
    Patch("rng_tracker", "tensor_parallel.random.CudaRNGStatesTracker/_get_cuda_rng_state "
          "use torch.cuda RNG state", _patch_rng_tracker),
    Patch("torch_cuda", "torch.cuda.current_device/current_stream/stream/synchronize "
          "called by RoPE, p2p, dispatcher, checkpointing", _patch_torch_cuda),
    Patch("causal_masks", "transformer.utils.get_default_causal_mask and "
          "get_sliding_window_causal_mask (and their copies in fusions.fused_softmax) use "
          "device='cuda'", _patch_masks),
    Patch("window_mask", "fusions.fused_softmax.FusedScaleMaskSoftmax.forward_torch_softmax "
          "replaces an explicit attention mask by the sliding-window mask when "
          "config.window_size is set, so packed samples attend across each other (Mistral v0.1)",
          _patch_window_mask),
    Patch("moe_dispatcher", "MoEAlltoAllTokenDispatcher.cuda_dtoh_stream is a CUDA stream and "
          "moe_utils.maybe_move_tensor_to_cpu leaves CPU split sizes as tensors", _patch_moe),
    Patch("distopt_torch_adam_load", "DistributedOptimizer.sharded_state_dict(is_loading=True) "
          "asserts one Adam 'step' before any state exists, load_state_dict shares one 'step' "
          "tensor between all params (torch Adam then increments it once per param), and "
          "_set_main_param_and_optimizer_states looks up 'step' in the loaded param state "
          "(paths taken without Apex/TE)",
          _patch_distributed_optimizer_load),
    Patch("cuda_literals", "pipeline schedules, DDP buffers, clip_grads and optimizer use "
          "device='cuda' literals, .cuda() and grad.type()=='torch.cuda.FloatTensor'",
          _patch_function_mode),
)


def apply() -> list[str]:
    """Apply every patch once when CUDA is absent; returns the names applied so far."""
    if torch.cuda.is_available():
        return []
    for patch in PATCHES:
        if patch.name not in _APPLIED:
            patch.apply()
            _APPLIED.append(patch.name)
            log.debug("cpu_compat: applied %s (works around %s)", patch.name, patch.works_around)
    return list(_APPLIED)


def applied() -> list[str]:
    return list(_APPLIED)


__all__ = ["PATCHES", "apply", "applied", "window_keeps_explicit_mask"]
