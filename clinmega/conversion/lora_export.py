"""``export-hf`` of a LoRA run (:mod:`clinmega.models.lora`): merged HF weights, or a HF PEFT
adapter folder.

A LoRA run's checkpoint holds only the adapters (``<linear>.lora_a.weight`` ``[..., rank, in]`` and
``<linear>.lora_b.weight`` ``[..., out, rank]`` under the base weight's checkpoint key, with its
leading layer / expert axes); its description names the base checkpoint (``provenance["peft"]``).

* **Merged** (``export-hf RUN OUT``): the exporter reads each base unit (one layer's tensor, one
  expert's) from the base checkpoint, and :meth:`Adapters.merge` adds ``scale * B @ A`` in
  megatron layout (fp32 math, rounded once to the base tensor's dtype, as PEFT's
  ``merge_and_unload`` adds the delta in the weight's dtype) before the HF mapping splits it; one
  unit at a time, as for a full checkpoint.
* **Adapter only** (``export-hf RUN OUT --adapter-only``, :func:`export_peft_adapter`):
  ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained``
  loads onto the exported base model (written for and checked with peft 0.21.2 on transformers
  5.23; no peft needed to write it). Key names are PEFT's
  (``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight``).

  - Dense linears (attention, the dense MLP) map to HF ``nn.Linear`` modules (``target_modules``).
    A fused megatron linear that HF splits (``linear_qkv`` -> q/k/v_proj, ``linear_fc1`` ->
    gate/up_proj) gives each HF linear the same ``A`` and its rows of ``B``, split by the same
    mapping that splits the weight (:meth:`Mapping.row_blocks`): exact, since the rows of
    ``B @ A`` are the rows of ``B`` times ``A``.
  - Mixtral experts: transformers >= 5 holds each layer's experts as two 3-D parameters of
    ``MixtralExperts``, ``gate_up_proj`` ``[E, 2F, H]`` (rows ``[gate; up]``, megatron's
    ``linear_fc1`` layout) and ``down_proj`` ``[E, H, F]``, which PEFT adapts with
    ``target_parameters`` (``lora.ParamWrapper``). For a 3-D ``[E, out, in]`` parameter PEFT holds
    ``lora_A.weight`` ``[E*r, in]`` (rows ``e*r .. e*r+r-1`` = expert ``e``'s ``A``) and
    ``lora_B.weight`` ``[out, r*E]`` (column ``k*E + e`` = column ``k`` of expert ``e``'s ``B``),
    and its delta is ``scale * B_e @ A_e`` per expert: per-expert rank-``r`` adapters exactly
    (``ParamWrapper.get_delta_weight``). Two targeted parameters of one module nest: the first
    declared (``gate_up_proj``) is wrapped first, so its keys gain a ``base_layer.`` per wrapper
    around it (``...mlp.experts.base_layer.lora_A.weight``), the outer one's are
    ``...mlp.experts.lora_A.weight``. PEFT's ParamWrapper refuses ``lora_dropout != 0``, so a
    folder with expert adapters records ``lora_dropout: 0.0`` (dropout acts only in training).
    transformers 4.x (per-expert ``w1/w2/w3`` linears) is not a layout this writes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from clinmega.checkpoints import (METADATA_FILE, CheckpointInfo, config_differences,
                                  read_checkpoint_info)
from clinmega.config.errors import ConfigError
from clinmega.config.schema import ModelConfig
from clinmega.conversion import dtypes, staging
from clinmega.conversion.checkpoint_info import resolve_described
from clinmega.conversion.dist_io import DistCheckpointReader
from clinmega.conversion.errors import ConversionError
from clinmega.conversion.hf_io import PlannedTensor, SafetensorsWriter, write_json
from clinmega.conversion.mapping import (EXPERT, GLOBAL, LAYER, MODEL_PREFIXES, Mapping, Unit,
                                         mapping_table)
from clinmega.conversion.progress import Summary, Tracker
from clinmega.models.lora import TARGETS, LoRAConfig, adapter_key, delta, read_peft_record

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PEFT_NAMES = {"lora_a": "lora_A", "lora_b": "lora_B"}  # clinmega's adapter names -> PEFT's
# transformers >= 5 MixtralExperts: megatron expert linear -> 3-D parameter, in declaration order.
HF_EXPERT_PARAMS = {"linear_fc1": "gate_up_proj", "linear_fc2": "down_proj"}
HF_EXPERTS_MODULE = "model.layers.{layer}.mlp.experts"


@dataclass
class LoRARun:
    """An adapter checkpoint and the base checkpoint it was trained on."""

    info: CheckpointInfo      # the adapter checkpoint (describes the base model)
    lora: LoRAConfig
    base: CheckpointInfo      # the base checkpoint
    reader: DistCheckpointReader  # the adapter tensors


def open_lora(info: CheckpointInfo) -> LoRARun | None:
    """The LoRA run ``info`` describes, or None for a full checkpoint (no ``provenance["peft"]``).
    The base must exist, be unchanged, and describe the same model."""
    where = str(info.directory / METADATA_FILE)
    try:
        found = read_peft_record(info.provenance, where)
        if found is None:
            return None
        lora, base_dir = found
        base = read_checkpoint_info(base_dir)
    except ConfigError as err:
        raise ConversionError(str(err)) from None
    if info.model is not None and base.model is not None:
        diffs = config_differences(base.model, info.model)
        if diffs:
            raise ConversionError(f"{where}: the adapters' model differs from the base "
                                  f"checkpoint's ({base.directory}): {diffs}")
    return LoRARun(info, lora, base, DistCheckpointReader(info.directory))


@dataclass(frozen=True)
class Adapted:
    """One adapted megatron linear: its base mapping and adapter checkpoint keys."""

    mapping: Mapping
    target: str
    a_key: str
    b_key: str


def _target(mapping: Mapping) -> str | None:
    """The LoRA target a base weight mapping is (``...linear_qkv.weight`` -> ``linear_qkv``);
    None for norms, the router, embeddings."""
    head, _, tail = mapping.key.rpartition(".")
    name = head.rpartition(".")[2]
    return name if tail == "weight" and name in TARGETS and mapping.scope != GLOBAL else None


class Adapters:
    """The adapters of a LoRA run for model ``cfg``: which mappings are adapted, their checkpoint
    keys (shapes checked against ``cfg`` and the rank), and reading / merging them."""

    def __init__(self, run: LoRARun, cfg: ModelConfig, table: list[Mapping] | None = None):
        self.run, self.cfg, self.lora = run, cfg, run.lora
        reader, rank = run.reader, run.lora.rank
        table = mapping_table(cfg) if table is None else table
        self.adapted: dict[str, Adapted] = {}
        for m in table:
            target = _target(m)
            if target is None or target not in self.lora.targets:
                continue
            item = Adapted(m, target, adapter_key(m.key, "lora_a"), adapter_key(m.key, "lora_b"))
            lead = self.lead(m)
            out, inp = m.shape
            for key, shape in ((item.a_key, lead + (rank, inp)), (item.b_key, lead + (out, rank))):
                if key not in reader.tensors:
                    raise ConversionError(f"{reader.directory}: adapter tensor {key!r} is missing "
                                          f"(lora.targets includes {target})")
                if reader.shape(key) != shape:
                    raise ConversionError(
                        f"{reader.directory}: adapter tensor {key!r} has shape "
                        f"{list(reader.shape(key))}, the model and lora.rank={rank} imply "
                        f"{list(shape)}")
            self.adapted[m.key] = item
        expected = {k for a in self.adapted.values() for k in (a.a_key, a.b_key)}
        unexpected = sorted(k for k in reader.tensors if k.startswith(MODEL_PREFIXES)
                            and k not in expected)
        if unexpected:
            raise ConversionError(f"{reader.directory}: unexpected model tensor(s) "
                                  f"{unexpected[:5]} in an adapter checkpoint (lora.targets "
                                  f"{self.lora.targets}, a {cfg.arch} model)")

    def lead(self, m: Mapping) -> tuple[int, ...]:
        return {LAYER: (self.cfg.num_layers,),
                EXPERT: (self.cfg.num_layers, self.cfg.num_experts)}[m.scope]

    def read(self, item: Adapted, index: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` at ``index`` on the leading axes (a layer, or a layer and an expert);
        a shorter index reads all the remaining leading axes (e.g. all experts of a layer)."""
        reader = self.run.reader
        out = []
        for key in (item.a_key, item.b_key):
            shape = reader.shape(key)
            sizes = (1,) * len(index) + shape[len(index):]
            offsets = index + (0,) * (len(shape) - len(index))
            out.append(reader.read(key, offsets, sizes).reshape(shape[len(index):]))
        return out[0], out[1]

    def merge(self, unit: Unit, full: torch.Tensor) -> None:
        """Add ``scale * B @ A`` to ``full`` (unit's base tensor, megatron layout) in place when
        the unit is adapted: fp32 math, rounded once to ``full``'s dtype."""
        item = self.adapted.get(unit.mapping.key)
        if item is None:
            return
        a, b = self.read(item, unit.index)
        full.copy_(full.float() + delta(a.float(), b.float(), self.lora.scale))


# --- the HF PEFT adapter folder ----------------------------------------------------------------
def _peft_key(module: str, which: str) -> str:
    """``model.layers.0.self_attn.q_proj``, ``lora_a`` -> PEFT's saved key of that adapter."""
    return f"{PEFT_PREFIX}{module}.{PEFT_NAMES[which]}.weight"


def _dense_modules(item: Adapted, layer: int) -> list[str]:
    """HF module names of an adapted dense mapping (``model.layers.0.self_attn.q_proj``, ...)."""
    return [name.removesuffix(".weight") for name in item.mapping.hf_names(layer)]


def _expert_modules(adapters: Adapters, layer: int) -> dict[str, str]:
    """{target: PEFT module path} of a layer's adapted expert parameters: the first declared
    parameter is wrapped innermost (one ``base_layer.`` per later targeted parameter)."""
    targeted = [t for t in HF_EXPERT_PARAMS if any(
        a.target == t and a.mapping.scope == EXPERT for a in adapters.adapted.values())]
    module = HF_EXPERTS_MODULE.format(layer=layer)
    return {t: module + ".base_layer" * (len(targeted) - 1 - i) for i, t in enumerate(targeted)}


def peft_tensors(adapters: Adapters, layer: int, item: Adapted
                 ) -> list[tuple[str, torch.Tensor]]:
    """The PEFT tensors of one adapted mapping in one layer, ``(name, tensor)`` in file order."""
    if item.mapping.scope == EXPERT:
        a, b = adapters.read(item, (layer,))                 # [E, r, in], [E, out, r]
        experts, rank = a.shape[0], a.shape[1]
        module = _expert_modules(adapters, layer)[item.target]
        peft_a = a.reshape(experts * rank, a.shape[2])        # row e*r + k = A_e[k]
        peft_b = b.permute(1, 2, 0).reshape(b.shape[1], rank * experts)  # col k*E + e = B_e[:, k]
        return [(_peft_key(module, "lora_a"), peft_a), (_peft_key(module, "lora_b"), peft_b)]
    a, b = adapters.read(item, (layer,))                     # [r, in], [out, r]
    out = []
    for module, rows in zip(_dense_modules(item, layer), item.mapping.row_blocks(b), strict=True):
        out += [(_peft_key(module, "lora_a"), a), (_peft_key(module, "lora_b"), rows)]
    return out


def _planned_shapes(adapters: Adapters, layer: int, item: Adapted
                    ) -> list[tuple[str, tuple[int, ...]]]:
    rank, (out, inp) = adapters.lora.rank, item.mapping.shape
    if item.mapping.scope == EXPERT:
        module, experts = _expert_modules(adapters, layer)[item.target], adapters.cfg.num_experts
        return [(_peft_key(module, "lora_a"), (experts * rank, inp)),
                (_peft_key(module, "lora_b"), (out, rank * experts))]
    shapes = []
    for module, (rows, _) in zip(_dense_modules(item, layer), item.mapping.hf_shapes):
        shapes += [(_peft_key(module, "lora_a"), (rank, inp)),
                   (_peft_key(module, "lora_b"), (rows, rank))]
    return shapes


def peft_config(adapters: Adapters) -> dict:
    """``adapter_config.json``: LoRA on the HF modules / expert parameters the targets map to."""
    lora, items = adapters.lora, list(adapters.adapted.values())
    modules = sorted({m.rpartition(".")[2] for item in items if item.mapping.scope != EXPERT
                      for m in _dense_modules(item, 0)})
    parameters = [f"experts.{HF_EXPERT_PARAMS[t]}" for t in HF_EXPERT_PARAMS
                  if any(i.target == t and i.mapping.scope == EXPERT for i in items)]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
        "r": lora.rank, "lora_alpha": lora.alpha,
        # PEFT's ParamWrapper (expert parameters) refuses dropout; it acts only in training.
        "lora_dropout": 0.0 if parameters else lora.dropout,
        "target_modules": modules or None, "target_parameters": parameters or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def require_lora(ckpt_dir: str | Path) -> tuple[LoRARun, ModelConfig]:
    info = resolve_described(ckpt_dir)
    run = open_lora(info)
    if run is None:
        raise ConversionError(f"{info.directory}: not a LoRA checkpoint (its {METADATA_FILE} has "
                              "no provenance.peft record); --adapter-only exports adapters")
    cfg = info.model or run.base.model
    if cfg is None:
        raise ConversionError(f"{info.directory}: records no model config")
    return run, cfg


def export_peft_adapter(ckpt_dir: str | Path, out_dir: str | Path, dtype: str | None = None, *,
                        allow_downcast: bool = False, overwrite: bool = False,
                        progress: bool = True) -> Summary:
    """Write the adapters of LoRA run ``ckpt_dir`` (run dir, checkpoint root or ``iter_*``; the
    newest complete checkpoint) as a HF PEFT adapter folder ``out_dir``, one layer at a time.
    ``dtype`` defaults to the adapters' stored dtype."""
    run, cfg = require_lora(ckpt_dir)
    adapters = Adapters(run, cfg)
    items = list(adapters.adapted.values())
    out_dtype = dtypes.parse(dtype) or run.reader.dtype(items[0].a_key)
    dtypes.name_of(out_dtype, str(run.info.directory))
    planned = [PlannedTensor(name, shape, out_dtype) for layer in range(cfg.num_layers)
               for item in items for name, shape in _planned_shapes(adapters, layer, item)]
    out_dir = Path(out_dir)
    tracker = Tracker(f"export adapters {run.info.directory.name}", str(out_dir),
                      sum(t.nbytes for t in planned), show=progress)
    try:
        with staging.staged(out_dir, overwrite) as tmp:
            writer = SafetensorsWriter(tmp, planned, max_shard_bytes=2**62,
                                       single_name=PEFT_WEIGHTS)
            for layer in range(cfg.num_layers):
                for item in items:
                    for name, tensor in peft_tensors(adapters, layer, item):
                        tensor = dtypes.cast(tensor, out_dtype, name, allow_downcast)
                        tracker.advance(name, writer.write(name, tensor))
            writer.close()
            write_json(tmp / PEFT_CONFIG, peft_config(adapters))
            shutil.copy2(run.info.directory / METADATA_FILE, tmp / METADATA_FILE)
    finally:
        summary = tracker.finish()
    return summary

