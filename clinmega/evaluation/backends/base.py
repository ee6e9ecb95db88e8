"""The backend interface and the token-level machinery shared by the HF and Megatron backends.

A backend answers two questions about strings:

* ``loglikelihood([(context, continuation), ...]) -> [float]``: sum of log-probabilities of the
  continuation tokens given the context. Tokenisation follows lm-eval's causal models exactly: trailing
  whitespace of the context moves to the continuation, ``enc(context + continuation)`` is split at
  ``len(enc(context))`` (both with the tokenizer's BOS), and the input is left-truncated to
  ``max_length``;
* ``generate(prompts, max_new_tokens, temperature, top_p, seed, stop) -> [str]``: greedy
  (``temperature == 0``) or sampled (temperature, nucleus ``top_p``) continuations, cut at the first stop
  string or EOS. Row i samples from its own generator seeded with ``(seed, i)``, so results do not depend
  on the batch size or on the other prompts.

`TokenBackend` implements both on top of three model hooks (`_logits`, `_prefill`, `_decode`), batching
requests by length (longest first); requests with identical model inputs (the options " A", " B", ... of
one prompt) share one forward pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch


class Backend(Protocol):
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]: ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = ()) -> list[str]: ...


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Greedy (temperature 0) or temperature/nucleus sampling, one generator per row."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs * keep)
    return torch.stack([torch.multinomial(p, 1, generator=g)[0] for p, g in zip(probs, generators)])


@dataclass
class ScoreBatch:
    """One log-likelihood forward: a right-padded batch ``tokens`` [B, T] (row b holds ``lengths[b]``
    real tokens) and per row the continuations scored at its end (``targets[b]``: token lists, each
    ending at the row's last position + 1; the options " A", " B", ... of one prompt share a row)."""

    tokens: torch.Tensor
    lengths: list[int]
    targets: list[list[list[int]]]


def continuation_logprobs(logits: torch.Tensor, batch: ScoreBatch) -> list[list[float]]:
    """Per row, per target: the sum of the target tokens' log-probabilities under ``logits``
    [>=B, >=T, V] (rows/positions past the batch's are ignored)."""
    out = []
    for b, (length, targets) in enumerate(zip(batch.lengths, batch.targets)):
        row = []
        for cont in targets:
            positions = torch.arange(length - len(cont), length, device=logits.device)
            logprobs = torch.log_softmax(logits[b, positions].float(), dim=-1)
            row.append(logprobs.gather(1, torch.tensor(cont, device=logits.device)[:, None]).sum().item())
        out.append(row)
    return out


def move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's rule: trailing whitespace of the context belongs to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them: ``encode(context + continuation)`` cut at
    ``len(encode(context))``, after `move_trailing_space`."""
    context, continuation = move_trailing_space(context, continuation)
    whole = encode(context + continuation)
    context_ids = encode(context)
    return whole[: len(context_ids)], whole[len(context_ids):]


class TokenBackend(ABC):
    """Batching, tokenisation, scoring and the decoding loop; subclasses provide model forwards."""

    def __init__(self, tokenizer: Any, max_length: int, batch_size: int = 8):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.progress: Callable[[str, int, int], None] | None = None  # (what, done, total) after each batch

    # ------------------------------------------------------------------------------- model hooks
    @abstractmethod
    def _logits(self, tokens: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Logits [B, T, V] of a right-padded batch (row b holds ``lengths[b]`` real tokens), on the model's
        device (only the continuation positions are read)."""

    @abstractmethod
    def _prefill(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[torch.Tensor, Any, list[list[int]]]:
        """Run the prompts; return logits [B, V] for each row's next position, a decoding state, and per
        row the prompt tokens not consumed yet (the loop feeds them one per step before sampling)."""

    @abstractmethod
    def _decode(self, state: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Feed one new token per row [B], return logits [B, V] and the updated state."""

    # ----------------------------------------------------------------------------- log-likelihood
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.encode, context, continuation)

    @torch.no_grad()
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[float]:
        encoded = [self.encode_pair(c, x) for c, x in requests]
        inputs: dict[tuple[int, ...], list[int]] = {}  # identical model inputs run once (e.g. " A"/" B"/...)
        for i, (ctx, cont) in enumerate(encoded):
            inputs.setdefault(tuple((ctx + cont)[-(self.max_length + 1):][:-1]), []).append(i)
        unique = sorted(inputs, key=len, reverse=True)
        batches = []
        for start in range(0, len(unique), self.batch_size):
            rows = unique[start:start + self.batch_size]
            lengths = [len(x) for x in rows]
            tokens = torch.full((len(rows), max(lengths)), self.pad_id, dtype=torch.long)
            for b, x in enumerate(rows):
                tokens[b, : lengths[b]] = torch.tensor(x)
            batches.append(ScoreBatch(tokens, lengths, [[encoded[i][1] for i in inputs[x]] for x in rows]))
        results = [0.0] * len(encoded)
        done = 0
        for batch, sums in zip(batches, self._score_batches(batches)):
            rows = unique[done:done + len(batch.lengths)]
            for x, row_sums in zip(rows, sums):
                for i, value in zip(inputs[x], row_sums):
                    results[i] = value
            done += len(rows)
            self._report("log-likelihood forwards", done, len(unique))
        return results

    def _score_batches(self, batches: Sequence["ScoreBatch"]) -> Iterator[list[list[float]]]:
        """Per batch (in order), per row, the summed log-probabilities of the row's targets. This
        default runs `_logits` batch by batch; a backend may override it (the Megatron one runs
        several batches as the microbatches of one pipeline schedule)."""
        for batch in batches:
            yield continuation_logprobs(self._logits(batch.tokens, batch.lengths), batch)

    # --------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int = 0, stop: Sequence[str] = ()) -> list[str]:
        encoded = [self.encode(p)[-max(1, self.max_length - max_new_tokens):] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        texts = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            generators = [torch.Generator().manual_seed(seed * 1_000_003 + i) for i in rows]
            outs = self._generate_batch([encoded[i] for i in rows], max_new_tokens, temperature, top_p,
                                        generators, stop)
            for i, text in zip(rows, outs):
                texts[i] = text
            self._report("generations", start + len(rows), len(prompts))
        return texts

    def _report(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                        generators: list[torch.Generator], stop: Sequence[str]) -> list[str]:
        if max_new_tokens <= 0:
            return [""] * len(prompts)
        logits, state, pending = self._prefill(prompts, max_new_tokens)
        pending = [list(p) for p in pending]
        generated: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        while True:
            tokens = torch.full((len(prompts),), self.pad_id, dtype=torch.long)
            active = [b for b in range(len(prompts)) if not pending[b] and not done[b]]
            for b, rest in enumerate(pending):
                if rest:  # prompt tokens the prefill did not consume are fed, not sampled
                    tokens[b] = rest.pop(0)
            picked = next_tokens(logits[active], temperature, top_p, [generators[b] for b in active]).tolist() \
                if active else []
            for b, t in zip(active, picked):
                if t == self.eos_id:
                    done[b] = True
                    continue
                generated[b].append(t)
                tokens[b] = t
                if len(generated[b]) >= max_new_tokens or (stop and any(s in self._decode_text(generated[b]) for s in stop)):
                    done[b] = True
            if all(done):
                break
            logits, state = self._decode(state, tokens)
        return [cut_at_stop(self._decode_text(g), stop) for g in generated]

    def _decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text
