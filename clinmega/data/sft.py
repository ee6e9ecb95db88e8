"""``prepare sft``: chat data -> token ids + loss mask (assistant tokens only), packed into bins.

Input records (JSONL, plain or .gz/.zst/.xz, or Parquet) come in one of four layouts (field names are
configurable); the manifest counts the layouts of each file (``files[].layouts``):

* ``messages``: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``: optional system first,
  then user/assistant alternating, ending with assistant;
* ``sharegpt``: ``conversations: [{"from": "system"|"human"|"gpt", "value": str}, ...]`` (``user`` and
  ``assistant`` are accepted for ``from`` too), mapped role by role to ``messages``; a top-level
  ``system`` string is the system message when the conversation has none;
* ``alpaca``: ``instruction``, ``input`` (may be empty), ``output``, optional ``system``. Mapped to one user
  message ``instruction + "\n\n" + input`` (just ``instruction`` when ``input`` is empty) and one
  assistant message ``output``: the content of the Alpaca prompt's ``### Instruction:`` and
  ``### Input:`` sections, separated by the blank line that prompt puts between them, without its
  preamble and ``###`` headers, because the chat template marks the turns instead;
* ``input_output``: ``input`` and ``output`` without ``instruction`` (user = input).

Templates (``template``):

* ``mistral-v1`` / ``mistral-v3``: the Mistral instruct formats, token-identical to
  ``mistral_common``'s ``encode_chat_completion`` (v1: ``[INST]`` written as text, system prompt
  before the first user message; v3: ``[INST]``/``[/INST]`` control tokens, system prompt before the
  last user message, assistant text right-stripped of spaces). Every assistant turn ends with EOS.
* ``chat-template``: the Hugging Face tokenizer's own ``apply_chat_template``; assistant spans are
  found by rendering growing prefixes (and must be prefix-stable, else the record is rejected).
* ``auto``: the Mistral version named by the tokenizer file, else ``chat-template``.

The loss mask is 1 exactly on assistant content tokens and their closing EOS. Truncation policy:
a sample longer than ``seq_length + 1`` tokens is either cut at the end (``truncate``; skipped as
``no_loss_tokens`` if no assistant token survives) or skipped as ``too_long`` (``drop``).

Output directory (published atomically; ``manifest.json`` is written last):

* ``tokens.bin/.idx``: megatron-core indexed dataset, one sequence per sample (BOS ... EOS);
* ``loss_mask.bin/.idx``: uint8 indexed dataset aligned with ``tokens``: 1 where the token is a target;
* ``packing.npz``: ``bin_offsets``, ``sample_ids`` (see ``packing.pack_ffd``) and ``seq_length``;
  sample ``i`` occupies ``len(tokens[i]) - 1`` positions of a bin (inputs ``t[:-1]``, targets ``t[1:]``);
* ``manifest.json``: counts per file and reason, template, truncation, packing efficiency, tokenizer.

``clinmega.data.sft_dataset.SFTDataset`` reads it for training.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clinmega.utils.atomic import publish_dir, staging_dir, write_json_atomic
from clinmega.data.config import TEMPLATES, TRUNCATION, SFTPrepConfig
from clinmega.data.indexed import (
    append_sequences,
    finish,
    merge_shards,
    new_builder,
    sequence_lengths,
)
from clinmega.data.manifest import FileStats, build_manifest, merge_chunk_stats, report_damage
from clinmega.data.packing import pack_ffd, packing_report
from clinmega.data.parallel import run_chunk_tasks
from clinmega.data.readers import (
    Chunk,
    expand_inputs,
    get_field,
    iter_objects,
    plan_chunks,
)
from clinmega.data.tokenizers import Tokenizer, cached_tokenizer

ROLES = ("system", "user", "assistant")


class ConversationError(ValueError):
    """A record that is not a usable conversation: ``reason`` is a manifest skip reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def record_layout(obj: dict[str, Any], cfg: SFTPrepConfig) -> str:
    """``messages`` | ``sharegpt`` | ``alpaca`` | ``input_output`` | ``unknown`` (see module doc)."""
    if get_field(obj, cfg.messages_field) is not None:
        return "messages"
    if get_field(obj, cfg.conversations_field) is not None:
        return "sharegpt"
    if get_field(obj, cfg.output_field) is not None:
        return "alpaca" if get_field(obj, cfg.instruction_field) is not None else "input_output"
    return "unknown"


def sharegpt_messages(turns: Any, system: Any, cfg: SFTPrepConfig) -> list[Any]:
    """ShareGPT ``conversations`` as ``messages`` (roles mapped by ``SHAREGPT_ROLES``)."""
    if not isinstance(turns, list):
        raise ConversationError("wrong_type", f"{cfg.conversations_field!r} is {type(turns).__name__}, expected list")
    msgs: list[Any] = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise ConversationError("invalid_conversation", f"turn {i}: expected an object with 'from' and 'value'")
        if t["from"] not in SHAREGPT_ROLES:
            raise ConversationError(
                "invalid_conversation", f"turn {i}: unknown 'from' {t['from']!r} (expected one of {sorted(SHAREGPT_ROLES)})"
            )
        msgs.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
    if isinstance(system, str) and system and not (msgs and msgs[0]["role"] == "system"):
        msgs.insert(0, {"role": "system", "content": system})
    return msgs


def to_messages(obj: dict[str, Any], cfg: SFTPrepConfig) -> list[dict[str, str]]:
    """The record, in any layout of the module doc, as a validated message list; raises ConversationError."""
    msgs = get_field(obj, cfg.messages_field)
    if msgs is None and get_field(obj, cfg.conversations_field) is not None:
        msgs = sharegpt_messages(get_field(obj, cfg.conversations_field), get_field(obj, cfg.system_field), cfg)
    if msgs is None:
        out = get_field(obj, cfg.output_field)
        inp = get_field(obj, cfg.input_field)
        instruction = get_field(obj, cfg.instruction_field)
        if out is None or (inp is None and instruction is None):
            raise ConversationError(
                "missing_field",
                f"no {cfg.messages_field!r}, no {cfg.conversations_field!r} and no "
                f"{cfg.input_field!r}/{cfg.instruction_field!r} + {cfg.output_field!r}",
            )
        for key, val in ((cfg.input_field, inp), (cfg.instruction_field, instruction), (cfg.output_field, out)):
            if val is not None and not isinstance(val, str):
                raise ConversationError("wrong_type", f"{key!r} is {type(val).__name__}, expected string")
        user = "\n\n".join(x for x in (instruction, inp) if x)
        system = get_field(obj, cfg.system_field)
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": out},
        ]
    elif not isinstance(msgs, list):
        raise ConversationError("wrong_type", f"{cfg.messages_field!r} is {type(msgs).__name__}, expected list")
    validate_messages(msgs)
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def validate_messages(msgs: list[Any]) -> None:
    """Optional system first, then user/assistant alternating from user, ending with assistant;
    every content a non-blank string. Raises ConversationError naming the offending message index."""
    if not msgs:
        raise ConversationError("empty", "no messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError("invalid_conversation", f"message {i}: expected an object with role and content")
        if m["role"] not in ROLES:
            raise ConversationError("invalid_conversation", f"message {i}: unknown role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ConversationError("wrong_type", f"message {i}: content is {type(m['content']).__name__}")
        if not m["content"].strip():
            raise ConversationError("empty", f"message {i} ({m['role']}): blank content")
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            idx = i + (len(msgs) - len(body))
            raise ConversationError("invalid_conversation", f"message {idx}: role {m['role']!r}, expected {expected!r}")
    if not body or body[-1]["role"] != "assistant":
        raise ConversationError("invalid_conversation", "conversation does not end with an assistant message")


class MistralTemplate:
    """Mistral instruct formats v1 and v3 (see module doc), built from our tokenizer's ``encode``."""

    def __init__(self, tok: Tokenizer, version: str) -> None:
        if version not in ("v1", "v3"):
            raise ValueError(f"unknown Mistral template version {version!r}")
        if tok.bos_id is None:
            raise ValueError(f"{tok.name}: Mistral templates need a BOS token")
        self.tok, self.version = tok, version
        self.name = f"mistral-{version}"
        if version == "v3":
            self.begin_inst, self.end_inst = tok.special_ids["[INST]"], tok.special_ids["[/INST]"]

    def encode(self, msgs: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        body = msgs[1:] if system is not None else msgs
        users = [i for i, m in enumerate(body) if m["role"] == "user"]
        ids: list[int] = [self.tok.bos_id]  # type: ignore[list-item]
        mask: list[int] = [0]
        for i, m in enumerate(body):
            if m["role"] == "user":
                # v1 puts the system prompt before the first user message, v2/v3 before the last one
                anchor = users[0] if self.version == "v1" else users[-1]
                content = f"{system}\n\n{m['content']}" if system and i == anchor else m["content"]
                if self.version == "v1":
                    piece = self.tok.encode(f"[INST] {content} [/INST]")
                else:
                    piece = [self.begin_inst, *self.tok.encode(content), self.end_inst]
                ids += piece
                mask += [0] * len(piece)
            else:
                text = m["content"] if self.version == "v1" else m["content"].rstrip(" ")
                piece = [*self.tok.encode(text), self.tok.eod_id]
                ids += piece
                mask += [1] * len(piece)
        return ids, mask


class ChatTemplate:
    """The Hugging Face tokenizer's chat template; assistant spans found by rendering prefixes."""

    def __init__(self, tok: Tokenizer) -> None:
        if tok.hf is None or not getattr(tok.hf, "chat_template", None):
            raise ValueError(
                f"{tok.name}: template 'chat-template' needs a Hugging Face tokenizer with a chat_template"
            )
        self.hf = tok.hf
        self.name = "chat-template"

    def _render(self, msgs: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        out = self.hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation_prompt)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    def encode(self, msgs: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        mask: list[int] = []
        for k, m in enumerate(msgs):
            if m["role"] == "assistant":
                header = self._render(msgs[:k], generation_prompt=True)
                self._extend(ids, mask, header, 0, k)
            full = self._render(msgs[: k + 1], generation_prompt=False)
            self._extend(ids, mask, full, int(m["role"] == "assistant"), k)
        return ids, mask

    @staticmethod
    def _extend(ids: list[int], mask: list[int], rendered: list[int], value: int, k: int) -> None:
        if rendered[: len(ids)] != ids:
            raise ConversationError(
                "invalid_conversation", f"message {k}: chat template output is not prefix-stable; cannot mask"
            )
        new = rendered[len(ids) :]
        ids += new
        mask += [value] * len(new)


def make_template(name: str, tok: Tokenizer) -> MistralTemplate | ChatTemplate:
    """Resolve ``template`` (``auto`` / ``mistral-v1`` / ``mistral-v3`` / ``chat-template``) for ``tok``."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose from {TEMPLATES}")
    if name == "auto":
        name = f"mistral-{tok.template}" if tok.template else "chat-template"
    if name == "chat-template":
        return ChatTemplate(tok)
    return MistralTemplate(tok, name.removeprefix("mistral-"))


def truncate(ids: list[int], mask: list[int], max_tokens: int, policy: str) -> tuple[list[int], list[int], bool]:
    """Apply the truncation policy; returns (ids, mask, was_truncated) or raises ConversationError."""
    if len(ids) <= max_tokens:
        return ids, mask, False
    if policy == "drop":
        raise ConversationError("too_long", f"{len(ids)} tokens > seq_length+1 = {max_tokens}")
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask, True


@dataclass
class _Task:
    chunk: Chunk
    shard: str
    cfg: SFTPrepConfig


def _sft_chunk(task: _Task) -> tuple[FileStats, int, dict[str, int]]:
    """Worker: encode one chunk into shards ``<shard>.tokens`` and ``<shard>.mask``.
    Returns (stats, number of truncated samples, records per layout)."""
    cfg = task.cfg
    tok = cached_tokenizer(cfg.tokenizer, cfg.tokenizer_backend)
    template = make_template(cfg.template, tok)
    stats = FileStats(task.chunk.path)
    tokens_b = new_builder(task.shard + ".tokens", tok.token_dtype())
    mask_b = new_builder(task.shard + ".mask", np.uint8)
    truncated = 0
    layouts: dict[str, int] = {}
    for rec in iter_objects(task.chunk, damage=stats.damaged):
        stats.documents_read += 1
        if rec.reason is not None:
            stats.skip(rec.line, rec.reason, rec.detail)
            continue
        layout = record_layout(rec.value, cfg)
        layouts[layout] = layouts.get(layout, 0) + 1
        try:
            ids, mask = template.encode(to_messages(rec.value, cfg))
            ids, mask, cut = truncate(ids, mask, cfg.seq_length + 1, cfg.truncation)
            if not any(mask[1:]):
                raise ConversationError("no_loss_tokens", f"no assistant token within {cfg.seq_length + 1} tokens")
        except ConversationError as exc:
            stats.skip(rec.line, exc.reason, exc.detail)
            continue
        truncated += cut
        n = np.array([len(ids)], dtype=np.int64)
        append_sequences(tokens_b, np.asarray(ids, dtype=tok.token_dtype()), n)
        append_sequences(mask_b, np.asarray(mask, dtype=np.uint8), n)
        stats.documents_written += 1
        stats.tokens += len(ids)
    finish(tokens_b, task.shard + ".tokens")
    finish(mask_b, task.shard + ".mask")
    return stats, truncated, layouts


def prepare_sft(cfg: SFTPrepConfig) -> dict[str, Any]:
    """Run ``prepare sft``; returns the manifest (also ``<output_dir>/manifest.json``)."""
    if not cfg.output_dir:
        raise ValueError("output_dir is required")
    if cfg.truncation not in TRUNCATION:
        raise ValueError(f"unknown truncation {cfg.truncation!r}; choose from {TRUNCATION}")
    final = Path(cfg.output_dir)
    if final.exists() and not cfg.overwrite:
        raise FileExistsError(f"{final} exists; use overwrite")
    paths = expand_inputs(cfg.inputs)
    tok = cached_tokenizer(cfg.tokenizer, cfg.tokenizer_backend)
    template = make_template(cfg.template, tok)  # fail fast on a bad template before forking
    chunks = plan_chunks(paths, cfg.workers, cfg.chunk_mb)
    t0 = time.perf_counter()
    with staging_dir(final) as tmp:
        out = tmp / "out"
        out.mkdir()
        tasks = [_Task(c, str(tmp / f"shard_{c.index:06d}"), cfg) for c in chunks]
        results = run_chunk_tasks(_sft_chunk, tasks, cfg.workers, "encode conversations", cfg.progress)
        merge_shards([t.shard + ".tokens" for t in tasks], out / "tokens", tok.token_dtype())
        merge_shards([t.shard + ".mask" for t in tasks], out / "loss_mask", np.uint8)
        positions = sequence_lengths(out / "tokens") - 1
        if cfg.pack:
            bin_offsets, sample_ids = pack_ffd(positions, cfg.seq_length)
        else:
            bin_offsets, sample_ids = np.arange(len(positions) + 1), np.arange(len(positions))
        np.savez(out / "packing.npz", bin_offsets=bin_offsets, sample_ids=sample_ids, seq_length=cfg.seq_length)
        files, _ = merge_chunk_stats(paths, chunks, [r[0] for r in results])
        manifest = build_manifest(
            "prepare-sft",
            cfg,
            files,
            tokenizer=tok.identity(),
            template=template.name,
            format_version=1,
            truncated_samples=sum(r[1] for r in results),
            packing=packing_report(positions, bin_offsets, cfg.seq_length),
            timing={"seconds": round(time.perf_counter() - t0, 3)},
        )
        for chunk, (_, _, layouts) in zip(chunks, results):
            entry = manifest["files"][chunk.file_index].setdefault("layouts", {})
            for name, n in layouts.items():
                entry[name] = entry.get(name, 0) + n
        write_json_atomic(out / "manifest.json", manifest)
        publish_dir(out, final, cfg.overwrite)
    report_damage(manifest, cfg.strict, logging.getLogger(__name__))
    return manifest


def is_complete(output_dir: str | os.PathLike[str]) -> bool:
    """True when ``output_dir`` is a finished ``prepare sft`` output (its manifest exists)."""
    return (Path(output_dir) / "manifest.json").is_file()
