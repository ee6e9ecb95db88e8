"""LoRA on megatron-core's linear layers: the configuration and the checkpoint contract.

This module is the one home of what every LoRA consumer agrees on (training, checkpoints, the
Megatron eval backend, ``export-hf`` merged and ``--adapter-only``, the planner):

* **Targets** are megatron-core module names: ``linear_qkv``, ``linear_proj``, ``linear_fc1``,
  ``linear_fc2``. In a MoE layer ``linear_fc1``/``linear_fc2`` mean every expert's (one adapter per
  expert); the router, norms, embeddings and output layer are never adapted.
* **Math.** For a linear ``y = W x`` with ``W`` of shape ``[out, in]`` (megatron layout, the full
  unsharded tensor), the adapter is ``A: [rank, in]`` and ``B: [rank->out] = [out, rank]`` and
  ``y = W x + scale * B (A dropout(x))`` with ``scale = alpha / rank``. The merged weight is
  ``W + scale * B @ A`` (:func:`delta`). ``B`` starts at zero, so step 0 is the base model.
* **Parameter names.** The adapters are child modules ``lora_a`` and ``lora_b`` of the adapted
  linear, so the base weight keeps its name and the adapter weights are
  ``<linear>.lora_a.weight`` and ``<linear>.lora_b.weight`` (:func:`adapter_key`). Checkpoint
  (sharded) keys follow the base weight's sharded key the same way, e.g.
  ``decoder.layers.self_attention.linear_qkv.lora_b.weight`` and
  ``decoder.layers.mlp.experts.experts.linear_fc1.lora_a.weight``, with the same leading
  layer / expert axes as the base weight in the global tensor.
* **Tensor parallelism.** Column-parallel linears (``linear_qkv``, ``linear_fc1``): ``A`` is
  replicated, ``B`` is split along dim 0 exactly like ``W`` (so the q/k/v interleave of
  ``linear_qkv`` and the [gate; up] halves of ``linear_fc1`` apply to ``B``'s rows as they apply to
  ``W``'s rows). Row-parallel linears (``linear_proj``, ``linear_fc2``): ``A`` is split along dim 1
  like ``W``, ``B`` is replicated. The global checkpoint tensors are therefore the unsharded
  ``A``/``B`` of the math above whatever the layout.

The nn.Modules (adapters on megatron-core's and Transformer Engine's linears, freezing) are in
:mod:`clinmega.models.lora_layers`; building a model from an adapter checkpoint (base found through
its record, then the adapters) and a LoRA run's base are in :mod:`clinmega.models.lora_model`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from clinmega.checkpoints import METADATA_FILE, CheckpointError
from clinmega.config.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where the math runs: the config layer imports this module
    import torch

TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1")  # B split like W (dim 0); A replicated
ROW_PARALLEL = ("linear_proj", "linear_fc2")     # A split like W (dim 1); B replicated
ADAPTERS = ("lora_a", "lora_b")


@dataclass
class LoRAConfig:
    """``lora.*``: rank, alpha, dropout and target modules of the adapters."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: list(TARGETS))

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank: must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ConfigError(f"lora.targets: {unknown or self.targets} not a non-empty subset "
                              f"of {list(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_of(name: str) -> str | None:
    """The target a module or parameter name belongs to ('...linear_qkv.weight' -> 'linear_qkv')."""
    parts = name.split(".")
    for part in reversed(parts):
        if part in TARGETS:
            return part
    return None


def is_adapter_key(key: str) -> bool:
    """True for adapter weights/keys (``...lora_a.weight``, ``...lora_b.weight{e}``)."""
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] in ADAPTERS


def adapter_key(base_weight_key: str, which: str) -> str:
    """``...linear_qkv.weight`` -> ``...linear_qkv.lora_a.weight`` (``which`` = lora_a | lora_b).

    TE grouped expert weights keep their expert suffix: ``...linear_fc1.weight3`` ->
    ``...linear_fc1.lora_a.weight3``.
    """
    if which not in ADAPTERS:
        raise ValueError(f"which must be one of {ADAPTERS}, got {which!r}")
    head, sep, tail = base_weight_key.rpartition(".")
    if not sep or not tail.startswith("weight"):
        raise ValueError(f"{base_weight_key!r} is not a weight key")
    return f"{head}.{which}.{tail}"


def base_key(adapter_weight_key: str) -> str:
    """Inverse of :func:`adapter_key`."""
    parts = adapter_weight_key.split(".")
    if len(parts) < 2 or parts[-2] not in ADAPTERS:
        raise ValueError(f"{adapter_weight_key!r} is not an adapter key")
    return ".".join(parts[:-2] + parts[-1:])


def delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """The weight update ``scale * B @ A`` (fp32 math, returned in ``b``'s dtype).

    Leading axes (layers, experts) broadcast: ``a`` ``[..., rank, in]``, ``b`` ``[..., out, rank]``.
    """
    import torch

    if a.shape[-2] != b.shape[-1]:
        raise ValueError(f"LoRA rank mismatch: A {tuple(a.shape)} vs B {tuple(b.shape)}")
    return (torch.matmul(b.float(), a.float()) * scale).to(b.dtype)


def adapter_parameter_count(shapes: Sequence[tuple[int, int]], rank: int) -> int:
    """Adapter parameters for adapted linears of full shapes ``[(out, in), ...]``."""
    return sum(rank * (out + inp) for out, inp in shapes)


# --- the adapter checkpoint's record ------------------------------------------------------------
# A LoRA run's ``iter_*`` is a megatron-core dist checkpoint that holds only the adapter weights
# (keys per :func:`adapter_key`) and their optimizer state; its clinmega_checkpoint.json describes
# the *base* model (``model``) and carries ``provenance["peft"]`` = :func:`peft_record`: the LoRA
# settings and the base checkpoint (absolute path of its resolved ``iter_*``/import folder and the
# sha256 of the base's clinmega_checkpoint.json, so a moved or rewritten base is detected).
PEFT_KEY = "peft"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def peft_record(cfg: LoRAConfig, base_dir) -> dict:
    """``provenance["peft"]`` of an adapter checkpoint trained on the base checkpoint ``base_dir``."""
    base_dir = Path(base_dir).resolve()
    meta = base_dir / METADATA_FILE
    return {"method": "lora",
            "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "dropout": cfg.dropout,
                     "targets": list(cfg.targets)},
            "base": {"path": str(base_dir),
                     "description_sha256": _sha256(meta) if meta.is_file() else None}}


def read_peft_record(provenance: dict, where: str):
    """``(LoRAConfig, base_dir)`` of an adapter checkpoint, or None for a full checkpoint.

    Raises CheckpointError naming ``where`` when the record is malformed, the base is gone, or the
    base's description changed since the adapters were trained.
    """
    record = provenance.get(PEFT_KEY)
    if not record:
        return None
    try:
        cfg = LoRAConfig(**record["lora"])
        base = Path(record["base"]["path"])
        sha = record["base"].get("description_sha256")
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{where}: invalid LoRA record in the provenance: {err!r}") from None
    if not base.is_dir():
        raise CheckpointError(f"{where}: LoRA base checkpoint {base} does not exist (moved or "
                              "deleted?); the adapters need the base they were trained on")
    meta = base / METADATA_FILE
    if sha is not None and (not meta.is_file() or _sha256(meta) != sha):
        raise CheckpointError(f"{where}: LoRA base checkpoint {base} has changed since the adapters "
                              f"were trained ({METADATA_FILE} sha256 differs)")
    return cfg, base
