"""Base + LoRA adapters from checkpoints: which base a LoRA run trains on, and building/loading a
model from a checkpoint that may be an adapter checkpoint (training resume, the eval backend).

An adapter checkpoint (``provenance["peft"]``, :func:`clinmega.models.lora.peft_record`) holds only
the adapter weights; the base weights come from the base checkpoint the record names. Loads go
through the strict policy of :mod:`clinmega.models.dist_ckpt` with ``part="base"`` (every tensor but
the adapters) and ``part="adapters"`` (exactly the adapters).
"""

from __future__ import annotations

from pathlib import Path

from clinmega.checkpoints import CheckpointInfo
from clinmega.config.errors import ConfigError
from clinmega.models.lora import LoRAConfig, read_peft_record


def lora_base(lora: LoRAConfig, directory: Path | None, info: CheckpointInfo | None,
              resumed: bool) -> Path:
    """The base checkpoint of a LoRA run that starts from ``directory`` (its own checkpoint when
    ``resumed``, else ``checkpoint.load_weights``): a resumed run's record names it (and must hold
    the same ``lora.*`` settings); a new run's base is ``checkpoint.load_weights``, which must be a
    full checkpoint."""
    provenance = info.provenance if info is not None else {}
    if resumed:
        record = read_peft_record(provenance, f"resuming from {directory}")
        if record is None:
            raise ConfigError(f"train.peft=lora: resuming from {directory}, a full fine-tuning "
                              "checkpoint; start the LoRA run in a new run_dir / checkpoint.dir "
                              "with checkpoint.load_weights pointing at it")
        saved, base = record
        if saved != lora:
            raise ConfigError(f"lora: resuming from {directory}, trained with lora={vars(saved)}; "
                              f"this run has lora={vars(lora)}")
        return base
    if directory is None:
        raise ConfigError("train.peft=lora: needs checkpoint.load_weights (the base checkpoint "
                          "the adapters are trained on)")
    if read_peft_record(provenance, f"checkpoint.load_weights: {directory}") is not None:
        raise ConfigError(f"checkpoint.load_weights: {directory} is a LoRA adapter checkpoint; "
                          "adapters train on a full checkpoint (merge these first: export-hf)")
    return Path(directory)


def build_checkpoint_model(info: CheckpointInfo, model, parallel, precision, runtime,
                           **overrides) -> list:
    """The model chunks of this rank (``clinmega.models.build_model``) holding the weights of the
    checkpoint ``info``: a full checkpoint loads directly; an adapter checkpoint gets LoRA applied
    (its recorded settings), then the base weights of the checkpoint it names, then its adapters."""
    from clinmega.models import build_model
    from clinmega.models.dist_ckpt import load_model_weights
    from clinmega.models.lora_layers import apply_lora, lora_transformer_overrides

    record = read_peft_record(info.provenance, str(info.directory))
    if record is None:
        chunks = build_model(model, parallel, precision, runtime, **overrides)
        load_model_weights(chunks, info.directory)
        return chunks
    lora, base = record
    chunks = build_model(model, parallel, precision, runtime,
                         **{**overrides, **lora_transformer_overrides(model.is_moe)})
    apply_lora(chunks, lora, runtime.seed)
    load_model_weights(chunks, base, part="base")
    load_model_weights(chunks, info.directory, part="adapters")
    return chunks
