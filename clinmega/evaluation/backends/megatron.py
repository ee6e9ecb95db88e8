"""megatron-core GPTModel backend: batched scoring and KV-cached generation at any layout (TP, PP,
virtual PP, EP), directly on a rank's model chunks.

Two pieces: `load_chunks` builds this rank's chunks for a parallel layout and loads a distributed
checkpoint saved at any layout into them (megatron-core reshards); `MegatronBackend` scores and
generates over chunks (loaded, or the training loop's live ones) through
:class:`clinmega.evaluation.backends.chunks.ChunkRunner` (megatron-core's forward-only schedule for
scoring, its pipeline p2p for generation).

Generation follows megatron-core's own static-batching scheme (``inference/text_generation_controllers``):
the batch is right-padded, a `StaticInferenceContext` holds the KV cache (each stage its own layers'),
the prefill covers the shortest prompt, and the longer prompts' remaining tokens are fed one per step
before their rows start sampling (the shared decoding loop of `TokenBackend`). Rows never see padding,
so only causal masks are needed and the same code runs with the local and the Transformer Engine layer
specs. Batches are formed from prompts of similar length (longest first), which keeps those fed steps few.

The prompts, tokenisation and answer extraction are those of every backend; on the same weights the
choices equal the HF backend's (tests/test_eval_megatron_backend.py), at every layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from clinmega.evaluation.backends.base import ScoreBatch, TokenBackend
from clinmega.evaluation.backends.chunks import ChunkRunner


@dataclass
class LoadedChunks:
    """What `load_chunks` returns: this rank's chunks, the model they are, and the tokenizer folder."""

    chunks: list
    model: Any  # clinmega ModelConfig
    tokenizer: Path


def load_chunks(path: str | Path, model_config: str | Path | None = None, tokenizer: str | Path | None = None,
                dtype: str = "float32", parallel: Any = None, runtime: Any = None) -> LoadedChunks:
    """Collective: initialise the runtime for ``parallel`` (a ParallelConfig; default one process),
    build this rank's model chunks and load a clinmega/megatron-core distributed checkpoint into them.

    ``path``: a checkpoint, checkpoint root or train run directory (the newest complete checkpoint is
    loaded; a LoRA run's adapter checkpoint is loaded as base + adapters). ``model_config``: a HF ``config.json`` (or folder holding one) describing the model,
    default the model the checkpoint records (else ``config.json`` in the checkpoint); ``tokenizer``:
    a folder `AutoTokenizer` reads, default the checkpoint's ``hf_assets`` (else the checkpoint folder).
    """
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
    parallel = parallel or ParallelConfig()
    runtime = runtime or RuntimeConfig()
    initialize(parallel, runtime)
    chunks = build_checkpoint_model(info, cfg, parallel, PrecisionConfig(dtype=precision), runtime,
                                    training=False)
    return LoadedChunks(chunks, cfg, Path(tokenizer))


class MegatronBackend(TokenBackend):
    """Scores and generates with this rank's model chunks (one GPTModel, or ``build_model``'s list
    under pipeline parallelism; DDP-wrapped ones too). Every rank computes the same requests and gets
    the same results; the caller lets rank 0 write them."""

    def __init__(self, model: torch.nn.Module | Sequence[torch.nn.Module], tokenizer: Any, max_length: int,
                 batch_size: int = 8):
        super().__init__(tokenizer, max_length, batch_size)
        self.chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
        for chunk in self.chunks:
            chunk.eval()
        self.runner = ChunkRunner(self.chunks)
        self.device = self.runner.device

    @property
    def model(self) -> torch.nn.Module:
        """The first chunk: the whole model without pipeline parallelism."""
        return self.chunks[0]

    @classmethod
    def from_checkpoint(cls, path: str | Path, model_config: str | Path | None = None,
                        tokenizer: str | Path | None = None, dtype: str = "float32", batch_size: int = 8,
                        tensor_parallel: int = 1, expert_parallel: int = 1, pipeline_parallel: int = 1,
                        virtual_pipeline_parallel: int | None = None,
                        expert_tensor_parallel: int | None = None) -> "MegatronBackend":
        """A backend on the checkpoint at ``path`` (see `load_chunks`) at the given layout. With more
        than one rank, run one process per rank (torchrun, Slurm): every rank computes the same
        requests (logits are gathered over tensor-parallel ranks and broadcast from the last pipeline
        stage, and each row samples from its own seeded generator, so all ranks agree), and the
        caller lets rank 0 write results."""
        from transformers import AutoTokenizer

        from clinmega.config.schema import ParallelConfig

        parallel = ParallelConfig(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
                                  pipeline_parallel=pipeline_parallel,
                                  virtual_pipeline_parallel=virtual_pipeline_parallel,
                                  expert_tensor_parallel=expert_tensor_parallel)
        loaded = load_chunks(path, model_config, tokenizer, dtype, parallel)
        return cls(loaded.chunks, AutoTokenizer.from_pretrained(str(loaded.tokenizer)),
                   loaded.model.max_position_embeddings, batch_size=batch_size)

    # ------------------------------------------------------------------------------- model hooks
    def _score_batches(self, batches: Sequence[ScoreBatch]) -> Iterator[list[list[float]]]:
        return self.runner.score(batches)

    def _logits(self, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        if len(self.chunks) > 1 or self.runner.pp_size > 1:
            raise ValueError("full logits of a pipelined model stay on its last stage; score through "
                             "loglikelihood()")
        return self.runner.real_logits(self.runner.forward(self.model, tokens, 0, self.runner.mask(tokens.shape[1])))

    def _prefill(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[torch.Tensor, Any, list[list[int]]]:
        from megatron.core.inference.contexts import StaticInferenceContext

        shortest = min(len(p) for p in prompts)
        context = StaticInferenceContext(len(prompts), max(len(p) for p in prompts) + max_new_tokens)
        tokens = torch.tensor([p[:shortest] for p in prompts], dtype=torch.long)
        logits = self.runner.last_logits(tokens, 0, self.runner.mask(shortest), context)
        context.increment_sequence_len_offset(shortest)
        return logits, context, [p[shortest:] for p in prompts]

    def _decode(self, state: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        context = state
        logits = self.runner.last_logits(tokens[:, None], context.sequence_len_offset, None, context)
        context.increment_sequence_len_offset(1)
        return logits, context
