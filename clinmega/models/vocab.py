"""Padded vocabularies: the padded ids never take part in a softmax.

The embedding and output layer have ``ModelConfig.padded_vocab_size(tp)`` rows so that tensor
parallelism can split any vocabulary (Megatron-LM's ``make_vocab_size_divisible_by``, 128 x TP by
default). In Megatron-LM the padded rows are ordinary parameters whose logits enter the softmax, so a
model with padding is a different function from the same model without it (the loss and every
token probability change, and generation can sample an id the tokenizer does not have). Here the
output layer's logits of the padded ids are set to -inf on the rank that holds them (the logits are
vocab-parallel: rank r of TP t holds ids ``[r * P/t, (r + 1) * P/t)``, or all of them when gathered),
before megatron-core's vocab-parallel cross entropy, log-likelihood scoring and sampling see them:
exp(-inf) = 0, so the softmax over the padded vocabulary equals the softmax over the real one, the
loss equals the unpadded loss, and the padded rows get zero gradient. Nothing is done (and nothing is
hooked) when the vocabulary needs no padding.
"""

from __future__ import annotations

import torch


def mask_padded_logits(logits: torch.Tensor, vocab_size: int, vocab_start: int = 0) -> torch.Tensor:
    """Set the logits of ids >= ``vocab_size`` to -inf, in place, where ``logits[..., j]`` is the
    logit of id ``vocab_start + j`` (a tensor-parallel shard of the vocabulary). Returns ``logits``."""
    first = max(vocab_size - vocab_start, 0)
    if first < logits.shape[-1]:
        logits.narrow(-1, first, logits.shape[-1] - first).fill_(float("-inf"))
    return logits


class _PaddedVocabMask:
    """Forward hook of the output layer (a ColumnParallelLinear returning ``(logits, bias)``)."""

    def __init__(self, vocab_size: int, padded_vocab_size: int, tp_rank: int):
        self.vocab_size, self.padded, self.tp_rank = vocab_size, padded_vocab_size, tp_rank

    def __call__(self, module, args, output):
        logits, bias = output
        columns = logits.shape[-1]
        # Gathered over TP ranks (runtime_gather_output, inference) or this rank's shard.
        start = 0 if columns == self.padded else self.tp_rank * columns
        return mask_padded_logits(logits, self.vocab_size, start), bias


def install_padded_vocab_mask(gpt: torch.nn.Module, vocab_size: int) -> None:
    """Mask the padded ids of ``gpt`` (a GPTModel with an output layer) in every forward."""
    output_layer = getattr(gpt, "output_layer", None)
    gpt.real_vocab_size = vocab_size  # read by real_vocab_logits
    if output_layer is None or gpt.vocab_size == vocab_size:
        return
    from megatron.core.utils import get_pg_rank

    rank = get_pg_rank(getattr(output_layer, "tp_group", None))
    output_layer.register_forward_hook(_PaddedVocabMask(vocab_size, gpt.vocab_size, rank))


def real_vocab_logits(gpt: torch.nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary (gathered) logits cut to the real vocabulary (a view): the ids a tokenizer has,
    indexed like a Hugging Face model's logits."""
    return logits[..., : getattr(gpt, "real_vocab_size", logits.shape[-1])]
