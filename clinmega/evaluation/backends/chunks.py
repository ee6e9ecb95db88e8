"""Forward passes over one rank's megatron-core model chunks, at any layout (TP, PP, virtual PP, EP).

`ChunkRunner` wraps the chunks a rank holds (``build_model``'s list: one per virtual pipeline stage,
bare GPTModels or the training loop's DDP-wrapped ones) and answers two questions on every rank:

* ``score(batches)``: per row, the summed log-probabilities of its continuations. The batches run as
  the microbatches of megatron-core's own forward-only schedule (``get_forward_backward_func()`` with
  ``forward_only=True, collect_non_loss_data=True``: no pipelining, 1F1B or interleaved, chosen by
  megatron-core from the parallel state), a round of ``2 x PP`` batches per schedule call so the
  stages overlap. The last stage reduces its logits to the sums (never keeping a microbatch's full
  logits) and broadcasts them over the pipeline group.
* ``last_logits(tokens, start, mask, context)``: the next-token logits of each row after one forward
  (the KV-cached prefill and decode steps of generation). The activations go stage to stage through
  megatron-core's ``P2PCommunicator`` (the p2p layer of its schedules), virtual stage by virtual
  stage around the pipeline ring, so the per-stage KV caches of one `StaticInferenceContext` stay in
  step; the last stage broadcasts the logits.

Every rank computes the same requests: logits are gathered over tensor-parallel ranks
(``runtime_gather_output``), data-parallel replicas repeat the work (expert-parallel groups span
them, so their forwards must match one for one).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from clinmega.evaluation.backends.base import ScoreBatch, continuation_logprobs


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """megatron-core's boolean mask convention: True where attention is masked out. [1, 1, T, T]"""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)[None, None]


class ChunkRunner:
    def __init__(self, chunks: Sequence[torch.nn.Module]):
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_model_config

        from clinmega.models.dist_ckpt import unwrap

        self.chunks = list(chunks)
        self.config = get_model_config(self.chunks[0])
        self.device = next(self.chunks[0].parameters()).device
        self.output_chunk = unwrap(self.chunks[-1])  # its real_vocab_size cuts the padded ids
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.pp_rank = ps.get_pipeline_model_parallel_rank()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.last_rank = ps.get_pipeline_model_parallel_last_rank()  # global rank of the last stage
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        if ps.get_context_parallel_world_size() > 1:
            raise ValueError("evaluation does not split sequences for context parallelism; "
                             "use parallel.context_parallel=1")

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def mask(self, length: int) -> torch.Tensor | None:
        """Like megatron-core's GPT inference wrapper: an explicit causal mask for the local attention
        backend; None for the others (Transformer Engine, and the local spec's causal default)."""
        from megatron.core.transformer.enums import AttnBackend

        return causal_mask(length, self.device) if self.config.attention_backend == AttnBackend.local else None

    def forward(self, chunk: torch.nn.Module, tokens: torch.Tensor, start: int, mask, context=None):
        positions = torch.arange(start, start + tokens.shape[1], device=self.device)[None].expand(tokens.shape[0], -1)
        return chunk(tokens.to(self.device), positions, mask, inference_context=context,
                     runtime_gather_output=True)  # full-vocabulary logits on every tensor-parallel rank

    def real_logits(self, logits: torch.Tensor) -> torch.Tensor:
        from clinmega.models.vocab import real_vocab_logits

        return real_vocab_logits(self.output_chunk, logits)  # without the padded ids (their logits are -inf)

    def _broadcast_from_last_stage(self, value: torch.Tensor) -> torch.Tensor:
        if self.pp_size > 1:
            value = value.to(self.device)
            dist.broadcast(value, src=self.last_rank, group=self.pp_group)
        return value.cpu()

    # ----------------------------------------------------------------------- log-likelihood scoring
    def score(self, batches: Sequence[ScoreBatch]) -> Iterator[list[list[float]]]:
        """Per batch (in order), per row, the summed log-probabilities of the row's targets."""
        round_size = 1 if self.pp_size == 1 else 2 * self.pp_size
        for start in range(0, len(batches), round_size):
            yield from self._score_round(batches[start:start + round_size])

    def _score_round(self, batches: Sequence[ScoreBatch]) -> list[list[list[float]]]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        rows = max(len(b.lengths) for b in batches)
        width = max(b.tokens.shape[1] for b in batches)
        if self.config.sequence_parallel:  # the sequence is split over tensor-parallel ranks
            width = -(-width // self.tp_size) * self.tp_size
        microbatches = [_padded(b, rows, width) for b in batches]
        if len(self.chunks) > 1:  # interleaved: whole groups of microbatch_group_size_per_vp_stage
            group = self.config.microbatch_group_size_per_vp_stage or self.pp_size
            while len(microbatches) % group:
                microbatches.append(_padded(ScoreBatch(batches[0].tokens[:0], [], []), rows, width))
        iterators: Any = ([iter(microbatches) for _ in self.chunks] if len(self.chunks) > 1
                          else iter(microbatches))
        mask = self.mask(width)
        with torch.no_grad():
            schedule = get_forward_backward_func(  # of this runner's layout, not the global state's
                pp_size=self.pp_size, vp_size=len(self.chunks) if len(self.chunks) > 1 else None)
            stored = schedule(
                forward_step_func=partial(self._score_step, mask), data_iterator=iterators,
                model=self.chunks, num_microbatches=len(microbatches), seq_length=width,
                micro_batch_size=rows, forward_only=True, collect_non_loss_data=True)
        counts = [sum(len(t) for t in b.targets) for b in batches]
        flat = (torch.cat(stored[:len(batches)]) if self.is_last_stage
                else torch.zeros(sum(counts), dtype=torch.float64))
        flat = self._broadcast_from_last_stage(flat).tolist()
        out, at = [], 0
        for batch in batches:
            per_row = []
            for targets in batch.targets:
                per_row.append(flat[at:at + len(targets)])
                at += len(targets)
            out.append(per_row)
        return out

    def _score_step(self, mask, data_iterator, model):
        batch = next(data_iterator)
        output = self.forward(model, batch.tokens, 0, mask)
        return output, partial(self._reduce_scores, batch)

    def _reduce_scores(self, batch: ScoreBatch, logits: torch.Tensor, non_loss_data: bool = True) -> torch.Tensor:
        """On the last stage: the microbatch's sums, flat, in (row, target) order."""
        sums = continuation_logprobs(self.real_logits(logits), batch)
        return torch.tensor([v for row in sums for v in row], dtype=torch.float64)

    # ----------------------------------------------------------------------------- one forward
    def last_logits(self, tokens: torch.Tensor, start: int, mask: torch.Tensor | None,
                    context: Any = None) -> torch.Tensor:
        """Logits [B, V] (float, CPU, every rank) of each row's last position after running ``tokens``
        [B, T] at positions ``start..start+T-1`` through all stages."""
        from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
        from megatron.core.utils import get_attr_wrapped_model

        if self.config.sequence_parallel:
            raise ValueError("generation feeds one token per step, which sequence parallelism cannot "
                             "split over tensor-parallel ranks; build the model without "
                             "parallel.sequence_parallel")
        shape = (tokens.shape[1], tokens.shape[0], self.config.hidden_size)  # [s, b, h] between stages
        comm = P2PCommunicator(pp_group=self.pp_group, config=self.config) if self.pp_size > 1 else None
        output = None
        with torch.no_grad():
            for v, chunk in enumerate(self.chunks):
                first = self.pp_rank == 0 and v == 0
                last = self.is_last_stage and v == len(self.chunks) - 1
                if not first:  # from the previous stage (virtual stage v-1 on the last rank for v > 0)
                    get_attr_wrapped_model(chunk, "set_input_tensor")(comm.recv_forward(shape, False))
                output = self.forward(chunk, tokens, start, mask, context)
                if not last:
                    comm.send_forward(output, False)
        logits = (self.real_logits(output)[:, -1].float().contiguous() if self.is_last_stage else
                  torch.empty(tokens.shape[0], self.output_chunk.real_vocab_size, dtype=torch.float32))
        return self._broadcast_from_last_stage(logits)


def _padded(batch: ScoreBatch, rows: int, width: int) -> ScoreBatch:
    """``batch`` with pad rows (no targets) up to ``rows`` and pad columns up to ``width`` (id 0: right
    padding is never attended to by the causal positions before it, and is not scored)."""
    tokens = torch.zeros((rows, width), dtype=torch.long)
    tokens[: batch.tokens.shape[0], : batch.tokens.shape[1]] = batch.tokens
    missing = rows - len(batch.lengths)
    return ScoreBatch(tokens, list(batch.lengths) + [0] * missing, list(batch.targets) + [[]] * missing)
