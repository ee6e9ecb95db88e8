"""megatron-core GPTModel backend: batched scoring and KV-cached generation (TP/EP ranks, no PP).

Scoring runs the plain forward (right-padded batch, causal attention). Generation follows
megatron-core's own static-batching scheme (``inference/text_generation_controllers``): the batch is
right-padded, a `StaticInferenceContext` holds the KV cache, the prefill covers the shortest prompt, and
the longer prompts' remaining tokens are fed one per step before their rows start sampling (the shared
decoding loop of `TokenBackend`). Rows never see padding, so only causal masks are needed and the same
code runs with the local and the Transformer Engine layer specs. Batches are formed from prompts of
similar length (longest first), which keeps those fed steps few.

The prompts, tokenisation and answer extraction are those of every backend; on the same weights the
choices equal the HF backend's (tests/test_eval_megatron_backend.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clinmega.evaluation.backends.base import TokenBackend


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """megatron-core's boolean mask convention: True where attention is masked out. [1, 1, T, T]"""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)[None, None]


class MegatronBackend(TokenBackend):
    def __init__(self, model: Any, tokenizer: Any, max_length: int, batch_size: int = 8):
        super().__init__(tokenizer, max_length, batch_size)
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | Path, model_config: str | Path | None = None,
                        tokenizer: str | Path | None = None, dtype: str = "float32", batch_size: int = 8,
                        tensor_parallel: int = 1, expert_parallel: int = 1) -> "MegatronBackend":
        """Load a clinmega/megatron-core distributed checkpoint (model weights, any saved layout).

        ``path``: a checkpoint, checkpoint root or train run directory (the newest complete
        checkpoint is loaded; a LoRA run's adapter checkpoint is scored as base + adapters).
        ``model_config``: a HF ``config.json`` (or folder holding one) describing the model, default the model the checkpoint records (else ``config.json`` in the
        checkpoint); ``tokenizer``: a folder `AutoTokenizer` reads, default the checkpoint's
        ``hf_assets`` (else the checkpoint folder). With
        ``tensor_parallel``/``expert_parallel`` > 1, run one process per rank (torchrun, Slurm): every rank
        computes the same requests (logits are gathered over tensor-parallel ranks, and each row samples
        from its own seeded generator, so all ranks agree), and the caller lets rank 0 write results.
        Pipeline parallelism is not supported for evaluation.
        """
        from transformers import AutoTokenizer

        from clinmega.checkpoints import read_checkpoint_info, resolve_checkpoint
        from clinmega.config.schema import ParallelConfig, PrecisionConfig, RuntimeConfig, dtype_name
        from clinmega.models import from_hf_config
        from clinmega.models.lora_model import build_checkpoint_model
        from clinmega.runtime import initialize

        precision = dtype_name(dtype)  # fp32|bf16|fp16, also float32|bfloat16|float16
        info = read_checkpoint_info(resolve_checkpoint(path))
        path = info.directory
        cfg = from_hf_config(model_config) if model_config else info.model or from_hf_config(path)
        if tokenizer is None:
            tokenizer = info.assets if info.has_tokenizer else path
        parallel = ParallelConfig(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel)
        runtime = RuntimeConfig()
        initialize(parallel, runtime)
        # a LoRA run's checkpoint: base (found through its LoRA record) + adapters
        [model] = build_checkpoint_model(info, cfg, parallel, PrecisionConfig(dtype=precision), runtime)
        return cls(model, AutoTokenizer.from_pretrained(str(tokenizer)), cfg.max_position_embeddings,
                   batch_size=batch_size)

    def _forward(self, tokens: torch.Tensor, start: int, mask: torch.Tensor | None, context: Any = None):
        length = tokens.shape[1]
        positions = torch.arange(start, start + length, device=self.device)[None].expand(tokens.shape[0], -1)
        from clinmega.models.vocab import real_vocab_logits

        logits = self.model(tokens.to(self.device), positions, mask, inference_context=context,
                            runtime_gather_output=True)  # full-vocabulary logits on every tensor-parallel rank
        return real_vocab_logits(self.model, logits)  # without the padded ids (their logits are -inf)

    def _mask(self, length: int) -> torch.Tensor | None:
        """Like megatron-core's GPT inference wrapper: an explicit causal mask for the local attention
        backend; None for the others (Transformer Engine, and the local spec's causal default)."""
        from megatron.core.transformer.enums import AttnBackend

        return causal_mask(length, self.device) if self.model.config.attention_backend == AttnBackend.local else None

    def _logits(self, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        return self._forward(tokens, 0, self._mask(tokens.shape[1]))

    def _prefill(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[torch.Tensor, Any, list[list[int]]]:
        from megatron.core.inference.contexts import StaticInferenceContext

        shortest = min(len(p) for p in prompts)
        context = StaticInferenceContext(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        tokens = torch.tensor([p[:shortest] for p in prompts], dtype=torch.long)
        logits = self._forward(tokens, 0, self._mask(shortest), context)
        context.increment_sequence_len_offset(shortest)
        return logits[:, -1].float().cpu(), context, [p[shortest:] for p in prompts]

    def _decode(self, state: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        context = state
        logits = self._forward(tokens[:, None], context.sequence_len_offset, None, context)
        context.increment_sequence_len_offset(1)
        return logits[:, -1].float().cpu(), context
