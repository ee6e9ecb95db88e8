"""Declarative HF <-> megatron-core parameter mapping, one table per model family.

Every entry is a small mapping object (in the style of Megatron-Bridge) that relates one
megatron-core tensor to one or more Hugging Face tensors by one description, ``hf_views``: where
in the megatron tensor each HF tensor's elements live, as views. Import and export both use it
(import reads HF bytes into the views, export writes the views), so neither direction has its
own copy of the logic:

* :class:`Direct` - same tensor under another name (embeddings, norms, projections, router),
* :class:`QKV` - HF ``q_proj/k_proj/v_proj`` <-> megatron's fused ``linear_qkv`` whose rows are
  grouped per query group g as ``[q heads of g, k_g, v_g]``,
* :class:`GatedMLP` - HF ``gate`` (w1) and ``up`` (w3) <-> ``linear_fc1 = cat([gate, up])``,
* :class:`VocabRows` - the embedding and output layer: HF's rows are the first rows of megatron's
  padded tensor (``ModelConfig.padded_vocab_size``); rows added to the vocabulary at import
  (``import-hf --add-tokens``) and the padding rows have no HF tensor and are made by ``init_rows``.

Entries are keyed by the *distributed-checkpoint* key of the tensor (``ShardedTensor.key``), which
is what import writes and export reads. megatron-core gives the Transformer Engine and the local
layer specs the same checkpoint keys (the local spec maps its norms onto TE's fused names, and
``TEGroupedMLP`` writes the same expert keys as ``SequentialMLP``), with one exception handled by
``te_key``: the MoE pre-MLP norm. ``params`` lists the module parameter names of both specs
(local ``input_layernorm.weight`` / TE ``linear_qkv.layer_norm_weight``, local
``local_experts.{e}.linear_fc1.weight`` / TE grouped ``experts.linear_fc1.weight{e}``, ...);
``_extra_state`` entries carry no weights and are not mapped.

Per-layer keys hold all layers stacked on a leading axis (and all experts on a second one for
expert tensors): ``scope`` is the number of such leading axes, and ``{layer}`` / ``{expert}`` in
the names are global indices (global expert = ep_rank * local_experts + e).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import torch

from clinmega.config.schema import ModelConfig
from clinmega.models.spec import CHECKPOINT_KEY_DIFFERENCES

GLOBAL, LAYER, EXPERT = 0, 1, 2  # leading stacked axes of the checkpoint tensor
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # checkpoint keys of model tensors
_LAYERS = "decoder.layers.{layer}."
_HF_LAYERS = "model.layers.{layer}."


@dataclass(frozen=True)
class Mapping:
    """One megatron-core tensor and the HF tensor(s) it is made of."""

    key: str                          # distributed-checkpoint key (local and TE spec)
    hf: tuple[str, ...]               # HF tensor names, with {layer} / {expert} placeholders
    hf_shapes: tuple[tuple[int, ...], ...]
    scope: int = LAYER
    te_key: str | None = None         # checkpoint key under the TE spec, where it differs
    params: tuple[str, ...] = ()      # module parameter names (local spec, TE spec)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one layer's (one expert's) megatron-core tensor, unsharded."""
        return self.hf_shapes[0]

    def ckpt_key(self, transformer_impl: str = "local") -> str:
        return self.te_key if self.te_key and transformer_impl == "transformer_engine" else self.key

    def hf_names(self, layer: int | None = None, expert: int | None = None) -> list[str]:
        return [name.format(layer=layer, expert=expert) for name in self.hf]

    def hf_views(self, full: torch.Tensor) -> list[torch.Tensor]:
        """One view of ``full`` (one unit's megatron tensor, shape ``self.shape``) per HF
        tensor, holding that tensor's elements in HF's row-major order: ``view.reshape(hf_shape)``
        is the HF tensor. This is the whole transformation: import reads each HF tensor straight
        into its view, export writes each view out, both without an intermediate copy."""
        return [full]

    def init_rows(self, full: torch.Tensor) -> None:
        """Fill the parts of ``full`` that no HF tensor covers (none, except in VocabRows)."""

    def row_blocks(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Each HF tensor's rows of ``rows``, a tensor whose rows are laid out like this
        mapping's megatron rows but with any number of columns (a LoRA ``B``, ``[out, rank]``):
        one ``[hf_rows_i, rows.shape[-1]]`` tensor per HF tensor. Only for mappings whose HF
        tensors split the rows and share the columns (Direct, QKV, GatedMLP)."""
        if any(len(s) != 2 or s[1] != self.shape[1] for s in self.hf_shapes):
            raise ValueError(f"{self.key}: the HF tensors do not split the rows only")
        if rows.ndim != 2 or rows.shape[0] != self.shape[0]:
            raise ValueError(f"{self.key}: expected {self.shape[0]} rows, got {tuple(rows.shape)}")
        return [view.reshape(-1, rows.shape[-1]) for view in self.hf_views(rows)]

    def hf_to_megatron(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """The megatron tensor made of HF ``tensors`` (a new tensor)."""
        full = torch.empty(self.shape, dtype=tensors[0].dtype)
        for view, tensor in zip(self.hf_views(full), tensors, strict=True):
            view.copy_(tensor.reshape(view.shape))
        self.init_rows(full)
        return full

    def megatron_to_hf(self, full: torch.Tensor) -> list[torch.Tensor]:
        """The HF tensors of megatron tensor ``full`` (views where the layout allows)."""
        return [view.reshape(shape) for view, shape in zip(self.hf_views(full), self.hf_shapes)]


class Direct(Mapping):
    """The same tensor under another name."""


@dataclass(frozen=True)
class QKV(Mapping):
    """HF q/k/v projections <-> megatron fused QKV, interleaved per query group."""

    num_heads: int = 0
    num_groups: int = 0
    head_dim: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        hidden = self.hf_shapes[0][1]
        return ((self.num_heads + 2 * self.num_groups) * self.head_dim, hidden)

    def _group_rows(self) -> list[int]:
        return [self.num_heads // self.num_groups * self.head_dim, self.head_dim, self.head_dim]

    def hf_views(self, full: torch.Tensor) -> list[torch.Tensor]:
        grouped = full.reshape(self.num_groups, -1, full.shape[-1])
        return list(torch.split(grouped, self._group_rows(), dim=1))  # (groups, rows, hidden)


class GatedMLP(Mapping):
    """HF gate (w1) and up (w3) <-> megatron ``linear_fc1 = cat([gate, up])``.

    Under tensor parallelism each rank holds ``[gate_shard; up_shard]``; megatron-core's
    checkpoint stores the two halves as separate chunks of the full ``[gate; up]`` tensor
    (``apply_swiglu_sharded_factory``), so the full tensor is exactly this concatenation.
    """

    @property
    def shape(self) -> tuple[int, ...]:
        rows, hidden = self.hf_shapes[0]
        return (2 * rows, hidden)

    def hf_views(self, full: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.chunk(full, 2, dim=0))


@dataclass(frozen=True)
class VocabRows(Mapping):
    """One row per token id: ``hf_shapes[0] = (hf_rows, h)`` HF rows, ``vocab_rows`` real ids
    (more than ``hf_rows`` when import adds tokens), ``padded_rows`` rows in megatron's tensor.

    Import initialises the added rows (ids ``hf_rows .. vocab_rows - 1``) to the mean of the HF
    rows, computed in float64 (Hewitt 2021, "Initializing New Word Embeddings for Pretrained
    Language Models": with the output row of a new token equal to the mean output row, its logit is
    the mean logit, so by Jensen's inequality its initial probability is at most 1/V of the
    original vocabulary's total and the model's distribution over the old tokens barely moves;
    random rows of the usual init scale can instead dominate the softmax). The padding rows are
    zero: their logits are masked (``clinmega.models.vocab``), so they never change the function.
    Export reads the first ``vocab_rows`` rows of a checkpoint tensor of any padded size."""

    vocab_rows: int = 0
    padded_rows: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.padded_rows, self.hf_shapes[0][1])

    def hf_views(self, full: torch.Tensor) -> list[torch.Tensor]:
        return [full[: self.hf_shapes[0][0]]]

    def init_rows(self, full: torch.Tensor) -> None:
        hf_rows = self.hf_shapes[0][0]
        if self.vocab_rows > hf_rows:
            total = torch.zeros(full.shape[1:], dtype=torch.float64)
            for rows in torch.split(full[:hf_rows], 4096):  # no float64 copy of the whole tensor
                total += rows.sum(dim=0, dtype=torch.float64)
            full[hf_rows: self.vocab_rows] = (total / hf_rows).to(full.dtype)
        full[self.vocab_rows:].zero_()


def _vocab(key: str, hf_name: str, cfg: ModelConfig, hf_vocab: int | None,
           padded_vocab: int | None) -> VocabRows:
    v, h = cfg.vocab_size, cfg.hidden_size
    hf_vocab = v if hf_vocab is None else hf_vocab
    padded_vocab = v if padded_vocab is None else padded_vocab
    if not hf_vocab <= v <= padded_vocab:
        raise ValueError(f"{key}: needs HF rows {hf_vocab} <= vocab_size {v} <= padded rows "
                         f"{padded_vocab}")
    return VocabRows(key, (hf_name,), ((hf_vocab, h),), scope=GLOBAL, params=(key,),
                     vocab_rows=v, padded_rows=padded_vocab)


def _attention(cfg: ModelConfig) -> list[Mapping]:
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_query_groups * d
    attn = _HF_LAYERS + "self_attn."
    return [
        Direct("decoder.layers.self_attention.linear_qkv.layer_norm_weight",
               (_HF_LAYERS + "input_layernorm.weight",), ((h,),),
               params=(_LAYERS + "input_layernorm.weight",
                       _LAYERS + "self_attention.linear_qkv.layer_norm_weight")),
        QKV("decoder.layers.self_attention.linear_qkv.weight",
            (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
            ((q, h), (kv, h), (kv, h)),
            params=(_LAYERS + "self_attention.linear_qkv.weight",),
            num_heads=cfg.num_attention_heads, num_groups=cfg.num_query_groups, head_dim=d),
        Direct("decoder.layers.self_attention.linear_proj.weight", (attn + "o_proj.weight",),
               ((h, q),), params=(_LAYERS + "self_attention.linear_proj.weight",)),
    ]


def _dense_mlp(cfg: ModelConfig) -> list[Mapping]:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    mlp = _HF_LAYERS + "mlp."
    return [
        Direct("decoder.layers.mlp.linear_fc1.layer_norm_weight",
               (_HF_LAYERS + "post_attention_layernorm.weight",), ((h,),),
               params=(_LAYERS + "pre_mlp_layernorm.weight",
                       _LAYERS + "mlp.linear_fc1.layer_norm_weight")),
        GatedMLP("decoder.layers.mlp.linear_fc1.weight",
                 (mlp + "gate_proj.weight", mlp + "up_proj.weight"), ((f, h), (f, h)),
                 params=(_LAYERS + "mlp.linear_fc1.weight",)),
        Direct("decoder.layers.mlp.linear_fc2.weight", (mlp + "down_proj.weight",), ((h, f),),
               params=(_LAYERS + "mlp.linear_fc2.weight",)),
    ]


def _moe_mlp(cfg: ModelConfig) -> list[Mapping]:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    moe = _HF_LAYERS + "block_sparse_moe."
    expert = moe + "experts.{expert}."
    local = _LAYERS + "mlp.experts.local_experts.{expert}."
    grouped = _LAYERS + "mlp.experts."
    return [
        # The local spec maps pre_mlp_layernorm onto the dense TE name even for MoE layers.
        Direct("decoder.layers.mlp.linear_fc1.layer_norm_weight",
               (_HF_LAYERS + "post_attention_layernorm.weight",), ((h,),),
               te_key=CHECKPOINT_KEY_DIFFERENCES["decoder.layers.mlp.linear_fc1.layer_norm_weight"],
               params=(_LAYERS + "pre_mlp_layernorm.weight",)),
        Direct("decoder.layers.mlp.router.weight", (moe + "gate.weight",),
               ((cfg.num_experts, h),), params=(_LAYERS + "mlp.router.weight",)),
        GatedMLP("decoder.layers.mlp.experts.experts.linear_fc1.weight",
                 (expert + "w1.weight", expert + "w3.weight"), ((f, h), (f, h)), scope=EXPERT,
                 params=(local + "linear_fc1.weight", grouped + "linear_fc1.weight{expert}")),
        Direct("decoder.layers.mlp.experts.experts.linear_fc2.weight", (expert + "w2.weight",),
               ((h, f),), scope=EXPERT,
               params=(local + "linear_fc2.weight", grouped + "linear_fc2.weight{expert}")),
    ]


def mapping_table(cfg: ModelConfig, *, hf_vocab: int | None = None,
                  padded_vocab: int | None = None) -> list[Mapping]:
    """The mappings of ``cfg``'s family, in HF file order (embeddings, layers, head).

    The embedding and output layer hold ``padded_vocab`` rows (default ``cfg.vocab_size``), of
    which the HF tensors give the first ``hf_vocab`` (default ``cfg.vocab_size``)."""
    h = cfg.hidden_size
    return [
        _vocab("embedding.word_embeddings.weight", "model.embed_tokens.weight", cfg, hf_vocab,
               padded_vocab),
        *_attention(cfg),
        *(_moe_mlp(cfg) if cfg.is_moe else _dense_mlp(cfg)),
        Direct("decoder.final_layernorm.weight", ("model.norm.weight",), ((h,),), scope=GLOBAL,
               params=("decoder.final_layernorm.weight",)),
        _vocab("output_layer.weight", "lm_head.weight", cfg, hf_vocab, padded_vocab),
    ]


@dataclass(frozen=True)
class Unit:
    """One mapping applied to one layer (and expert): the granule import and export stream."""

    mapping: Mapping
    layer: int | None = None
    expert: int | None = None

    @property
    def index(self) -> tuple[int, ...]:
        """Position on the checkpoint tensor's stacked leading axes."""
        return tuple(i for i in (self.layer, self.expert) if i is not None)

    @property
    def hf_names(self) -> list[str]:
        return self.mapping.hf_names(self.layer, self.expert)


def units(cfg: ModelConfig, table: Sequence[Mapping] | None = None) -> list[Unit]:
    """Every (mapping, layer, expert) of the model, in HF file order."""
    table = mapping_table(cfg) if table is None else table
    head = [m for m in table if m.scope == GLOBAL]
    per_layer = [m for m in table if m.scope != GLOBAL]
    out = [Unit(head[0])]
    for layer in range(cfg.num_layers):
        for m in per_layer:
            experts = range(cfg.num_experts) if m.scope == EXPERT else [None]
            out += [Unit(m, layer, e) for e in experts]
    return out + [Unit(m) for m in head[1:]]


def _pattern(template: str) -> re.Pattern:
    text = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)")
    return re.compile(text.replace(r"\{expert\}", r"(?P<expert>\d+)") + "$")


def resolve_param(name: str, table: Sequence[Mapping]) -> Unit:
    """The mapping unit of a megatron-core module parameter name (TE or local spec) of an
    unsharded model; raises KeyError for names no mapping covers (e.g. ``_extra_state``)."""
    for mapping in table:
        for template in mapping.params:
            match = _pattern(template).match(name)
            if match:
                found = {k: int(v) for k, v in match.groupdict().items()}
                return Unit(mapping, found.get("layer"), found.get("expert"))
    raise KeyError(name)
