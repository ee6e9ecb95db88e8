"""HF folder -> megatron-core distributed checkpoint, streamed one tensor at a time.

The target model is built on the meta device (no memory) at the target layout; its own
``sharded_state_dict()`` fixes every checkpoint key, shard and object, and each shard's data is
made from the HF tensors only when torch's checkpoint writer asks for it (see ``dist_io``). On one
process the layout written is TP1/PP1/EP1 - the format stores global tensors, so it loads at any
layout; the requested layout is still checked against the model. On N ranks (torchrun, Slurm or
``run_local_group``) every rank builds its part of the requested layout and writes its own shards.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.dist_checkpointing.mapping import is_main_replica

from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig, ParallelConfig, PrecisionConfig, RuntimeConfig
from clinmega.conversion import dtypes, staging
from clinmega.checkpoints import ASSETS_DIR, copy_assets, write_checkpoint_info
from clinmega.conversion.added_tokens import ExtendedTokenizer, extend_tokenizer
from clinmega.conversion.checkpoint_info import hf_model_config
from clinmega.conversion.dist_io import save_produced
from clinmega.conversion.errors import ConversionError
from clinmega.conversion.hf_io import HFReader
from clinmega.conversion.mapping import Mapping, mapping_table, units
from clinmega.conversion.prefetch import Prefetcher, ReusedBuffers, exact_storage
from clinmega.conversion.progress import Summary, Tracker
from clinmega.models import build_model, check_layout, resolve_transformer_impl
from clinmega.models.dist_ckpt import model_sharded_state_dict
from clinmega.runtime import init_model_parallel, init_process_group

# Buffers some HF checkpoints carry that are recomputed from the config, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def validate_hf(reader: HFReader, cfg: ModelConfig, table: list[Mapping]) -> None:
    """Every tensor the config implies is present with its shape, and nothing else."""
    expected = {name: shape for unit in units(cfg, table)
                for name, shape in zip(unit.hf_names, unit.mapping.hf_shapes)}
    missing = [n for n in expected if n not in reader.tensors]
    if missing:
        raise ConversionError(
            f"{reader.folder}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            f" ({len(missing)} of {len(expected)} that config.json implies)")
    for name, shape in expected.items():
        info = reader.tensors[name]
        if info.shape != shape:
            raise ConversionError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"config.json implies {list(shape)}")
        if info.dtype not in dtypes.NAMES:
            raise ConversionError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; only "
                                  "fp32/bf16/fp16 weights are supported")
    for name, info in reader.tensors.items():
        if name not in expected and not name.endswith(IGNORED_SUFFIXES):
            raise ConversionError(f"{info.file}: unexpected tensor {name!r} (not part of a "
                                  f"{cfg.arch} model with this config.json)")


class _Producer:
    """Makes checkpoint chunks from HF tensors, one mapping unit (layer, expert) at a time. Each
    HF tensor is read straight into its place in the unit's megatron tensor (``hf_views``), in
    one of two reused buffers: the next unit is read into one while the current one, in the
    other, is written."""

    def __init__(self, reader: HFReader, by_key: dict[str, Mapping], allow_downcast: bool,
                 tracker: Tracker):
        self.reader, self.by_key = reader, by_key
        self.allow_downcast, self.tracker = allow_downcast, tracker
        self._prefetch: Prefetcher | None = None
        self._buffers: ReusedBuffers | None = None
        self._order: list[tuple] = []
        self._position = -1
        self._unit: tuple | None = None
        self._full: torch.Tensor | None = None

    def _unit_of(self, key: str, offsets: tuple[int, ...], dtype: torch.dtype) -> tuple:
        return key, offsets[:self.by_key[key].scope], dtype

    def _make(self, turn: tuple[int | None, tuple]) -> torch.Tensor:
        """The full (unsharded) megatron tensor of one unit, in the checkpoint dtype: in buffer
        ``position``, or in new memory when the position is None."""
        position, (key, lead, dtype) = turn
        mapping = self.by_key[key]
        full = (torch.empty(mapping.shape, dtype=dtype) if position is None else
                self._buffers.tensor(position, mapping.shape, dtype))
        for name, view in zip(mapping.hf_names(*lead), mapping.hf_views(full), strict=True):
            self.reader.read_into(name, view, self.allow_downcast)
        mapping.init_rows(full)  # added-token and padding rows of the vocabulary tensors
        return full

    def expect(self, chunks) -> None:
        order = []
        for chunk in chunks:
            unit = self._unit_of(*chunk)
            if not order or order[-1] != unit:
                order.append(unit)
        self.close()
        self._order, self._position = order, -1
        self._buffers = ReusedBuffers(2, ((self.by_key[key].shape, dtype)
                                          for key, _, dtype in order))
        self._prefetch = Prefetcher(self._make, list(enumerate(order)))

    def __call__(self, key, offsets, sizes, dtype) -> torch.Tensor:
        unit = self._unit_of(key, offsets, dtype)
        if self._unit != unit:
            self._full = None  # release the previous unit before taking the next
            following = self._position + 1
            if following < len(self._order) and self._order[following] == unit:
                self._position, turn = following, (following, unit)
            else:  # not where the plan announced it: made apart, in new memory
                turn = (None, unit)
            self._full = self._prefetch.get(turn) if self._prefetch else self._make(turn)
            self._unit = unit
        scope = self.by_key[key].scope
        region = self._full
        for dim, (start, size) in enumerate(zip(offsets[scope:], sizes[scope:])):
            region = region.narrow(dim, start, size)
        region = region.reshape(sizes)
        if region.is_contiguous():  # e.g. the gate or up half of fc1: saved without a clone
            region = exact_storage(region)
        self.tracker.advance(key, region.nbytes)
        return region

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None
        self._full = self._unit = self._buffers = None


def _sharded_target(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype,
                    by_key: dict[str, Mapping], impl: str) -> dict:
    """The target model's sharded state dict, on the meta device, keyed for ``impl``."""
    precision = PrecisionConfig(dtype=dtypes.name_of(dtype, "--dtype"))
    # The local spec builds on any machine; checkpoint keys differ from TE's only where the
    # mapping table says so (te_key), and those are renamed below.
    with torch.device("meta"):
        chunks = build_model(cfg, parallel, precision, RuntimeConfig(transformer_impl="local"),
                             perform_initialization=False, use_cpu_initialization=True)
    sharded = model_sharded_state_dict(chunks)
    apply_factories(sharded)
    local_keys = {m.key: m.ckpt_key(impl) for m in by_key.values()}
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor):
            if sh.key not in local_keys:
                raise ConversionError(f"model tensor {sh.key!r} has no HF mapping")
            sh.key = local_keys[sh.key]
    return sharded


def _local_bytes(sharded: dict) -> int:
    """Bytes this rank writes (main replicas only: megatron-core drops the others)."""
    return sum(sh.data.numel() * sh.data.element_size() for sh in nested_values(sharded)
               if isinstance(sh, ShardedTensor) and is_main_replica(sh.replica_id))


def _write_extended_assets(source: Path, assets: Path, extended: ExtendedTokenizer) -> None:
    """The extended tokenizer (``save_pretrained``) instead of the source's tokenizer files, which
    would shadow the added tokens, and the source's generation config; config.json (with the new
    vocab_size) is written with the checkpoint's description."""
    assets.mkdir(parents=True, exist_ok=True)
    extended.tokenizer.save_pretrained(str(assets))
    copy_assets(source, assets, ("generation_config.json",))


def import_hf(hf_dir: str | Path, out_dir: str | Path, parallel: ParallelConfig | None = None,
              dtype: str | None = None, *, allow_downcast: bool = False,
              allow_pickle: bool = False, overwrite: bool = False,
              transformer_impl: str = "auto", progress: bool = True,
              runtime: RuntimeConfig | None = None, add_tokens: Sequence[str] = (),
              add_special_tokens: Sequence[str] = (),
              tokenizer: str | Path | None = None) -> Summary:
    """Convert the HF model in ``hf_dir`` into a megatron-core distributed checkpoint at
    ``out_dir`` loadable at ``parallel`` (and any other layout). The checkpoint describes itself
    (``clinmega.checkpoints``): model config, HF config, the tokenizer files of ``tokenizer`` (a
    folder; default ``hf_dir``) and where it came from.

    The embedding and output layer are written with ``ModelConfig.padded_vocab_size`` rows for
    the layout written (zero padding rows; any layout loads them, megatron-core's embedding and
    output-layer shards allow another padded size). ``add_tokens`` / ``add_special_tokens``
    extend the vocabulary (:mod:`clinmega.conversion.added_tokens`): new rows are the mean of the
    source rows, and the extended tokenizer is saved in ``<out_dir>/hf_assets``.

    Collective when torch.distributed is initialised with several ranks (each writes its shards
    of ``parallel``); otherwise a single process initialises a one-rank group itself.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    parallel = parallel or ParallelConfig()
    runtime = runtime or RuntimeConfig()
    cfg = hf_model_config(hf_dir)
    hf_vocab = cfg.vocab_size
    assets = Path(tokenizer) if tokenizer is not None else hf_dir
    if not assets.is_dir():
        raise ConversionError(f"{assets}: tokenizer folder does not exist")
    extended = None
    if add_tokens or add_special_tokens:
        extended = extend_tokenizer(assets, add_tokens, add_special_tokens, hf_vocab)
        cfg = dataclasses.replace(cfg, vocab_size=extended.vocab_size)
    try:
        check_layout(cfg, parallel)
        # Only the checkpoint key names depend on the implementation (the local spec is built
        # either way), so TE-keyed checkpoints are written on machines without TE.
        impl = (resolve_transformer_impl(transformer_impl) if transformer_impl == "auto"
                else transformer_impl)
    except ConfigError as err:
        raise ConversionError(f"{hf_dir}: {err}") from None
    reader = HFReader(hf_dir, allow_pickle=allow_pickle)
    validate_hf(reader, cfg, mapping_table(cfg, hf_vocab=hf_vocab))
    out_dtype = dtypes.parse(dtype) or reader.tensors["model.embed_tokens.weight"].dtype
    staging.check_output(out_dir, overwrite)

    world = init_process_group(runtime)
    build_parallel = parallel if world.world_size > 1 else ParallelConfig()
    try:
        init_model_parallel(build_parallel, runtime)
    except ConfigError as err:
        raise ConversionError(f"{err} (importing on {world.world_size} ranks)") from None
    padded_vocab = cfg.padded_vocab_size(build_parallel.tensor_parallel)
    table = mapping_table(cfg, hf_vocab=hf_vocab, padded_vocab=padded_vocab)
    by_key = {m.key: m for m in table}
    sharded = _sharded_target(cfg, build_parallel, out_dtype, by_key, impl)
    rank0 = world.rank == 0
    tracker = Tracker(f"import {hf_dir.name}", str(out_dir), _local_bytes(sharded),
                      show=progress and rank0)
    producer = _Producer(reader, {m.ckpt_key(impl): m for m in table}, allow_downcast, tracker)
    tmp = staging.staging_dir(out_dir)
    try:
        if rank0:
            staging.prepare(out_dir)
        dist.barrier()
        save_produced(sharded, tmp, producer)
        if rank0:
            vocabulary = {"vocab_size": cfg.vocab_size, "padded_vocab_size": padded_vocab,
                          **(extended.record() if extended else {})}
            assets_from = assets
            if extended is not None:  # the extended tokenizer replaces the source's files
                _write_extended_assets(assets, tmp / ASSETS_DIR, extended)
                assets_from = None
            write_checkpoint_info(tmp, cfg, dict(
                kind="import-hf", source=str(hf_dir.resolve()), tokenizer=str(assets.resolve()),
                dtype=dtypes.NAMES[out_dtype], parallel=dataclasses.asdict(parallel),
                transformer_impl=impl, vocabulary=vocabulary), assets_from,
                dtypes.HF_NAMES[out_dtype])
        dist.barrier()
        if rank0:
            staging.commit(out_dir)
        dist.barrier()
    except BaseException:
        if rank0:
            staging.abort(out_dir)
        raise
    finally:
        producer.close()
        summary = tracker.finish()
    return summary
