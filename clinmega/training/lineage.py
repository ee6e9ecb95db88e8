"""Where a training run's weights and model come from, and what its checkpoints record about it.

A run starts from the checkpoint it resumes (``<checkpoint dir>/latest``) or, failing that, from
``checkpoint.load_weights`` resolved to its newest complete checkpoint. That checkpoint's recorded
model is the run's model when the recipe names no preset (:func:`recorded_model_layer`, used by
``load_experiment``), and any other model is checked against it (:func:`start_source`). The
provenance every saved checkpoint then records: the source checkpoint and its own provenance, the
resolved experiment config, the data manifests' sha256 and the model changes that were allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from clinmega.checkpoints import (
    CheckpointError,
    CheckpointInfo,
    check_model_config,
    iteration_dir,
    read_checkpoint_info,
    read_latest,
    resolve_checkpoint,
)
from clinmega.config import ConfigError
from clinmega.config.loader import peek
from clinmega.models import resolve_transformer_impl

log = logging.getLogger(__name__)
ALLOW_KEY = "checkpoint.allow_config_change"


def start_checkpoint(root: str | Path, resume: bool, load_weights: str | None
                     ) -> tuple[Path | None, bool]:
    """(checkpoint folder the run starts from, whether it is a resume of this run)."""
    step = read_latest(root) if resume else None
    if step is not None:
        return iteration_dir(root, step), True
    if load_weights:
        try:
            return resolve_checkpoint(load_weights), False
        except CheckpointError as err:
            raise ConfigError(f"checkpoint.load_weights: {err}") from None
    return None, False


def recorded_model_layer(sources: Iterable, overrides: Iterable[str]) -> dict | None:
    """``{"model": <recorded fields>}`` of the checkpoint the run would start from, when the user
    names no ``model.preset`` and that checkpoint records its model; else None."""
    from clinmega.training.config import ExperimentConfig

    sources, overrides = list(sources), list(overrides)
    if peek(sources, overrides, "model.preset") is not None:
        return None
    root = (peek(sources, overrides, "checkpoint.dir")
            or Path(peek(sources, overrides, "run_dir", ExperimentConfig.run_dir)) / "checkpoints")
    source, _ = start_checkpoint(root, peek(sources, overrides, "checkpoint.resume", True),
                                 peek(sources, overrides, "checkpoint.load_weights"))
    info = read_checkpoint_info(source) if source is not None else None
    return {"model": dataclasses.asdict(info.model)} if info and info.model else None


@dataclass
class StartSource:
    """The checkpoint a run starts from and the model changes allowed against it."""

    directory: Path | None = None
    resumed: bool = False
    info: CheckpointInfo | None = None
    changes: dict[str, Any] = field(default_factory=dict)


def start_source(cfg, root: Path) -> StartSource:
    """Find the starting checkpoint of ``cfg`` (an ExperimentConfig) and check its model against
    the recorded one: a differing function-changing field not in ``checkpoint.allow_config_change``
    is a :class:`ConfigError` listing every such field with both values."""
    directory, resumed = start_checkpoint(root, cfg.checkpoint.resume, cfg.checkpoint.load_weights)
    if directory is None:
        return StartSource()
    info = read_checkpoint_info(directory)
    if info.model is None:
        log.warning("%s records no model config (not written by clinmega); the model is not "
                    "checked against it", directory)
        return StartSource(directory, resumed, info)
    where = f"resuming from {directory}" if resumed else f"checkpoint.load_weights: {directory}"
    changes = check_model_config(info.model, cfg.model, cfg.checkpoint.allow_config_change,
                                 where, ALLOW_KEY)
    return StartSource(directory, resumed, info, changes)


def data_manifests(data) -> dict[str, str]:
    """sha256 of the manifests of the prepared data a run reads (``data`` is a DataConfig)."""
    from clinmega.data.pretrain import output_paths  # data sits below training; imported when used

    paths = [output_paths(p)["manifest"] for p in data.prefixes] if data.kind == "indexed" else []
    if data.kind == "sft":
        paths += [Path(p) / "manifest.json" for p in (data.sft_path, data.sft_valid_path) if p]
    digests = {}
    for path in paths:
        if path.is_file():
            with open(path, "rb") as f:
                digests[str(path)] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def provenance(cfg, source: StartSource) -> dict[str, Any]:
    """What every checkpoint this run saves records (``step`` is added per save)."""
    parent = source.info.provenance if source.info else None
    record = {
        "kind": "train", "stage": cfg.train.stage,
        "source_checkpoint": str(source.directory.resolve()) if source.directory else None,
        "parent": parent, "config_changes": source.changes,
        "allow_config_change": list(cfg.checkpoint.allow_config_change),
        "data_manifests": data_manifests(cfg.data), "dtype": cfg.precision.dtype,
        "transformer_impl": resolve_transformer_impl(cfg.runtime.transformer_impl),
        "experiment": dataclasses.asdict(cfg),
    }
    if source.resumed and parent:  # the same run continued: keep its origin, not a chain of itself
        record.update(source_checkpoint=parent.get("source_checkpoint"), parent=parent.get("parent"),
                      config_changes={**parent.get("config_changes", {}), **source.changes},
                      resumed_from=str(source.directory.resolve()))
    return record
