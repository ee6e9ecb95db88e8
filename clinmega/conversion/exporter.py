"""megatron-core distributed checkpoint -> HF folder (sharded safetensors, config, tokenizer).

One mapping unit (a layer's tensor, or one expert's) is read from the checkpoint at a time into
one of two reused buffers, and its HF tensors (``hf_views``) are appended from there to a
streaming safetensors writer without intermediate copies, so peak memory is about two of the
largest single tensor whatever the model size. Runs on one process, no process group.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from clinmega.checkpoints import METADATA_FILE, CheckpointInfo, copy_assets
from clinmega.config.schema import ModelConfig
from clinmega.conversion import dtypes, staging
from clinmega.conversion.checkpoint_info import resolve_described
from clinmega.conversion.dist_io import DistCheckpointReader
from clinmega.conversion.errors import ConversionError
from clinmega.conversion.hf_io import PlannedTensor, SafetensorsWriter, write_json
from clinmega.conversion.lora_export import Adapters, open_lora
from clinmega.conversion.mapping import (EXPERT, LAYER, MODEL_PREFIXES, Mapping, Unit, VocabRows,
                                         mapping_table, units)
from clinmega.conversion.prefetch import Prefetcher, ReusedBuffers
from clinmega.conversion.progress import Summary, Tracker
from clinmega.models.hf import to_hf_config

MAX_TP = 64  # largest tensor-parallel size whose vocabulary padding export recognises


def _padded_sizes(cfg: ModelConfig) -> set[int]:
    """Row counts the embedding / output layer of ``cfg`` has at TP 1..MAX_TP. Anything else
    (e.g. a checkpoint with added tokens exported with the source's config) is refused rather than
    cut to ``vocab_size`` rows."""
    return {cfg.padded_vocab_size(tp) for tp in range(1, MAX_TP + 1)}



def _check_recorded_vocabulary(info: CheckpointInfo, cfg: ModelConfig) -> None:
    """A config whose vocabulary differs from the one the checkpoint recorded would export a cut
    (or padded) vocabulary: e.g. the source model's config for a checkpoint with added tokens."""
    if info.model is None or info.model.vocab_size == cfg.vocab_size:
        return
    raise ConversionError(
        f"{info.directory / METADATA_FILE}: the checkpoint's vocabulary has "
        f"{info.model.vocab_size} tokens (model.vocab_size), the model config given has "
        f"vocab_size={cfg.vocab_size}; export without --config/--preset to use the recorded one")


def stored_keys(reader: DistCheckpointReader, cfg: ModelConfig,
                table: list[Mapping]) -> dict[Mapping, str]:
    """The checkpoint key of each mapping (local or TE spec), shapes checked against ``cfg``.

    The embedding and output layer may hold more rows than ``cfg.vocab_size`` (the padding of the
    layout they were saved at); export reads the first ``vocab_size`` rows."""
    keys = {}
    for m in table:
        key = next((k for k in (m.key, m.te_key) if k and k in reader.tensors), None)
        if key is None:
            raise ConversionError(f"{reader.directory}: tensor {m.key!r} is missing (a {cfg.arch}"
                                  " checkpoint must hold it)")
        lead = {LAYER: (cfg.num_layers,), EXPERT: (cfg.num_layers, cfg.num_experts)}
        expected = lead.get(m.scope, ()) + m.shape
        stored = reader.shape(key)
        padded = (isinstance(m, VocabRows) and stored[1:] == expected[1:]
                  and stored[0] in _padded_sizes(cfg))
        if stored != expected and not padded:
            raise ConversionError(
                f"{reader.directory}: tensor {key!r} has shape {list(stored)}, the model config "
                f"implies {list(expected)}" + (
                    f" (or {cfg.vocab_size} padded for a tensor-parallel size <= {MAX_TP}: "
                    f"{sorted(_padded_sizes(cfg))[:4]} ...; is model.vocab_size / "
                    "make_vocab_size_divisible_by the checkpoint's?)"
                    if isinstance(m, VocabRows) else ""))
        keys[m] = key
    unexpected = sorted(k for k in reader.tensors
                        if k.startswith(MODEL_PREFIXES) and k not in keys.values())
    if unexpected:
        raise ConversionError(f"{reader.directory}: unexpected model tensor(s) {unexpected[:5]} "
                              f"(not part of a {cfg.arch} model)")
    return keys


def export_hf(ckpt_dir: str | Path, out_dir: str | Path, model: ModelConfig | None = None,
              dtype: str | None = None, *, allow_downcast: bool = False,
              assets: str | Path | None = None, overwrite: bool = False,
              max_shard_bytes: int = 5 * 10**9, progress: bool = True) -> Summary:
    """Write the model in distributed checkpoint ``ckpt_dir`` as a HF folder ``out_dir``.

    ``ckpt_dir`` may be a run directory or checkpoint root: its newest complete checkpoint is
    exported. ``model`` defaults to the config the checkpoint records; ``dtype`` to the stored
    embedding dtype; tokenizer and generation config come from ``assets`` or the checkpoint's
    ``hf_assets``; its provenance is kept as ``clinmega_checkpoint.json``. A LoRA run's checkpoint
    (adapters only) exports its base checkpoint's weights with the adapters merged
    (:mod:`clinmega.conversion.lora_export`), the base's tokenizer and the run's provenance.
    """
    info = resolve_described(ckpt_dir)
    lora = open_lora(info)  # a LoRA run: the base's weights plus the adapters, merged
    weights = lora.base if lora else info
    ckpt_dir, out_dir = info.directory, Path(out_dir)
    reader = DistCheckpointReader(weights.directory)
    if model is None and info.model is None:
        raise ConversionError(f"{ckpt_dir}: records no model config (not written by clinmega); "
                              "pass the model's HF config (--config) or a preset (--preset)")
    cfg = model or info.model
    _check_recorded_vocabulary(info, cfg)
    table = mapping_table(cfg)
    keys = stored_keys(reader, cfg, table)
    adapters = Adapters(lora, cfg, table) if lora else None
    out_dtype = dtypes.parse(dtype) or reader.dtype(keys[table[0]])
    dtypes.name_of(out_dtype, str(ckpt_dir))
    plan = units(cfg, table)
    planned = [PlannedTensor(name, shape, out_dtype) for u in plan
               for name, shape in zip(u.hf_names, u.mapping.hf_shapes)]
    if assets is None:
        assets = weights.assets
    elif not Path(assets).is_dir():
        raise ConversionError(f"{assets}: tokenizer/assets folder does not exist")
    tracker = Tracker(f"export {ckpt_dir.name}", str(out_dir),
                      sum(t.nbytes for t in planned), show=progress)
    try:
        with staging.staged(out_dir, overwrite) as tmp:
            writer = SafetensorsWriter(tmp, planned, max_shard_bytes)

            # Two buffers in turn: unit i+1 is read into one while unit i, in the other, is
            # written; so no unit is read into freshly allocated memory.
            buffers = ReusedBuffers(2, ((u.mapping.shape, reader.dtype(keys[u.mapping]))
                                        for u in plan))

            def read(turn: tuple[int, Unit]) -> torch.Tensor:
                position, unit = turn
                key, shape, index = keys[unit.mapping], unit.mapping.shape, unit.index
                lead = (1,) * len(index)
                out = buffers.tensor(position, lead + shape, reader.dtype(key))
                full = reader.read(key, index + (0,) * len(shape), lead + shape,
                                   out=out).reshape(shape)
                if adapters is not None:
                    adapters.merge(unit, full)
                return full

            order = list(enumerate(plan))
            with Prefetcher(read, order) as prefetch:  # read the next unit while writing this one
                for position, unit in order:
                    full = prefetch.get((position, unit))
                    for name, tensor in zip(unit.hf_names, unit.mapping.hf_views(full)):
                        tensor = dtypes.cast(tensor, out_dtype, name, allow_downcast)
                        tracker.advance(name, writer.write(name, tensor))
                    del full
            writer.close()
            hf_config = to_hf_config(cfg, torch_dtype=dtypes.HF_NAMES[out_dtype])
            write_json(tmp / "config.json", hf_config)
            copied = copy_assets(assets, tmp)
            if (ckpt_dir / METADATA_FILE).is_file():  # where the weights came from
                shutil.copy2(ckpt_dir / METADATA_FILE, tmp / METADATA_FILE)
            if "generation_config.json" not in copied:
                write_json(tmp / "generation_config.json",
                           {"bos_token_id": hf_config["bos_token_id"],
                            "eos_token_id": hf_config["eos_token_id"]})
    finally:
        summary = tracker.finish()
    return summary
