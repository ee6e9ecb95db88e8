"""Hugging Face `transformers` backend (exported checkpoints): left-padded, KV-cached generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from clinmega.evaluation.backends.base import TokenBackend


class HFBackend(TokenBackend):
    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, max_length: int | None = None):
        super().__init__(tokenizer, max_length or model.config.max_position_embeddings, batch_size)
        self.model = model.eval()
        self.device = next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str = "float32", device: str = "cpu",
                        batch_size: int = 8, max_length: int | None = None) -> "HFBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).to(device)
        return cls(model, tokenizer, batch_size=batch_size, max_length=max_length)

    def _logits(self, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        mask = (torch.arange(tokens.shape[1])[None, :] < torch.tensor(lengths)[:, None]).long()
        return self.model(input_ids=tokens.to(self.device), attention_mask=mask.to(self.device)).logits

    def _prefill(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[torch.Tensor, Any, list[list[int]]]:
        width = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding
            tokens[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        tokens, mask, positions = tokens.to(self.device), mask.to(self.device), positions.to(self.device)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True)
        return out.logits[:, -1].float().cpu(), (out.past_key_values, mask, positions[:, -1:]), [[] for _ in prompts]

    def _decode(self, state: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        cache, mask, last_position = state
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = last_position + 1
        out = self.model(input_ids=tokens[:, None].to(self.device), attention_mask=mask, position_ids=position,
                         past_key_values=cache, use_cache=True)
        return out.logits[:, -1].float().cpu(), (out.past_key_values, mask, position)
