"""An HF Mistral folder (the eval tests' tiny model) written as an F32 GGUF file for llama.cpp servers.

The same layout and metadata llama.cpp's own ``convert_hf_to_gguf.py`` writes for ``MistralForCausalLM``
(architecture ``llama``; q/k rows permuted from HF's rotate-half RoPE order to GGML's interleaved order;
the SentencePiece vocabulary with scores and token types, and ``add_space_prefix`` as the HF tokenizer
behaves), reduced to what the tiny model uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TENSORS = {  # HF name (per layer: {i}) -> GGUF name
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (two halves per head) -> GGML's interleaved pairs (llama.cpp's ``LlamaModel.permute``)."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def write_gguf(hf_dir: Path, out: Path) -> Path:
    import gguf
    from safetensors.numpy import load_file
    from sentencepiece import SentencePieceProcessor

    cfg = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("clinmega tiny mistral")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{hf_dir}/config.json: rope_type {rope['rope_type']!r}; only the default RoPE is written")
    writer.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    sp = SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
    kinds = [(sp.IsUnknown, gguf.TokenType.UNKNOWN), (sp.IsControl, gguf.TokenType.CONTROL),
             (sp.IsUnused, gguf.TokenType.UNUSED), (sp.IsByte, gguf.TokenType.BYTE)]
    types = [next((t for test, t in kinds if test(i)), gguf.TokenType.NORMAL) for i in range(sp.vocab_size())]
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.IdToPiece(i).encode() for i in range(sp.vocab_size())])
    writer.add_token_scores([sp.GetScore(i) for i in range(sp.vocab_size())])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    # what the HF folder's tokenizer does, as convert_hf_to_gguf.py writes a tokenizer_config's add_prefix_space:
    # transformers 5 loads this Mistral tokenizer without SentencePiece's dummy "▁" before the first word
    from transformers import AutoTokenizer

    writer.add_add_space_prefix(AutoTokenizer.from_pretrained(str(hf_dir)).tokenize("a")[0].startswith("\u2581"))

    for i in range(cfg["num_hidden_layers"]):
        for hf_name, name in TENSORS.items():
            if "{i}" not in hf_name and i > 0:
                continue
            tensor = weights[hf_name.format(i=i)].astype(np.float32)
            if name.endswith("attn_q.weight"):
                tensor = permute(tensor, n_head)
            elif name.endswith("attn_k.weight"):
                tensor = permute(tensor, n_kv)
            writer.add_tensor(name.format(i=i), tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
