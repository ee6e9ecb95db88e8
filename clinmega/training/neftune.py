"""NEFTune (Jain et al. 2023) for megatron-core GPT models, with the masked, per-sample scale.

``noisy = x + alpha / sqrt(L * d) * eps``, ``eps ~ U(-1, 1)``, on the embedding output, training
only. What makes it correct under Megatron's parallelism (REFERENCE.md §3):

* **where** – a forward hook on ``GPTModel.embedding`` of the first pipeline stage (only that
  chunk has an embedding), i.e. after the vocab-parallel all-reduce, once per microbatch;
* **L** – each sample's real length: per packed sub-sequence (``cu_seqlens``), up to its last
  loss token (padding gets no noise and does not count); computed by :meth:`NEFTune.context`
  from the full, unsplit microbatch when it is sampled;
* **same on TP ranks** – the full ``[S, b, h]`` noise is drawn from a generator seeded with
  ``(seed, step, dp_rank, microbatch)``, which no TP rank differs in, then sliced to the rank's
  sequence-parallel shard of ``s``;
* **different on DP ranks and steps, reproducible on resume** – the seed contains both and
  nothing else that changes on restart;
* **never at eval** – the hook does nothing when ``module.training`` is False.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from clinmega.models.dist_ckpt import unwrap


def real_segments(loss_mask: torch.Tensor, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int]]:
    """``(start, length)`` of each sample in one row: a packed sub-sequence (or the whole row)
    up to its last loss token; segments without loss (padding) are left out."""
    S = loss_mask.numel()
    bounds = cu_seqlens.tolist() if cu_seqlens is not None else [0, S]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        hits = torch.nonzero(loss_mask[a:b] > 0)
        if len(hits):
            out.append((a, int(hits[-1]) + 1))
    return out


def token_scales(loss_mask: torch.Tensor, cu_seqlens: Sequence[torch.Tensor] | None, alpha: float,
                 hidden_size: int) -> torch.Tensor:
    """``[b, S]`` noise scale per token: ``alpha / sqrt(L*d)`` on a sample's real tokens, 0 on pads."""
    scales = torch.zeros(loss_mask.shape, dtype=torch.float32)
    for row in range(loss_mask.shape[0]):
        cu = cu_seqlens[row] if cu_seqlens is not None else None
        for start, length in real_segments(loss_mask[row], cu):
            scales[row, start:start + length] = alpha / (length * hidden_size) ** 0.5
    return scales


class NEFTune:
    """Adds NEFTune noise to the embedding output of the first-stage model chunk."""

    def __init__(self, alpha: float, hidden_size: int, seed: int):
        self.alpha, self.hidden_size, self.seed = float(alpha), hidden_size, seed

    def context(self, batch: dict[str, Any], step: int, dp_rank: int, microbatch: int) -> dict:
        """What the hook needs for one microbatch; computed before any sequence splitting."""
        return dict(scale=token_scales(batch["loss_mask"], batch.get("cu_seqlens"), self.alpha,
                                       self.hidden_size),
                    seed=[self.seed, step, dp_rank, microbatch])

    def attach(self, chunks: Sequence[torch.nn.Module]) -> list:
        """Register the hook on every chunk that holds the embedding; returns the handles."""
        handles = []
        for chunk in chunks:
            model = unwrap(chunk)
            if getattr(model, "pre_process", False):
                model.embedding.neftune_context = None
                handles.append(model.embedding.register_forward_hook(self._hook))
        return handles

    @staticmethod
    def set_context(chunk: torch.nn.Module, context: dict | None) -> None:
        """Called by the forward step with the microbatch's context (or None)."""
        embedding = getattr(unwrap(chunk), "embedding", None)
        if embedding is not None and hasattr(embedding, "neftune_context"):
            embedding.neftune_context = context

    def _hook(self, module, inputs, output: torch.Tensor):
        context, module.neftune_context = module.neftune_context, None
        if not module.training or context is None:
            return None
        return output + self.noise(context, output, module.config.sequence_parallel)

    @staticmethod
    def noise(context: dict, output: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
        """The noise for ``output`` ([s, b, h], the local SP shard of s when ``sequence_parallel``)."""
        scale = context["scale"].to(output.device).t()  # [S, b]
        S, b, h = scale.shape[0], scale.shape[1], output.shape[-1]
        gen = torch.Generator(device=output.device)
        gen.manual_seed(_seed(context["seed"]))
        eps = torch.rand((S, b, h), generator=gen, device=output.device, dtype=torch.float32)
        noise = (eps * 2 - 1) * scale[:, :, None]
        if sequence_parallel:
            from megatron.core import parallel_state as ps

            local = output.shape[0]
            rank = ps.get_tensor_model_parallel_rank()
            noise = noise[rank * local:(rank + 1) * local]
        return noise.to(output.dtype)


def _seed(parts: Sequence[int]) -> int:
    """A 63-bit seed mixing ``parts`` (numpy's SeedSequence: neighbours do not collide)."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)
