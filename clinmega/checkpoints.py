"""What a clinmega checkpoint folder holds besides tensors, and how to find the newest complete one.

Every checkpoint clinmega writes (an ``import-hf`` output, every training ``iter_*``) describes
itself, so later stages take just a path::

    <checkpoint>/
      metadata.json, *.distcp, common.pt   megatron-core torch_dist tensors (metadata.json is written last)
      clinmega_checkpoint.json             {"model": ModelConfig fields, "provenance": {...}}
      hf_assets/                           config.json (the HF config the model maps to), tokenizer and
                                           generation_config files (copied forward stage to stage)

A training run's checkpoint root adds ``latest`` (clinmega) and ``latest_checkpointed_iteration.txt``
(Megatron-LM's tracker), both holding the newest complete step. :func:`resolve_checkpoint` turns a run
directory, a checkpoint root or one checkpoint folder into that newest complete checkpoint; a folder
still being written (``*.tmp``, ``*.incomplete``, or without megatron-core's ``metadata.json``) is never
returned. :func:`check_model_config` refuses a model that differs from the recorded one in a field that
changes the function unless the field is explicitly allowed.

Only the standard library and ``clinmega.config`` are imported at module level (no torch).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig
from clinmega.utils.atomic import write_json_atomic, write_text_atomic

METADATA_FILE = "clinmega_checkpoint.json"
LEGACY_INFO_FILE = "clinmega_conversion.json"  # what import-hf wrote before METADATA_FILE existed
ASSETS_DIR = "hf_assets"
HF_CONFIG = "config.json"
LATEST = "latest"                                  # clinmega's pointer: the newest complete step
TRACKER = "latest_checkpointed_iteration.txt"      # Megatron-LM's: the same step (or "release")
DIST_MARKER = "metadata.json"                      # megatron-core writes it when a save is finished
RUN_CHECKPOINTS = "checkpoints"                    # a run directory's checkpoint root
INCOMPLETE_SUFFIXES = (".tmp", ".incomplete")
# The tokenizer / generation files carried in ASSETS_DIR (HF names).
ASSET_FILES = ("generation_config.json", "tokenizer.model", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "tekken.json", "chat_template.jinja", "chat_template.json")
# ModelConfig fields that do not change the function a checkpoint computes (labels, initialisation,
# a training-loss coefficient, the position limit of RoPE models). Every other field does, including
# fields added later: a new field is checked unless it is listed here.
NON_FUNCTIONAL_FIELDS = ("name", "init_method_std", "moe_aux_loss_coeff", "max_position_embeddings")
_ITER = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ConfigError):
    """A checkpoint path or its description is unusable; the message names the file."""


# --- where the newest complete checkpoint is ----------------------------------------------------
def iteration_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def is_complete(directory: str | Path) -> bool:
    """A finished checkpoint folder: not a staging name, and megatron-core's marker is present."""
    directory = Path(directory)
    return (directory.is_dir() and not directory.name.endswith(INCOMPLETE_SUFFIXES)
            and (directory / DIST_MARKER).is_file())


def _read_step(path: Path) -> int | str:
    text = path.read_text().strip()
    if text == "release" and path.name == TRACKER:
        return text
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected a step number, found {text!r}")
    return int(text)


def read_latest(root: str | Path) -> int | None:
    """The step in ``<root>/latest`` (else Megatron-LM's tracker); None when there is neither.
    The step's folder must be complete."""
    root = Path(root)
    for name in (LATEST, TRACKER):
        path = root / name
        if path.is_file():
            step = _read_step(path)
            if step == "release":
                raise CheckpointError(f"{path}: a Megatron-LM 'release' checkpoint; pass "
                                      f"{root / 'release'} itself")
            if not is_complete(iteration_dir(root, step)):
                raise CheckpointError(f"{path} says {step} but {iteration_dir(root, step)} is "
                                      "missing or incomplete")
            return step
    return None


def publish_latest(root: str | Path, step: int) -> None:
    """Point ``latest`` and Megatron-LM's tracker at ``step`` (each replaced atomically)."""
    for name in (LATEST, TRACKER):
        write_text_atomic(Path(root) / name, f"{step}\n")


def iteration_steps(root: str | Path) -> list[int]:
    """Steps of the ``iter_*`` folders under ``root`` (complete or not), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := _ITER.match(p.name)))


def resolve_checkpoint(path: str | Path) -> Path:
    """The newest complete checkpoint that ``path`` names: a run directory (``<run>/checkpoints``),
    a checkpoint root (``latest``, or Megatron-LM's tracker), or one checkpoint folder (an ``iter_*``
    or an ``import-hf`` output). Without a pointer file the newest complete ``iter_*`` is taken."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint, checkpoint root or run directory")
    if path.name.endswith(INCOMPLETE_SUFFIXES):
        raise CheckpointError(f"{path}: a checkpoint still being written (or left by a killed "
                              "job); pass its run directory to use the newest complete one")
    if (path / DIST_MARKER).is_file():
        return path
    for root in (path, path / RUN_CHECKPOINTS):
        step = read_latest(root)
        if step is not None:
            return iteration_dir(root, step)
        complete = [s for s in iteration_steps(root) if is_complete(iteration_dir(root, s))]
        if complete:
            return iteration_dir(root, complete[-1])
    raise CheckpointError(f"{path}: not a megatron-core distributed checkpoint, nor a checkpoint "
                          f"root or run directory holding a complete one (no {DIST_MARKER}, no "
                          f"{LATEST}/{TRACKER}, no finished iter_* folder, here or in "
                          f"{RUN_CHECKPOINTS}/)")


# --- what a checkpoint describes ----------------------------------------------------------------
@dataclass
class CheckpointInfo:
    """A checkpoint's self-description (``model`` None for a checkpoint written elsewhere)."""

    directory: Path
    model: ModelConfig | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def assets(self) -> Path | None:
        """The tokenizer / generation / HF config folder, when the checkpoint carries one."""
        folder = self.directory / ASSETS_DIR
        return folder if folder.is_dir() else None

    @property
    def has_tokenizer(self) -> bool:
        return self.assets is not None and any(
            (self.assets / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tekken.json"))


def model_config_from_dict(fields: dict[str, Any], where: str) -> ModelConfig:
    try:
        return ModelConfig(**fields)
    except (TypeError, ConfigError) as err:
        raise CheckpointError(f"{where}: invalid model description: {err}") from None


def read_checkpoint_info(directory: str | Path) -> CheckpointInfo:
    """The description in a checkpoint folder (as written by :func:`write_checkpoint_info`, or the
    older ``clinmega_conversion.json``); a folder without one yields ``model=None``."""
    directory = Path(directory)
    for name in (METADATA_FILE, LEGACY_INFO_FILE):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
            fields = data["model"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: invalid checkpoint description: {err!r}") from None
        provenance = data.get("provenance") or {k: v for k, v in data.items()
                                                if k not in ("model", "format")}
        return CheckpointInfo(directory, model_config_from_dict(fields, str(path)), provenance)
    return CheckpointInfo(directory)


def copy_assets(source: str | Path | None, dest: str | Path,
                names: Iterable[str] = ASSET_FILES) -> list[str]:
    """Copy the tokenizer / generation-config files present in ``source``; returns their names."""
    if source is None:
        return []
    source, dest = Path(source), Path(dest)
    copied = []
    for name in names:
        if (source / name).is_file():
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


def write_checkpoint_info(directory: str | Path, model: ModelConfig, provenance: dict[str, Any],
                          assets_from: str | Path | None = None, torch_dtype: str = "bfloat16") -> None:
    """Describe the checkpoint being written in ``directory`` (a staging folder: the caller renames
    it when complete): ``hf_assets/`` with the HF config ``model`` maps to and the tokenizer files
    of ``assets_from`` (a HF folder or another checkpoint's ``hf_assets``), then the description."""
    from clinmega.models.hf import to_hf_config  # models sit above config; keep this import cheap

    directory = Path(directory)
    assets = directory / ASSETS_DIR
    if assets_from is not None and Path(assets_from).resolve() != assets.resolve():
        copy_assets(assets_from, assets)
    assets.mkdir(parents=True, exist_ok=True)
    write_json_atomic(assets / HF_CONFIG, to_hf_config(model, torch_dtype=torch_dtype))
    write_json_atomic(directory / METADATA_FILE, {
        "format": "megatron-core torch_dist checkpoint written by clinmega",
        "model": dataclasses.asdict(model), "provenance": provenance})


# --- is the model the one the checkpoint was trained as -----------------------------------------
def config_differences(recorded: ModelConfig, wanted: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """Function-changing fields whose values differ: ``{field: (recorded, wanted)}``."""
    old, new = dataclasses.asdict(recorded), dataclasses.asdict(wanted)
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in NON_FUNCTIONAL_FIELDS and old.get(k) != new.get(k)}


def check_model_config(recorded: ModelConfig, wanted: ModelConfig, allowed: Iterable[str],
                       where: str, allow_key: str) -> dict[str, dict[str, Any]]:
    """Refuse ``wanted`` if it differs from the checkpoint's ``recorded`` model in a function-changing
    field not in ``allowed``; returns the allowed changes (``{field: {"checkpoint": a, "now": b}}``)
    for the provenance. ``allow_key`` is the config key that lists deliberate changes."""
    allowed = list(allowed)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = [a for a in allowed if a not in known]
    if unknown:
        raise ConfigError(f"{allow_key}: {unknown} are not model fields; known: {sorted(known)}")
    diffs = config_differences(recorded, wanted)
    refused = {k: v for k, v in diffs.items() if k not in allowed}
    if refused:
        lines = "; ".join(f"model.{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in refused.items())
        raise ConfigError(
            f"{where}: the model differs from the one this checkpoint was saved as: {lines}. "
            f"Drop these model settings to use the checkpoint's, or list deliberate changes in "
            f"{allow_key}=[{','.join(refused)}]")
    return {k: {"checkpoint": a, "now": b} for k, (a, b) in diffs.items()}
